"""Backend choice: the tensors' device decides, LSG_PATCH_BACKEND forces, and no CPU-only op is reachable from
another device. The portable backend is checked against the dense oracle by the whole oracle suite run with
LSG_PATCH_BACKEND=portable (see .ci/run); here it is compared with the fused CPU backend directly."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsg_patch.attention import AttentionLayout, lsg_attention, prepare_mask
from lsg_patch.attention import backends, product

TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh"]


def _forbid_cpu_only_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a CPU-only aten op was reached")

    monkeypatch.setattr(product, "_flash", refuse)
    monkeypatch.setattr(product, "_flash_backward", refuse)


def test_unknown_backend_is_refused_with_the_accepted_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "tpu")
    with pytest.raises(ValueError, match=r"LSG_PATCH_BACKEND='tpu' is not accepted; choose one of auto, portable, "
                                         r"cpu_fused, triton"):
        backends.backend_for(torch.device("cpu"))


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "xpu", "meta"])
def test_auto_never_selects_a_cpu_only_backend_for_another_device(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """portable, with or without triton (the Triton backend is opt-in until it has run on a GPU)."""
    monkeypatch.delenv(backends.BACKEND_VARIABLE, raising=False)
    for triton in (False, True):
        monkeypatch.setattr(backends, "triton_imports", lambda triton=triton: triton)
        assert backends.backend_for(torch.device(device)) == "portable"
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "cpu_fused")
    with pytest.raises(ValueError, match="runs on cpu tensors only"):
        backends.backend_for(torch.device(device))


def test_auto_selects_the_fused_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_VARIABLE, raising=False)
    assert backends.backend_for(torch.device("cpu")) == "cpu_fused"
    monkeypatch.setenv(backends.BACKEND_VARIABLE, " Portable ")
    assert backends.backend_for(torch.device("cpu")) == "portable"


def _case(kind: str, causal: bool, seed: int) -> tuple:
    layout = AttentionLayout(num_global_tokens=2, block_size=8, sparse_block_size=8, sparsity_factor=2,
                             sparsity_type=kind)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    t = 8 * 6
    qkv = torch.randn(3, 2, 3, 2 + t, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    token_mask = torch.arange(t) < torch.tensor([[t], [29]])
    return layout, qkv, prepare_mask(token_mask, layout)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(TYPES), st.booleans(), st.integers(0, 2**31))
def test_the_cuda_choice_reaches_no_cpu_only_op_and_matches_the_fused_kernel(kind: str, causal: bool, seed: int) -> None:
    """What a CUDA tensor gets (choose_kernel for cuda, on a machine without triton; the triton kernels have
    tests/test_triton.py) runs forward and backward with the CPU-only ops forbidden, and agrees with the fused CPU
    backend."""
    layout, qkv, mask = _case(kind, causal, seed)
    fused = lsg_attention(*qkv, mask, layout, causal=causal)
    fused_grad = torch.autograd.grad(fused.square().sum(), qkv)[0]
    with pytest.MonkeyPatch.context() as patch:
        _forbid_cpu_only_ops(patch)
        patch.setattr(backends, "triton_imports", lambda: False)
        patch.setattr(product, "choose_kernel",  # the choice made for the same call on CUDA tensors
                      lambda call: backends.choose_kernel(dataclasses.replace(call, device=torch.device("cuda"))))
        portable = lsg_attention(*qkv, mask, layout, causal=causal)
        portable_grad = torch.autograd.grad(portable.square().sum(), qkv)[0]
    torch.testing.assert_close(portable, fused, rtol=0, atol=1e-10)
    torch.testing.assert_close(portable_grad, fused_grad, rtol=0, atol=1e-10)


def test_forbidding_the_cpu_only_ops_is_noticed_on_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: the fused CPU path does reach the forbidden ops."""
    layout, qkv, mask = _case("norm", False, 0)
    _forbid_cpu_only_ops(monkeypatch)
    monkeypatch.delenv(backends.BACKEND_VARIABLE, raising=False)
    with pytest.raises(AssertionError, match="CPU-only aten op"):
        lsg_attention(*qkv, mask, layout)
