"""Attention dropout against a dense float64 oracle that applies the documented keep-mask (lsg_patch/attention/
dropout.py) row by row, and the properties the definition promises: independent of blocking and threads,
reproducible through torch.manual_seed and gradient checkpointing, device-neutral, with the right keep rate.

The oracle shares nothing with the product but the key lists of tests/oracle.py: it hashes every (seed, batch,
head, query row, key identity) with Python integers, straight from the definition in the module docstring.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

import lsg_patch
from lsg_patch.attention import AttentionLayout, backends, blocked, lsg_attention, prepare_mask, product
from tests.oracle import _after_window, _before_window, _source, _sparse_index, _sparse_items
from tests.tiny_models import tiny_model

TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh"]
MASK32 = 0xFFFFFFFF


def _fmix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def oracle_keep(seed: int, batch: int, head: int, row: int, key_id: int, p: float) -> bool:
    """The keep decision of one score, from the definition (unsigned 32-bit arithmetic on Python ints)."""
    row_code = _fmix(_fmix(_fmix(_fmix(seed) ^ batch) ^ head) ^ row)
    x = row_code ^ _fmix(key_id ^ 0x9E3779B9)
    x = (x * 0x85EBCA6B) & MASK32
    x ^= x >> 16
    x = (x * 0xC2B2AE35) & MASK32
    return (x ^ 0x80000000) >= math.floor(p * 2**32)


def keys_with_ids(layout: AttentionLayout, t: int, row: int, head: int, causal: bool) -> list[tuple[int, int]]:
    """(row of the oracle's bank [globals; tokens; items], key identity) of every key of one query row: a global
    j is j, token p is G + p, sparse item j is G + T + j (its item index, whatever the sparsity type)."""
    g, bs = layout.num_global_tokens, layout.block_size
    globals_ = [(i, i) for i in range(g)]
    if row < g:
        return globals_ if causal else globals_ + [(g + i, g + i) for i in range(t)]
    p = row - g
    if t <= 2 * bs:
        return globals_ + [(g + i, g + i) for i in range(p + 1 if causal else t)]
    block = p // bs
    items = _before_window(layout, t, block) + ([] if causal else _after_window(layout, t, block))
    sparse = [(_source(layout, t, (_sparse_index(layout, j, head), "sparse")), g + t + j) for j in items]
    last = p + 1 if causal else min((block + 2) * bs, t)
    return globals_ + sparse + [(g + i, g + i) for i in range(max(0, (block - 1) * bs), last)]


def oracle_dropout_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_mask: torch.Tensor,
                             layout: AttentionLayout, seed: int, p: float, *, causal: bool = False,
                             scale: float | None = None) -> torch.Tensor:
    """Float64 LSG attention with dropout p applied to each row's softmax by `oracle_keep`."""
    query, key, value = query.double(), key.double(), value.double()
    n, h, length, d = query.shape
    g, t = layout.num_global_tokens, length - layout.num_global_tokens
    scale = 1 / math.sqrt(d) if scale is None else scale
    rows = []
    for b in range(n):
        valid = [bool(x) for x in token_mask[b]]
        heads = []
        for head in range(h):
            items = _sparse_items(query[b, head, g], key[b, head, g:], value[b, head, g:], valid, layout, scale,
                                  None)
            keys, values = torch.cat([key[b, head], items[0]]), torch.cat([value[b, head], items[1]])
            allowed = [True] * g + valid + items[2]
            head_rows = []
            for row in range(length):
                sources, ids = zip(*keys_with_ids(layout, t, row, head, causal))
                scores = keys[list(sources)] @ query[b, head, row] * scale
                scores = scores.masked_fill(~torch.tensor([allowed[s] for s in sources]), -math.inf)
                keep = torch.tensor([oracle_keep(seed, b, head, row, i, p) for i in ids], dtype=torch.float64)
                head_rows.append(scores.softmax(-1) * keep / (1 - p) @ values[list(sources)])
            heads.append(torch.stack(head_rows))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    bs = draw(st.sampled_from([2, 3, 4, 8]))
    sf = draw(st.sampled_from([f for f in range(1, bs + 1) if bs % f == 0]))
    kind = draw(st.sampled_from([k for k in TYPES if k != "lsh"]))  # lsh: a test of its own hashing elsewhere
    layout = AttentionLayout(num_global_tokens=draw(st.integers(1, 3)), block_size=bs,
                             sparse_block_size=draw(st.integers(0, 2 * bs)), sparsity_factor=sf, sparsity_type=kind)
    t = bs * draw(st.integers(1, max(1, 24 // bs)))
    n, h, d = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    qkv = torch.randn(3, n, h, layout.num_global_tokens + t, d, generator=generator, dtype=torch.float64)
    token_mask = torch.rand(n, t, generator=generator) < 0.8
    token_mask[:, 0] = True
    upstream = torch.randn(n, h, layout.num_global_tokens + t, d, generator=generator, dtype=torch.float64)
    return layout, qkv, token_mask, upstream, draw(st.sampled_from([None, 0.7]))


def _with_seed(seed: int):
    return mock.patch.object(product, "draw_seed", lambda: seed)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the oracle's norm ranking
@settings(max_examples=40, deadline=None)
@given(cases(), st.booleans(), st.integers(0, 2**32 - 1), st.sampled_from([0.1, 0.5, 0.9]))
def test_outputs_and_gradients_match_the_dense_oracle(case: tuple, causal: bool, seed: int, p: float) -> None:
    """Every path (full attention for short inputs, blocks otherwise), causal or not, padded, odd steps whose
    after window repeats keys: the same outputs and q/k/v gradients as the oracle at 1e-10 in float64."""
    layout, qkv, token_mask, upstream, scale = case
    results = []
    for attention in (
        lambda q, k, v: lsg_attention(q, k, v, prepare_mask(token_mask, layout), layout, dropout_p=p,
                                      causal=causal, scale=scale),
        lambda q, k, v: oracle_dropout_attention(q, k, v, token_mask, layout, seed, p, causal=causal, scale=scale),
    ):
        inputs = [x.clone().requires_grad_() for x in qkv]
        with _with_seed(seed):
            out = attention(*inputs)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), inputs)))
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def _long_case(kind: str = "norm", t: int = 64, causal: bool = False) -> tuple:
    layout = AttentionLayout(num_global_tokens=2, block_size=8, sparse_block_size=8, sparsity_factor=2,
                             sparsity_type=kind)
    generator = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2, 3, 2 + t, 5, generator=generator, dtype=torch.float64, requires_grad=True)
           for _ in range(3)]
    token_mask = torch.arange(t) < torch.tensor([[t], [t - 11]])
    return layout, qkv, prepare_mask(token_mask, layout)


