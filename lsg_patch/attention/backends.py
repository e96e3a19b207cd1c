"""Which implementation of the LSG product runs, chosen per call from the tensors' device.

* ``cpu_fused``: the CPU flash-attention kernel (a private aten op registered for CPU only) on the local window
  and the side keys, merged exactly through their logsumexp, with its own backward. CPU tensors only.
* ``portable``: public PyTorch ops only (`scaled_dot_product_attention` over each block's whole key set), so it
  runs on every device; on CUDA, SDPA picks its memory-efficient kernel, with dropout and backward.

``auto`` (the default) takes ``cpu_fused`` for CPU tensors and ``portable`` for every other device. The
environment variable ``LSG_PATCH_BACKEND`` forces one; it is read on every call, so it can change at run time.
"""
from __future__ import annotations

import os

import torch

BACKEND_VARIABLE = "LSG_PATCH_BACKEND"
BACKENDS = ("auto", "portable", "cpu_fused")
_DEVICE_BOUND = {"cpu_fused": "cpu"}  # backends made of ops registered for one device type only


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
    bound = _DEVICE_BOUND.get(name)
    if bound is not None and device.type != bound:
        raise ValueError(
            f"{BACKEND_VARIABLE}={name} runs on {bound} tensors only, but these are on {device}; "
            f"use 'portable' or 'auto' for {device.type}"
        )
    return name
