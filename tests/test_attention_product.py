"""Property tests of lsg_attention against the dense oracle (tests/oracle.py)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsg_patch.attention import AttentionLayout, LSGMask, lsg_attention, prepare_mask
from tests.oracle import attended_keys, oracle_attention

EXACT_TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh"]


@dataclass
class Case:
    layout: AttentionLayout
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    token_mask: torch.Tensor
    scale: float | None

    def mask(self) -> LSGMask:
        return prepare_mask(self.token_mask, self.layout)


@st.composite
def cases(draw: st.DrawFn, types: list[str] = EXACT_TYPES, long_only: bool = False, random_lsh: bool = False
          ) -> Case:
    """A random layout, token count, padding mask and float64 q/k/v.

    Unless random_lsh, lsh is drawn only where it is deterministic (sparsity_factor 1, or sparsity_factor ==
    sparse_block_size, where it runs bos_pooling).
    """
    bs = draw(st.sampled_from([2, 4, 8, 16]))
    sf = draw(st.sampled_from([f for f in range(1, bs + 1) if bs % f == 0]))
    kind = draw(st.sampled_from(types))
    sbs = draw(st.integers(0, 2 * bs))
    if kind == "lsh" and sf > 1 and not random_lsh:
        sbs = sf
    layout = AttentionLayout(num_global_tokens=draw(st.integers(1, 5)), block_size=bs, sparse_block_size=sbs,
                             sparsity_factor=sf, sparsity_type=kind,
                             lsh_num_pre_rounds=draw(st.integers(0, 2)))
    if long_only or draw(st.integers(0, 3)):
        t = bs * draw(st.integers(3, max(3, 48 // bs)))
    else:
        t = draw(st.integers(1, 2 * bs))
    n, h, d = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    qkv = torch.randn(3, n, h, layout.num_global_tokens + t, d, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        lengths = torch.randint(1, t + 1, (n, 1), generator=generator)
        token_mask = torch.arange(t) < lengths
    else:
        token_mask = torch.rand(n, t, generator=generator) < draw(st.sampled_from([0.2, 0.5, 0.9]))
        token_mask[:, 0] = True
    scale = draw(st.sampled_from([None, 0.7]))
    return Case(layout, *qkv, token_mask, scale)


def run(case: Case, **kwargs: object) -> torch.Tensor:
    return lsg_attention(case.query, case.key, case.value, case.mask(), case.layout, scale=case.scale, **kwargs)


def oracle(case: Case, causal: bool = False) -> torch.Tensor:
    return oracle_attention(case.query, case.key, case.value, case.token_mask, case.layout, causal=causal,
                            scale=case.scale)


@pytest.mark.parametrize("kind", EXACT_TYPES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_matches_oracle(kind: str, data: st.DataObject) -> None:
    case = data.draw(cases(types=[kind]))
    torch.testing.assert_close(run(case), oracle(case), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", EXACT_TYPES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_causal_matches_oracle(kind: str, data: st.DataObject) -> None:
    case = data.draw(cases(types=[kind]))
    torch.testing.assert_close(run(case, causal=True), oracle(case, causal=True), atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(cases(types=EXACT_TYPES + ["lsh"] * 4, long_only=True, random_lsh=True), st.integers(0, 2**31),
       st.booleans())
def test_masked_keys_do_not_matter(case: Case, seed: int, causal: bool) -> None:
    """Any values at masked key positions leave every output row unchanged (lsh included, same seed);
    lsh is reproducible under torch.manual_seed."""
    mask = case.mask()
    torch.manual_seed(seed)
    out = lsg_attention(case.query, case.key, case.value, mask, case.layout, causal=causal)
    masked = torch.cat([torch.zeros_like(case.token_mask[:, :case.layout.num_global_tokens]),
                        ~case.token_mask], dim=1)[:, None, :, None]
    noise = 1e3 * torch.randn_like(case.key)
    torch.manual_seed(seed)
    again = lsg_attention(case.query, torch.where(masked, noise, case.key), torch.where(masked, -noise, case.value),
                          mask, case.layout, causal=causal)
    assert out.shape == case.query.shape
    torch.testing.assert_close(again, out, atol=1e-12, rtol=1e-12)


@settings(max_examples=10, deadline=None)
@given(cases(types=["lsh"], long_only=True, random_lsh=True), st.integers(0, 2**31))
def test_lsh_reproducible_under_seed(case: Case, seed: int) -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(seed)
        outs.append(run(case))
    assert outs[0].shape == case.query.shape and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def small_case(kind: str, dtype: torch.dtype = torch.float64, requires_grad: bool = False) -> Case:
    layout = AttentionLayout(num_global_tokens=1, block_size=2, sparse_block_size=2, sparsity_factor=2,
                             sparsity_type=kind)
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 7, 3, generator=generator, dtype=torch.float64).to(dtype)
    token_mask = torch.tensor([[True, True, True, False, True, False]])
    return Case(layout, *(x.requires_grad_(requires_grad) for x in (q, k, v)), token_mask, None)


@pytest.mark.parametrize("kind,causal", [("bos_pooling", False), ("pooling", True), ("stride", False)])
def test_gradcheck(kind: str, causal: bool) -> None:
    case = small_case(kind, requires_grad=True)
    mask = case.mask()
    assert torch.autograd.gradcheck(
        lambda q, k, v: lsg_attention(q, k, v, mask, case.layout, causal=causal), (case.query, case.key, case.value))


def test_dropout_runs() -> None:
    case = small_case("norm", requires_grad=True)
    torch.manual_seed(0)
    out = run(case, dropout_p=0.5)
    out.sum().backward()
    assert out.shape == case.query.shape and torch.isfinite(out).all() and torch.isfinite(case.query.grad).all()
    assert not torch.allclose(out, run(case))


def test_dropout_recomputed_in_backward_gives_the_gradient_of_the_sampled_forward(monkeypatch) -> None:
    """With dropout the product recomputes the probabilities in the backward (checkpoint, same random state);
    outputs and gradients must equal those of one plain autograd pass over the same dropout sample."""
    from lsg_patch.attention import product

    case = small_case("norm", requires_grad=True)
    mask = case.mask()

    def sampled(seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        torch.manual_seed(seed)
        out = lsg_attention(case.query, case.key, case.value, mask, case.layout, dropout_p=0.3)
        return out, torch.autograd.grad(out.square().sum(), (case.query, case.key, case.value))

    out, grads = sampled(7)
    monkeypatch.setattr(product, "checkpoint", lambda function, *args, **kwargs: function(*args))
    expected, expected_grads = sampled(7)
    assert torch.equal(out, expected)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_lower_precision(dtype: torch.dtype, atol: float) -> None:
    case = small_case("bos_pooling", dtype)
    expected = oracle(case)
    out = run(case)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


def test_rejects_length_not_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match="block_size=4"):
        prepare_mask(torch.ones(1, 13, dtype=torch.bool), AttentionLayout(block_size=4))


def test_odd_step_after_window_overlaps_local_window() -> None:
    """sparsity_factor == block_size gives step 1 (odd): the after window of block i starts 2 items early, at
    (i+2)*1 - 2. With sparse_block_size 3, block 1 (tokens 4..7) gets items 1, 2, 3; items 1 and 2 pool
    tokens 4..11 of its own local window, which it therefore sees twice. Its before window [-3, 0) is empty."""
    layout = AttentionLayout(num_global_tokens=1, block_size=4, sparse_block_size=3, sparsity_factor=4,
                             sparsity_type="pooling")
    row = attended_keys(layout, 16)[1 + 4]
    assert [k for k in row if k[1] == "sparse"] == [(1, "sparse"), (2, "sparse"), (3, "sparse")]
    assert [k for k in row if k[1] == "local"] == [(i, "local") for i in range(0, 12)]
