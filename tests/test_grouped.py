"""Grouped-query attention without repeated keys: on LSG's full-attention path (at most two blocks, without dropout,
SDPA shares the key heads) and on its block path (the blocked kernel stacks the query heads of one key head, for the
sparsity types whose side keys depend on the key head alone; the others repeat the keys).

Oracle: tests/oracle.py's float64 LSG attention, per head, on keys repeated to the query heads here; with
dropout, the product on repeated keys and the same seed (itself checked against the dropout oracle in
tests/test_dropout.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lsg_patch
from lsg_patch.attention import AttentionLayout, backends, lsg_attention, prepare_mask
from lsg_patch.attention.product import KEY_HEAD_KINDS
from lsg_patch.attention.sparse import sparse_kind
from tests.oracle import oracle_attention
from tests.helpers import LOCAL_LSG as LSG
from tests.helpers import MAX_LENGTH, oracle_hidden
from tests.tiny_models import build


GROUPS = [(2, 1), (4, 2), (4, 1), (6, 3)]  # (query heads, key heads)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """Inputs that take the full-attention path (at most two blocks), padded rows."""
    heads, kv_heads = draw(st.sampled_from(GROUPS))
    layout = AttentionLayout(num_global_tokens=draw(st.integers(1, 3)), block_size=8, sparse_block_size=0,
                             sparsity_type="none")
    tokens, batch = draw(st.integers(1, 16)), draw(st.integers(1, 2))
    token_mask = torch.stack([torch.arange(tokens) < draw(st.integers(1, tokens)) for _ in range(batch)])
    return dict(heads=heads, kv_heads=kv_heads, layout=layout, token_mask=token_mask, causal=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


def grouped_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 query (heads) and key / value (kv_heads) leaves of the case."""
    layout, token_mask = case["layout"], case["token_mask"]
    batch, length = token_mask.shape[0], layout.num_global_tokens + token_mask.shape[1]
    generator = torch.Generator().manual_seed(case["seed"])
    query = torch.randn(batch, case["heads"], length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    key, value = (torch.randn(batch, case["kv_heads"], length, 8, generator=generator, dtype=torch.float64,
                              requires_grad=True) for _ in range(2))
    return query, key, value


def repeated(case: dict, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.repeat_interleave(case["heads"] // case["kv_heads"], 1) for x in tensors]


def assert_same_with_gradients(got: torch.Tensor, expected: torch.Tensor, leaves: tuple[torch.Tensor, ...],
                               atol: float) -> None:
    """Outputs, and the gradients of the leaves for one random upstream gradient, equal to atol."""
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    upstream = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(0))
    for grad, expected_grad in zip(torch.autograd.grad(got, leaves, upstream),
                                   torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=atol)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_full_path_matches_the_oracle_on_repeated_keys_forward_and_gradients(case: dict) -> None:
    layout, token_mask, causal = case["layout"], case["token_mask"], case["causal"]
    query, key, value = grouped_inputs(case)
    got = lsg_attention(query, key, value, prepare_mask(token_mask, layout), layout, causal=causal, scale=0.4)
    expected = oracle_attention(query, *repeated(case, key, value), token_mask, layout, causal=causal, scale=0.4)
    assert_same_with_gradients(got, expected, (query, key, value), 1e-12)



@st.composite
def block_cases(draw: st.DrawFn) -> dict:
    """Inputs that take the block path (more than two blocks), every sparsity type, padded rows."""
    heads, kv_heads = draw(st.sampled_from(GROUPS))
    block = draw(st.sampled_from([4, 8]))
    factor = draw(st.sampled_from([1, 2, 4]))
    layout = AttentionLayout(num_global_tokens=draw(st.integers(1, 3)), block_size=block,
                             sparse_block_size=draw(st.sampled_from([0, block // 2, block])), sparsity_factor=factor,
                             sparsity_type=draw(st.sampled_from(["norm", "pooling", "stride", "block_stride", "lsh",
                                                                 "bos_pooling"])))
    tokens, batch = block * draw(st.integers(3, 6)), draw(st.integers(1, 2))
    token_mask = torch.stack([torch.arange(tokens) < draw(st.integers(1, tokens)) for _ in range(batch)])
    return dict(heads=heads, kv_heads=kv_heads, layout=layout, token_mask=token_mask, causal=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


@settings(max_examples=40, deadline=None)
@given(block_cases())
def test_block_path_matches_the_oracle_on_repeated_keys(case: dict) -> None:
    layout, token_mask, causal = case["layout"], case["token_mask"], case["causal"]
    query, key, value = grouped_inputs(case)
    got = lsg_attention(query, key, value, prepare_mask(token_mask, layout), layout, causal=causal, scale=0.4)
    expected = oracle_attention(query, *repeated(case, key, value), token_mask, layout, causal=causal, scale=0.4)
    assert_same_with_gradients(got, expected, (query, key, value), 1e-10)


@settings(max_examples=25, deadline=None)
@given(block_cases())
def test_block_path_dropout_is_that_of_repeated_keys(case: dict) -> None:
    """The keep-mask is a function of the query head: sharing a key head changes nothing."""
    layout, token_mask, causal = case["layout"], case["token_mask"], case["causal"]
    query, key, value = grouped_inputs(case)
    mask = prepare_mask(token_mask, layout)
    outputs = []
    for keys in ((key, value), repeated(case, key, value)):
        torch.manual_seed(case["seed"])
        outputs.append(lsg_attention(query, *keys, mask, layout, causal=causal, scale=0.4, dropout_p=0.3))
    assert_same_with_gradients(outputs[0], outputs[1], (query, key, value), 1e-12)


def repeat_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every `Tensor.repeat_interleave` call from now on."""
    calls: list[int] = []
    original = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("backend", ["auto", "portable"])
@pytest.mark.parametrize("kind", ["none", "norm", "pooling", "stride", "lsh"])
@pytest.mark.parametrize("blocks", [2, 4])
def test_keys_are_shared_where_the_side_keys_allow_it_and_the_blocked_kernel_runs(
        kind: str, backend: str, dropout: float, blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel choice shares grouped keys on the CPU's default backend and with dropout on the block path; the
    portable path (CUDA's) repeats them without dropout, where SDPA on repeated keys is the faster kernel; types with
    per-query-head side keys always do. On the full path (at most two blocks) SDPA shares them without dropout.
    The product follows the choice: it repeats the keys exactly when the choice does not share them."""
    monkeypatch.setenv(backends.BACKEND_VARIABLE, backend)
    layout = AttentionLayout(num_global_tokens=1, block_size=8, sparse_block_size=8, sparsity_factor=2,
                             sparsity_type=kind)
    block_path = blocks > 2
    choice = backends.choose_kernel(backends.AttentionCall(
        device=torch.device("cpu"), block_path=block_path, dropout=dropout > 0, grouped_keys=True,
        side_keys_per_key_head=sparse_kind(layout) in KEY_HEAD_KINDS))
    if block_path:
        expected = sparse_kind(layout) in KEY_HEAD_KINDS and (backend == "auto" or dropout > 0)
    else:
        expected = dropout == 0
    assert choice.shares_key_heads == expected
    repeats = repeat_calls(monkeypatch)
    query, key, value = (torch.randn(1, heads, 1 + 8 * blocks, 8, generator=torch.Generator().manual_seed(seed))
                          for seed, heads in enumerate((4, 2, 2)))
    lsg_attention(query, key, value, prepare_mask(torch.ones(1, 8 * blocks, dtype=torch.bool), layout), layout,
                  dropout_p=dropout)
    assert bool(repeats) != choice.shares_key_heads


def test_mismatched_heads_are_refused() -> None:
    layout = AttentionLayout(num_global_tokens=1, block_size=8, sparse_block_size=8, sparsity_type="norm")
    mask = prepare_mask(torch.ones(1, 32, dtype=torch.bool), layout)
    with pytest.raises(ValueError, match="6 query heads cannot share 4 key and 4 value heads"):
        lsg_attention(torch.zeros(1, 6, 33, 4), torch.zeros(1, 4, 33, 4), torch.zeros(1, 4, 33, 4), mask, layout)
    with pytest.raises(ValueError, match="4 query heads cannot share 2 key and 4 value heads"):
        lsg_attention(torch.zeros(1, 4, 33, 4), torch.zeros(1, 2, 33, 4), torch.zeros(1, 4, 33, 4), mask, layout)


@pytest.mark.parametrize(("model_type", "causal"), [("llama", True), ("qwen2", True), ("eurobert", False)])
def test_grouped_models_share_keys_on_short_inputs_and_match_the_dense_oracle(
        model_type: str, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = build(model_type, "Model", attn_implementation="sdpa")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    ids = torch.randint(5, 99, (2, 14), generator=torch.Generator().manual_seed(0))  # 14 <= 2 blocks of 8
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0
    shared, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: shared.append(kwargs.get("enable_gqa")) or sdpa(*args, **kwargs))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        calls = list(shared)
        expected = oracle_hidden(plain, model, ids, mask, causal)
    assert calls == [True] * plain.config.num_hidden_layers
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :9], expected[1, :9], rtol=0, atol=1e-5)
