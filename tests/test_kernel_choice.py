"""The one function that decides which kernel runs (`backends.choose_kernel`): its table, written out by hand
from the policy in its docstring, and the product following it."""
from __future__ import annotations

import pytest
import torch

from lsg_patch.attention import AttentionLayout, backends, lsg_attention, prepare_mask
from lsg_patch.attention.backends import AttentionCall, Kernel, choose_kernel

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("backend", "call", "kernel", "shares"), [
    # short inputs: plain attention; LSG's keep-mask needs explicit scores
    ("auto", AttentionCall(CPU, block_path=False), Kernel.FULL_SDPA, False),
    ("auto", AttentionCall(CUDA, block_path=False, grouped_keys=True), Kernel.FULL_SDPA, True),
    ("auto", AttentionCall(CUDA, block_path=False, grouped_keys=True, dropout=True), Kernel.FULL_EXPLICIT, False),
    ("auto", AttentionCall(CPU, block_path=False, grouped_keys=True, has_bias=True), Kernel.FULL_SDPA, False),
    # CPU default backend: flash kernel for training, blocked kernel for inference, dropout and a training bias
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True), Kernel.CPU_FLASH, False),
    ("auto", AttentionCall(CPU, block_path=True), Kernel.BLOCKED, False),
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True, dropout=True), Kernel.BLOCKED, False),
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True, has_bias=True, bias_trains=True),
     Kernel.BLOCKED, False),
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True, has_bias=True), Kernel.CPU_FLASH, False),
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True, grouped_keys=True,
                           side_keys_per_key_head=True), Kernel.BLOCKED, True),
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True, grouped_keys=True), Kernel.CPU_FLASH, False),
    # other devices without triton: public SDPA without dropout (grouped keys repeated), the blocked kernel with it
    ("auto-without-triton", AttentionCall(CUDA, block_path=True, needs_input_grad=True), Kernel.PORTABLE_SDPA, False),
    ("auto-without-triton", AttentionCall(CUDA, block_path=True), Kernel.PORTABLE_SDPA, False),
    ("auto-without-triton", AttentionCall(CUDA, block_path=True, grouped_keys=True, side_keys_per_key_head=True),
     Kernel.PORTABLE_SDPA, False),
    ("auto-without-triton", AttentionCall(CUDA, block_path=True, dropout=True, grouped_keys=True, side_keys_per_key_head=True),
     Kernel.BLOCKED, True),
    ("auto-without-triton", AttentionCall(CUDA, block_path=True, dropout=True, grouped_keys=True, side_keys_per_key_head=True,
                           has_bias=True), Kernel.BLOCKED, False),
    # auto on CUDA where triton imports: still the portable kernels (the Triton backend is opt-in until measured)
    ("auto", AttentionCall(CUDA, block_path=True, needs_input_grad=True), Kernel.PORTABLE_SDPA, False),
    ("auto", AttentionCall(CUDA, block_path=False, grouped_keys=True), Kernel.FULL_SDPA, True),
    ("auto", AttentionCall(CUDA, block_path=False, dropout=True), Kernel.FULL_EXPLICIT, False),
    # triton forced on CUDA: the fused kernels on the block path, grouped keys shared where the side keys allow
    # and no bias is per query head; the full path as before
    ("triton", AttentionCall(CUDA, block_path=True, needs_input_grad=True), Kernel.TRITON, False),
    ("triton", AttentionCall(CUDA, block_path=True, dropout=True, needs_input_grad=True), Kernel.TRITON, False),
    ("triton", AttentionCall(CUDA, block_path=True, grouped_keys=True, side_keys_per_key_head=True),
     Kernel.TRITON, True),
    ("triton", AttentionCall(CUDA, block_path=True, grouped_keys=True), Kernel.TRITON, False),
    ("triton", AttentionCall(CUDA, block_path=True, grouped_keys=True, side_keys_per_key_head=True, has_bias=True,
                             bias_trains=True), Kernel.TRITON, False),
    ("triton", AttentionCall(CUDA, block_path=False, grouped_keys=True), Kernel.FULL_SDPA, True),
    ("auto", AttentionCall(torch.device("mps"), block_path=True), Kernel.PORTABLE_SDPA, False),
    ("auto", AttentionCall(CPU, block_path=True, needs_input_grad=True), Kernel.CPU_FLASH, False),
    # triton forced on the CPU (under the interpreter: tests)
    ("triton", AttentionCall(CPU, block_path=True, needs_input_grad=True), Kernel.TRITON, False),
    ("triton", AttentionCall(CPU, block_path=False), Kernel.FULL_SDPA, False),
    # the portable backend forced on the CPU runs what other devices run
    ("portable", AttentionCall(CPU, block_path=True), Kernel.PORTABLE_SDPA, False),
    ("portable", AttentionCall(CPU, block_path=True, needs_input_grad=True), Kernel.PORTABLE_SDPA, False),
])
def test_the_kernel_table(backend: str, call: AttentionCall, kernel: Kernel, shares: bool,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """backend "auto-without-triton": auto on a machine where triton does not import; elsewhere it imports."""
    monkeypatch.setattr(backends, "triton_imports", lambda: backend != "auto-without-triton")
    monkeypatch.setenv(backends.INTERPRETER_VARIABLE, "1")
    monkeypatch.setenv(backends.BACKEND_VARIABLE, backend.removesuffix("-without-triton"))
    choice = choose_kernel(call)
    assert (choice.kernel, choice.shares_key_heads) == (kernel, shares)


@pytest.mark.parametrize("device", [CUDA, torch.device("mps"), torch.device("meta")])
def test_no_cpu_only_kernel_is_chosen_for_another_device(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_VARIABLE, raising=False)
    for grad in (False, True):
        for dropout in (False, True):
            call = AttentionCall(device, block_path=True, dropout=dropout, needs_input_grad=grad)
            assert choose_kernel(call).kernel is not Kernel.CPU_FLASH
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "cpu_fused")
    with pytest.raises(ValueError, match="runs on cpu tensors only"):
        choose_kernel(AttentionCall(device, block_path=True))