def _sampled(layout, qkv, mask, p: float = 0.3, causal: bool = False) -> tuple[torch.Tensor, ...]:
    out = lsg_attention(*qkv, mask, layout, dropout_p=p, causal=causal)
    return (out, *torch.autograd.grad(out.square().sum(), qkv))


@pytest.mark.parametrize("kind", TYPES)
def test_the_blocking_and_the_thread_count_do_not_change_the_pattern(kind: str) -> None:
    """Chunks of one block and of the whole sequence, one thread and two: the same outputs and gradients."""
    layout, qkv, mask = _long_case(kind)
    results = []
    threads = torch.get_num_threads()
    for chunk, count in ((1, 1), (1 << 30, 2), (700, 1)):
        with mock.patch.object(blocked, "CHUNK_SCORES", chunk), _with_seed(12345):
            torch.set_num_threads(count)
            try:
                results.append(_sampled(layout, qkv, mask))
            finally:
                torch.set_num_threads(threads)
    for other in results[1:]:
        for ours, expected in zip(other, results[0]):
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_the_seed_comes_from_the_default_generator() -> None:
    """torch.manual_seed makes a call reproducible; the next call draws another pattern; eval-style calls
    without dropout neither read nor advance the generator."""
    layout, qkv, mask = _long_case()
    torch.manual_seed(3)
    first = _sampled(layout, qkv, mask)
    second = _sampled(layout, qkv, mask)
    torch.manual_seed(3)
    again = _sampled(layout, qkv, mask)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], second[0])
    state = torch.get_rng_state()
    lsg_attention(*qkv, mask, layout)
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_probability_is_validated() -> None:
    layout, qkv, mask = _long_case()
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"dropout_p must be in \\[0, 1\\), got {p}"):
            lsg_attention(*qkv, mask, layout, dropout_p=p)


def test_keep_rate_and_independence() -> None:
    """Over 2 million scores of one call: the keep rate is 1 - p, and keeping a score says nothing about its
    neighbours in the row, in the column, or in the next head (joint rate (1 - p)^2), within 5 standard errors."""
    from lsg_patch.attention.dropout import key_codes, keep_mask, row_codes

    p = 0.1
    rows = row_codes(2024, 1, 2, 1024, torch.device("cpu"))[..., None]
    keep = keep_mask(rows, key_codes(torch.arange(1024)), p).double()
    assert keep.shape == (1, 2, 1024, 1024)
    count = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / count)
    joint = (1 - p) ** 2
    for pair in ((keep[..., 1:], keep[..., :-1]), (keep[..., 1:, :], keep[..., :-1, :]), (keep[:, 0], keep[:, 1])):
        both = (pair[0] * pair[1]).mean().item()
        assert abs(both - joint) < 5 * math.sqrt(joint * (1 - joint) / pair[0].numel()), both


def test_the_portable_backend_drops_alike_and_reaches_no_cpu_only_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """What another device runs (the CPU-only kernels forbidden) gives the same sample as the CPU."""
    layout, qkv, mask = _long_case("pooling", causal=True)
    with _with_seed(99):
        expected = _sampled(layout, qkv, mask, causal=True)

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a CPU-only aten op was reached")

    monkeypatch.setattr(product, "_flash", refuse)
    monkeypatch.setattr(product, "_flash_backward", refuse)
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "portable")  # what auto takes for every non-CPU device
    with _with_seed(99):
        ours = _sampled(layout, qkv, mask, causal=True)
    for x, y in zip(ours, expected):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def _classifier(dropout: float):
    model = tiny_model("bert", AutoModelForSequenceClassification, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=dropout)
    return lsg_patch.to_lsg(model, max_length=256, block_size=16, sparse_block_size=16, sparsity_factor=4,
                            sparsity_type="norm").train()


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 99, (2, 90), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 70:] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1]))


def test_gradient_checkpointing_redraws_the_same_pattern() -> None:
    """transformers' layer checkpointing recomputes each layer in the backward under the saved random state, so
    attention dropout (seeded from the default generator) gives exactly the gradients of the plain run."""
    grads = []
    for checkpointing in (False, True):
        model = _classifier(0.3)
        if checkpointing:  # transformers 5.x renamed gradient_checkpointing_enable; use what exists
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        torch.manual_seed(5)
        model(**_batch()).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    no_dropout = _classifier(0.0)
    torch.manual_seed(5)
    no_dropout(**_batch()).loss.backward()
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(dict(no_dropout.named_parameters())[weight].grad, grads[0][weight])
