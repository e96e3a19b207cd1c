"""Property tests of lsg_attention against the dense oracle (tests/oracle.py)."""
from __future__ import annotations

from functools import partial
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsg_patch.attention import AttentionLayout, lsg_attention, prepare_mask, sparse  # sparse: module
from lsg_patch.attention.sparse import chunk_size, lsh_hyperplanes, lsh_items, sparse_items
from tests.helpers import EXACT_TYPES, Case
from tests.helpers import attention_cases as cases
from tests.oracle import attended_keys, norm_chunk, oracle_attention, oracle_lsh_items

def run(case: Case, **kwargs: object) -> torch.Tensor:
    return lsg_attention(case.query, case.key, case.value, case.mask(), case.layout, scale=case.scale, **kwargs)


def oracle(case: Case, causal: bool = False) -> torch.Tensor:
    return oracle_attention(case.query, case.key, case.value, case.token_mask, case.layout, causal=causal,
                            scale=case.scale)


@pytest.mark.parametrize("kind", EXACT_TYPES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_matches_oracle(kind: str, data: st.DataObject) -> None:
    """Inference (the blocked kernel on the CPU) and a forward that will take gradients (the flash kernel)."""
    case = data.draw(cases(types=[kind]))
    expected = oracle(case)
    torch.testing.assert_close(run(case), expected, atol=1e-10, rtol=1e-10)
    training = Case(case.layout, *(x.clone().requires_grad_() for x in (case.query, case.key, case.value)),
                    case.token_mask, case.scale)
    torch.testing.assert_close(run(training).detach(), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", EXACT_TYPES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_causal_matches_oracle(kind: str, data: st.DataObject) -> None:
    case = data.draw(cases(types=[kind]))
    torch.testing.assert_close(run(case, causal=True), oracle(case, causal=True), atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(cases(types=EXACT_TYPES + ["lsh"] * 4, long_only=True), st.booleans())
def test_masked_keys_do_not_matter(case: Case, causal: bool) -> None:
    """Any values at masked key positions leave every output row unchanged (lsh included: its planes are
    seeded, so no global RNG state has to be restored between the calls)."""
    mask = case.mask()
    out = lsg_attention(case.query, case.key, case.value, mask, case.layout, causal=causal)
    masked = torch.cat([torch.zeros_like(case.token_mask[:, :case.layout.num_global_tokens]),
                        ~case.token_mask], dim=1)[:, None, :, None]
    noise = 1e3 * torch.randn(case.key.shape, dtype=case.key.dtype, generator=torch.Generator().manual_seed(0))
    again = lsg_attention(case.query, torch.where(masked, noise, case.key), torch.where(masked, -noise, case.value),
                          mask, case.layout, causal=causal)
    assert out.shape == case.query.shape
    torch.testing.assert_close(again, out, atol=1e-12, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(cases(hashing=True), st.booleans(), st.integers(0, 2**31))
def test_lsh_matches_oracle(case: Case, causal: bool, seed: int) -> None:
    """lsh that really hashes, against the oracle's bucket-by-bucket clustering with the planes of the seed the
    product is given."""
    expected = oracle_attention(case.query, case.key, case.value, case.token_mask, case.layout, causal=causal,
                                scale=case.scale, lsh_seed=seed)
    torch.testing.assert_close(run(case, causal=causal, lsh_seed=seed), expected, atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(cases(hashing=True), st.integers(0, 2**31), st.booleans())
def test_lsh_items_match_the_oracle_item_by_item(case: Case, seed: int, one_hot: bool) -> None:
    """Every lsh item in its place (the bucket index is the item's position in its chunk, which the attention
    only shows where a window edge cuts a chunk), with its mask; for any seed, and with the bucket sums of
    CPUs (scatter_add) and of GPUs (one-hot product)."""
    keys, values = case.key[:, :, case.layout.num_global_tokens:], case.value[:, :, case.layout.num_global_tokens:]
    planes = lsh_hyperplanes(case.layout, keys.shape[1], keys.shape[-1], seed=seed, dtype=keys.dtype,
                             device=keys.device)
    with mock.patch.object(sparse, "_bucket_sum", partial(sparse._bucket_sum, one_hot=one_hot)):
        items = sparse_items(keys[:, :, 0], keys, values, case.token_mask, case.layout, 1.0, lsh_seed=seed)
    expected_keys, expected_values, expected_valid = oracle_lsh_items(keys, values, case.token_mask, case.layout,
                                                                      planes)
    assert torch.equal(items.mask, expected_valid)
    torch.testing.assert_close(items.keys, expected_keys, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(items.values, expected_values, atol=1e-10, rtol=1e-10)


@settings(max_examples=10, deadline=None)
@given(cases(hashing=True))
def test_lsh_gpu_bucket_sums_match_the_oracle(case: Case) -> None:
    """The one-hot bucket sums that GPUs run (scatter_add is not reproducible there), forced on CPU."""
    with mock.patch.object(sparse, "_bucket_sum", partial(sparse._bucket_sum, one_hot=True)):
        out = run(case)
    torch.testing.assert_close(out, oracle(case), atol=1e-10, rtol=1e-10)


@settings(max_examples=10, deadline=None)
@given(cases(hashing=True), st.booleans(), st.integers(0, 2**31))
def test_lsh_eval_calls_are_bit_identical(case: Case, causal: bool, seed: int) -> None:
    """Two calls on the same input give the same bits whatever the global RNG does in between, and a call
    neither reads nor advances the global RNG (the planes come from their own seeded generator)."""
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = run(case, causal=causal, lsh_seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    torch.randn(100)
    assert torch.equal(run(case, causal=causal, lsh_seed=seed), first)


def test_lsh_hyperplanes_are_seeded() -> None:
    """One (heads, 1, d, max(buckets // 2, 1)) tensor per round (pre-rounds into c buckets, last into c / sf);
    equal for equal seeds, different for different seeds, the same values in every dtype; and sparse_items and
    lsg_attention hash with the planes of their lsh_seed."""
    layout = AttentionLayout(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type="lsh",
                             lsh_num_pre_rounds=2)
    planes = lsh_hyperplanes(layout, 3, 5, seed=0, dtype=torch.float64, device="cpu")
    assert [tuple(p.shape) for p in planes] == [(3, 1, 5, 4), (3, 1, 5, 4), (3, 1, 5, 2)]
    assert all(p.dtype == torch.float64 for p in planes)
    again = lsh_hyperplanes(layout, 3, 5, seed=0, dtype=torch.float64, device="cpu")
    other = lsh_hyperplanes(layout, 3, 5, seed=1, dtype=torch.float64, device="cpu")
    single = lsh_hyperplanes(layout, 3, 5, seed=0, dtype=torch.float32, device="cpu")
    for plane, same, different, float32 in zip(planes, again, other, single):
        assert torch.equal(plane, same)
        assert not torch.equal(plane, different)
        assert torch.equal(plane, float32.double())
    assert len({p.sum().item() for p in planes}) == 3  # rounds draw fresh planes, not one repeated tensor
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 3, 32, 5, generator=generator, dtype=torch.float64)
    token_mask = torch.rand(2, 32, generator=generator) < 0.8
    query_first = keys[:, :, 0]
    for seed in (0, 1):
        items = sparse_items(query_first, keys, values, token_mask, layout, 1.0, lsh_seed=seed)
        expected = lsh_items(keys, values, token_mask, layout,
                             lsh_hyperplanes(layout, 3, 5, seed=seed, dtype=torch.float64, device="cpu"))
        assert all(torch.equal(x, y) for x, y in zip(items, expected))
    default = sparse_items(query_first, keys, values, token_mask, layout, 1.0)
    assert torch.equal(default.keys, sparse_items(query_first, keys, values, token_mask, layout, 1.0,
                                                  lsh_seed=0).keys)
    assert not torch.equal(default.keys, items.keys)
    qkv = torch.randn(3, 2, 3, layout.num_global_tokens + 32, 5, generator=generator, dtype=torch.float64)
    mask = prepare_mask(token_mask, layout)
    outputs = [lsg_attention(*qkv, mask, layout, lsh_seed=seed) for seed in (0, 0, 1)]
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])
    assert torch.equal(lsg_attention(*qkv, mask, layout), outputs[0])  # the default seed is 0


@settings(max_examples=30, deadline=None)
@given(cases(types=EXACT_TYPES + ["lsh"] * 2), st.data())
def test_causal_rows_do_not_see_later_tokens(case: Case, data: st.DataObject) -> None:
    """Causality from its definition, without any oracle: changing the queries, keys and values of the tokens
    after position p leaves the global rows and the rows of tokens 0..p unchanged."""
    g, t = case.layout.num_global_tokens, case.token_mask.shape[1]
    p = data.draw(st.integers(0, t - 1))
    out = run(case, causal=True)
    later = torch.arange(g + t)[:, None] > g + p
    noise = 10 * torch.randn(3, *case.query.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    changed = Case(case.layout, *(torch.where(later, x + e, x) for x, e in zip((case.query, case.key, case.value),
                                                                               noise)), case.token_mask, case.scale)
    again = run(changed, causal=True)
    torch.testing.assert_close(again[:, :, :g + p + 1], out[:, :, :g + p + 1], atol=1e-12, rtol=1e-12)
    assert (p == t - 1) == torch.equal(changed.key, case.key)  # something did change, unless p is the last token


def test_oracle_chunk_rule() -> None:
    """The oracle's chunk of norm and lsh is the reference's min(block_size, sparse_block_size) wherever that is
    a valid chunk (a multiple of sparsity_factor dividing block_size), and the same as the product's always."""
    for bs in range(1, 25):
        for sf in (f for f in range(1, bs + 1) if bs % f == 0):
            for sbs in range(0, 2 * bs + 1):
                layout = AttentionLayout(block_size=bs, sparse_block_size=sbs, sparsity_factor=sf)
                c, reference = norm_chunk(layout), min(bs, sbs)
                assert c % sf == 0 and bs % c == 0 and sf <= c <= max(reference, sf)
                if reference % sf == 0 and reference > 0 and bs % reference == 0:
                    assert c == reference
                assert c == chunk_size(layout), layout


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
