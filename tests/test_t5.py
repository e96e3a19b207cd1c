"""T5-style relative position bias inside LSG key sets (docs/LSG_SPEC.md section 7c).

The product's bias is checked against the dense oracle, which adds T5's own bucket formula
(`T5Attention._relative_position_bucket`) to the scores of the keys it lists for every row.
"""
from __future__ import annotations

import os
from functools import partial
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.t5.modeling_t5 import T5Attention

from lsg_patch.attention import RelativeBias, lsg_attention
from lsg_patch.attention.backends import BACKEND_VARIABLE
from tests.oracle import oracle_attention
from tests.test_attention_product import EXACT_TYPES, Case, cases


def t5_bias(heads: int, num_buckets: int, max_distance: int, seed: int) -> RelativeBias:
    table = torch.randn(num_buckets, heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bucket = partial(T5Attention._relative_position_bucket, bidirectional=True, num_buckets=num_buckets,
                     max_distance=max_distance)
    return RelativeBias(table, bucket)


def oracle_bias(bias: RelativeBias):
    """The oracle's bias(head, distance): T5's bucket of one distance, looked up in the table."""
    return lambda head, distance: float(bias.table[int(bias.bucket(torch.tensor(distance))), head])


# T5's formula divides by log(max_distance / max_exact), max_exact = num_buckets // 4: max_distance must exceed it
buckets = st.sampled_from([4, 8, 32]).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(n // 4 + 1, 160), st.integers(0, 2**31)))


@pytest.mark.parametrize("backend", ["cpu_fused", "portable"])
@pytest.mark.parametrize("kind", EXACT_TYPES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_bias_matches_the_oracle(backend: str, kind: str, data: st.DataObject) -> None:
    case: Case = data.draw(cases(types=[kind]))
    num_buckets, max_distance, seed = data.draw(buckets)
    bias = t5_bias(case.query.shape[1], num_buckets, max_distance, seed)
    with mock.patch.dict(os.environ, {BACKEND_VARIABLE: backend}):
        got = lsg_attention(case.query, case.key, case.value, case.mask(), case.layout, scale=case.scale, bias=bias)
    want = oracle_attention(case.query, case.key, case.value, case.token_mask, case.layout, scale=case.scale,
                            bias=oracle_bias(bias))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(cases(long_only=True), buckets)
def test_bias_table_gets_the_oracle_gradient(case: Case, bucket_settings: tuple[int, int, int]) -> None:
    bias = t5_bias(case.query.shape[1], *bucket_settings)
    table = bias.table.clone().requires_grad_()
    got = lsg_attention(case.query, case.key, case.value, case.mask(), case.layout, scale=case.scale,
                        bias=RelativeBias(table, bias.bucket))
    weights = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((got * weights).sum(), table)
    oracle_table = bias.table.clone().requires_grad_()

    def differentiable(head: int, distance: int) -> torch.Tensor:
        return oracle_table[int(bias.bucket(torch.tensor(distance))), head]

    want = oracle_attention(case.query, case.key, case.value, case.token_mask, case.layout, scale=case.scale,
                            bias=differentiable)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), oracle_table)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)

