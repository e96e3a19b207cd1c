"""Which kernel runs the LSG product: decided for each call by `choose_kernel`, the one place that does.

Backends (what LSG_PATCH_BACKEND names; ``auto``, the default, picks by the tensors' device):

* ``cpu_fused``: kernels built on the CPU flash-attention op (a private aten op registered for CPU only). CPU
  tensors only; ``auto`` takes it for CPU tensors.
* ``triton``: fused Triton kernels (`triton_kernels.py`) for the block path; CUDA tensors, or CPU tensors under
  the Triton interpreter (TRITON_INTERPRET=1, for tests). Opt-in: ``auto`` does not take it until the kernels
  have compiled and passed benchmarks/gpu_check.py on a GPU (so far they have run only under the interpreter).
* ``portable``: public PyTorch ops only, so it runs on every device; ``auto`` takes it for every other device.

Kernels (`Kernel`), chosen from the backend and what the call needs:

* ``full_sdpa`` / ``full_explicit``: inputs of at most two blocks take plain attention over all keys, through one
  SDPA call, or through explicit scores when LSG's own dropout keep-mask must apply.
* ``blocked``: explicit scores over a few blocks at a time (`blocked.py`), with the counter-based dropout of
  `dropout.py` regenerated in the backward and a gradient for a relative-bias table; it also lets one key head
  serve its grouped query heads.
* ``cpu_flash``: the CPU flash kernel on the local window and the side keys, merged through their logsumexp
  (`product._BlockAttention`), for CPU training without dropout.
* ``portable_sdpa``: public SDPA over each block's gathered key set, with plain autograd (`product._portable_attention`).
* ``triton``: the fused kernels of the ``triton`` backend, dropout and a training bias included (`triton_kernels.py`).
* ``exportable``: what `torch.export` (and the ONNX exporter built on it) traces: explicit scores over every block's
  key set from static-shape gathers and concatenations, with no data-dependent branch and the block path at every
  length (`product._exportable_attention`). `torch.jit.trace` is refused: it would record the Python branches of one
  input length (block padding, full or block path) as constants.

The environment variable is read once per call, so it can change at run time.
"""
from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass

import torch

BACKEND_VARIABLE = "LSG_PATCH_BACKEND"
BACKENDS = ("auto", "portable", "cpu_fused", "triton")
INTERPRETER_VARIABLE = "TRITON_INTERPRET"  # triton's own switch: kernels run on CPU tensors, slowly (tests)
_DEVICE_BOUND = {"cpu_fused": "cpu"}  # backends made of ops registered for one device type only


class Kernel(enum.Enum):
    """The implementations of the LSG product (see the module docstring)."""

    FULL_SDPA = "full_sdpa"
    FULL_EXPLICIT = "full_explicit"
    BLOCKED = "blocked"
    CPU_FLASH = "cpu_flash"
    PORTABLE_SDPA = "portable_sdpa"
    TRITON = "triton"
    EXPORTABLE = "exportable"


JIT_TRACE_REFUSED = (
    "torch.jit.trace (and torch.onnx.export(..., dynamo=False), which uses it) cannot record LSG attention: its block "
    "padding and its full-or-block path depend on the input length, which a trace would fix to the traced one. "
    "Use torch.export.export (lsg_patch.export.export_program sets the dynamic batch and length) or "
    "lsg_patch.export_onnx / `lsg-patch export` for ONNX"
)


def exporting() -> bool:
    """Whether torch.export (or an exporter built on it) is tracing: the hooks and the product then take the path
    whose shapes follow the input length symbolically (always whole blocks, always the block path)."""
    return torch.compiler.is_exporting()


@dataclass(frozen=True)
class AttentionCall:
    """What the kernel choice depends on, read off one call of the product.

    block_path: the input has more than two blocks (otherwise plain attention over all keys);
    grouped_keys: fewer key heads than query heads; side_keys_per_key_head: the sparsity type's side keys depend
    on their key head alone (none, raw, norm, pooling), so one key head's key set can serve its query heads;
    needs_input_grad: autograd will ask for query/key/value gradients; bias_trains: a relative-bias table that
    takes a gradient; exporting: torch.export traces the call; jit_tracing: torch.jit.trace does (refused).
    """

    device: torch.device
    block_path: bool
    dropout: bool = False
    grouped_keys: bool = False
    side_keys_per_key_head: bool = False
    has_bias: bool = False
    bias_trains: bool = False
    needs_input_grad: bool = False
    exporting: bool = False
    jit_tracing: bool = False