@pytest.mark.parametrize(("triton", "interpreter", "device", "problem"), [
    (False, "1", CUDA, "triton is not installed"),
    (True, None, CPU, "only under its interpreter"),
    (True, "0", CPU, "only under its interpreter"),
    (True, "1", torch.device("mps"), "run on cuda tensors"),
])
def test_forcing_triton_where_it_cannot_run_is_refused(triton: bool, interpreter: str | None, device: torch.device,
                                                       problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "triton_imports", lambda: triton)
    if interpreter is None:
        monkeypatch.delenv(backends.INTERPRETER_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(backends.INTERPRETER_VARIABLE, interpreter)
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "triton")
    with pytest.raises(ValueError, match=f"LSG_PATCH_BACKEND=triton cannot run here: .*{problem}"):
        choose_kernel(AttentionCall(device, block_path=True))


@pytest.mark.parametrize(("grad", "dropout", "kernel"), [
    (True, 0.0, "_BlockAttention"), (False, 0.0, "BlockedAttention"), (True, 0.2, "BlockedAttention")])
def test_the_product_runs_the_chosen_kernel(grad: bool, dropout: float, kernel: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The autograd Function that runs is the one the choice names (read off the output's grad_fn)."""
    monkeypatch.delenv(backends.BACKEND_VARIABLE, raising=False)
    layout = AttentionLayout(num_global_tokens=1, block_size=4, sparse_block_size=4, sparsity_type="norm")
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 1 + 16, 4, generator=generator, requires_grad=grad) for _ in range(3))
    choice = choose_kernel(AttentionCall(CPU, block_path=True, dropout=dropout > 0, needs_input_grad=grad))
    out = lsg_attention(query, key, value, prepare_mask(torch.ones(1, 16, dtype=torch.bool), layout), layout,
                        dropout_p=dropout)
    assert {"_BlockAttention": Kernel.CPU_FLASH, "BlockedAttention": Kernel.BLOCKED}[kernel] is choice.kernel
    if grad:
        assert type(out.grad_fn).__name__ == kernel + "Backward"
