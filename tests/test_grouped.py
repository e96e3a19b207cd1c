"""Grouped-query attention on LSG's full-attention path (at most two blocks) without repeated keys.

Oracle: tests/oracle.py's float64 LSG attention, per head, on keys repeated to the query heads here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsg_patch
from lsg_patch.attention import AttentionLayout, prepare_mask
from lsg_patch.attention.grouped import grouped_full_attention
from lsg_patch.seam import interface
from tests.oracle import oracle_attention
from tests.test_architectures import build
from tests.test_decoders import LSG, MAX_LENGTH, oracle_hidden


@st.composite
def cases(draw: st.DrawFn) -> dict:
    heads, kv_heads = draw(st.sampled_from([(2, 1), (4, 2), (4, 1), (6, 3)]))
    layout = AttentionLayout(num_global_tokens=draw(st.integers(1, 3)), block_size=8, sparse_block_size=0,
                             sparsity_type="none")
    tokens, batch = draw(st.integers(1, 16)), draw(st.integers(1, 2))
    token_mask = torch.stack([torch.arange(tokens) < draw(st.integers(1, tokens)) for _ in range(batch)])
    return dict(heads=heads, kv_heads=kv_heads, layout=layout, token_mask=token_mask, causal=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_matches_the_oracle_on_repeated_keys_forward_and_gradients(case: dict) -> None:
    layout, token_mask = case["layout"], case["token_mask"]
    batch, length = token_mask.shape[0], layout.num_global_tokens + token_mask.shape[1]
    generator = torch.Generator().manual_seed(case["seed"])
    query = torch.randn(batch, case["heads"], length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    key, value = (torch.randn(batch, case["kv_heads"], length, 8, generator=generator, dtype=torch.float64,
                              requires_grad=True) for _ in range(2))
    got = grouped_full_attention(query, key, value, prepare_mask(token_mask, layout), layout.num_global_tokens,
                                 causal=case["causal"], scale=0.4)
    groups = case["heads"] // case["kv_heads"]
    expected = oracle_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                token_mask, layout, causal=case["causal"], scale=0.4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(got)
    for grad, expected_grad in zip(torch.autograd.grad(got, (query, key, value), upstream),
                                   torch.autograd.grad(expected, (query, key, value), upstream)):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_the_block_path_is_refused() -> None:
    layout = AttentionLayout(num_global_tokens=1, block_size=8, sparse_block_size=0, sparsity_type="none")
    mask = prepare_mask(torch.ones(1, 24, dtype=torch.bool), layout)
    with pytest.raises(ValueError, match="24 tokens take LSG's block path"):
        grouped_full_attention(*(torch.zeros(1, 2, 25, 4) for _ in range(3)), mask, 1)


@pytest.mark.parametrize(("model_type", "causal"), [("llama", True), ("qwen2", True), ("eurobert", False)])
def test_grouped_models_take_it_on_short_inputs_and_match_the_dense_oracle(
        model_type: str, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(interface, "grouped_full_attention",
                        lambda *args, **kwargs: calls.append(1) or grouped_full_attention(*args, **kwargs))
    plain = build(model_type, "Model", attn_implementation="sdpa")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    ids = torch.randint(5, 99, (2, 14), generator=torch.Generator().manual_seed(0))  # 14 <= 2 blocks of 8
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = oracle_hidden(plain, model, ids, mask, causal)
    assert len(calls) == plain.config.num_hidden_layers
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :9], expected[1, :9], rtol=0, atol=1e-5)