@dataclass(frozen=True)
class KernelChoice:
    """The kernel that runs a call, and whether grouped-query keys are used as they are (True) or repeated to the
    query heads first (False; also False for calls without grouped keys)."""

    kernel: Kernel
    shares_key_heads: bool
    backend: str


def requested_backend() -> str:
    """The backend named by LSG_PATCH_BACKEND ("auto" when unset), validated."""
    name = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"{BACKEND_VARIABLE}={name!r} is not accepted; choose one of {', '.join(BACKENDS)} (or leave it unset for auto)"
        )
    return name


def backend_for(device: torch.device) -> str:
    """The backend that runs LSG attention on tensors of `device`; never a CPU-only backend elsewhere."""
    name = requested_backend()
    if name == "auto":
        return "cpu_fused" if device.type == "cpu" else "portable"
    if name == "triton":
        problem = _triton_problem(device)
        if problem:
            raise ValueError(f"{BACKEND_VARIABLE}=triton cannot run here: {problem}; use 'auto' or 'portable'")
    bound = _DEVICE_BOUND.get(name)
    if bound is not None and device.type != bound:
        raise ValueError(
            f"{BACKEND_VARIABLE}={name} runs on {bound} tensors only, but these are on {device}; "
            f"use 'portable' or 'auto' for {device.type}"
        )
    return name


@functools.cache
def triton_imports() -> bool:
    """Whether `import triton` succeeds (asked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_problem(device: torch.device) -> str:
    """Why the triton backend cannot run on tensors of `device` ("" when it can)."""
    if not triton_imports():
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and os.environ.get(INTERPRETER_VARIABLE) != "1":
        return (f"these tensors are on the CPU, where Triton kernels run only under its interpreter "
                f"({INTERPRETER_VARIABLE}=1, set before triton is imported)")
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on cuda tensors, and these are on {device}"
    return ""


def choose_kernel(call: AttentionCall) -> KernelChoice:
    """The kernel for `call`, on the backend LSG_PATCH_BACKEND and the device give.

    Grouped-query keys are shared (never with a bias): on the full path without dropout (SDPA's enable_gqa); on
    the block path, for side keys of one key head, where the blocked kernel is the fast choice — the CPU's default
    backend (1.2-1.3x faster, 2.8-4.2x less memory than repeated keys: benchmarks/results/grouped.md) and dropout
    on any device. Without dropout on CUDA the portable path's fused SDPA on repeated keys was 2-7x faster on an
    H200, at 4-8x the memory (benchmarks/results/gpu.md), so the keys are repeated there.

    On the CPU the blocked kernel also serves inference (the flash path's per-layer copies of the windows and side
    keys would set the peak memory; the blocked kernel is as fast there and holds a few blocks at a time) and a
    bias table that trains (the flash backward has no bias gradient).

    Under torch.export every call takes the exportable kernel (keys repeated to the query heads); attention dropout
    is refused there (its keep-mask draws a seed per call), as is torch.jit.trace.
    """
    if call.jit_tracing:
        raise RuntimeError(JIT_TRACE_REFUSED)
    backend = backend_for(call.device)
    if call.exporting:
        if call.dropout:
            raise ValueError("attention dropout cannot be exported (its keep-mask draws a new seed every call): "
                             "export the model in eval mode (model.eval())")
        return KernelChoice(Kernel.EXPORTABLE, False, backend)
    if not call.block_path:
        shares = call.grouped_keys and not call.has_bias and not call.dropout
        return KernelChoice(Kernel.FULL_EXPLICIT if call.dropout else Kernel.FULL_SDPA, shares, backend)
    if backend == "triton":  # every block-path call: dropout, bias and grouped keys run inside the kernels
        shares = call.grouped_keys and not call.has_bias and call.side_keys_per_key_head
        return KernelChoice(Kernel.TRITON, shares, backend)
    shares = (call.grouped_keys and not call.has_bias and call.side_keys_per_key_head
              and (call.dropout or backend == "cpu_fused"))
    cpu_prefers_blocked = not call.needs_input_grad or call.bias_trains
    if call.dropout or shares or (backend == "cpu_fused" and cpu_prefers_blocked):
        kernel = Kernel.BLOCKED
    elif backend == "cpu_fused":
        kernel = Kernel.CPU_FLASH
    else:
        kernel = Kernel.PORTABLE_SDPA
    return KernelChoice(kernel, shares, backend)
