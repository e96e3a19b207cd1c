"""The constant-size cache of causal LSG (LSGCache): generating with it is generating without it.

The definition is the forward without a cache (itself checked against the causal oracle in
test_attention_product.py and test_decoders.py): the logits of every token fed after a cached prompt must be those
of the uncached forward over the whole sequence. Exactness is checked in float64, where every sparsity type agrees
to rounding. Norms within a relative 1e-5 count as equal and tie by position (the same token at two positions under
rotary embeddings, whose rotation keeps the norm, no longer splits the cached and uncached passes: see
test_user_reports.py); norms that differ by about that tolerance can still round to different sides of it in float32,
so the float32 generation tests use pooling.
"""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import lsg_patch
from lsg_patch import LSGCache
from tests.helpers import CAUSAL_HEADS, cache_of, converted, greedy, ids_of, padded_batch
from tests.helpers import plain_decoder as plain
from tests.tiny_models import build

SPARSITY_TYPES = ["norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling", "none"]


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(SPARSITY_TYPES))
    block = draw(st.sampled_from([4, 8]))
    factor = draw(st.sampled_from([f for f in (1, 2, 4) if block % f == 0]))
    sparse = draw(st.sampled_from([block // 2, block, 3 * block // 2]))
    return dict(sparsity_type=kind, block_size=block, sparsity_factor=factor, sparse_block_size=sparse,
                num_global_tokens=draw(st.integers(1, 3)), mask_first_token=draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(model_type=st.sampled_from(["gpt2", "llama", "bert"]), lsg=layouts(), prompt=st.integers(1, 40),
       steps=st.integers(1, 3), seed=st.integers(0, 99))
def test_every_token_after_a_cached_prompt_gets_the_uncached_logits(model_type: str, lsg: dict, prompt: int,
                                                                     steps: int, seed: int) -> None:
    """Cached calls of 1 to 3 tokens each, 20 tokens in all, across block boundaries, for every sparsity type."""
    model = converted(model_type, **lsg)
    ids = ids_of(1, prompt + 20, seed)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        out = model(ids[:, :prompt], use_cache=True)
        cache, got = cache_of(out), [out.logits]
        for start in range(prompt, prompt + 20, steps):
            got.append(model(ids[:, start : start + steps], past_key_values=cache).logits)
    assert isinstance(cache, LSGCache)
    torch.testing.assert_close(torch.cat(got, dim=1), expected, rtol=0, atol=1e-10)


LONG_PROMPT_TYPES = ("gpt2", "llama", "bert")  # one long prompt per family: GPT-2, rotary stack, BERT as a decoder


@pytest.mark.parametrize(("model_type", "prompt"), [(t, p) for t in CAUSAL_HEADS for p in (1, 12, 24)]
                         + [(t, 1503) for t in LONG_PROMPT_TYPES])  # one token, under 2 blocks, 3 blocks, long
def test_greedy_generation_with_the_cache_equals_generation_without(model_type: str, prompt: int) -> None:
    model = converted(model_type, sparsity_type="norm")
    ids = ids_of(1, prompt, seed=prompt)
    with_cache = greedy(model, ids, 26)
    without = greedy(model, ids, 26, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_float32_generation_with_the_cache_equals_generation_without(model_type: str) -> None:
    model = converted(model_type, double=False, sparsity_type="pooling", sparsity_factor=4)
    ids = ids_of(2, 70, seed=3)
    assert torch.equal(greedy(model, ids, 30), greedy(model, ids, 30, use_cache=False))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_beam_search_with_the_cache_equals_beam_search_without(model_type: str) -> None:
    model = converted(model_type, sparsity_type="bos_pooling", sparsity_factor=4)
    ids = ids_of(2, 37, seed=4)
    beams = dict(num_beams=3, num_return_sequences=2, early_stopping=False)
    assert torch.equal(greedy(model, ids, 24, **beams), greedy(model, ids, 24, use_cache=False, **beams))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "roberta"])
def test_each_row_of_a_left_padded_batch_generates_what_it_generates_alone(model_type: str) -> None:
    """Rows of 45, 38 and 17 real tokens: the block partition of a row does not depend on its padding."""
    model = converted(model_type, sparsity_type="lsh")
    lengths = [45, 38, 17]
    ids, mask = padded_batch(lengths, 45, "left")
    batch = greedy(model, ids, 25, attention_mask=mask)
    for row, length in enumerate(lengths):
        alone = greedy(model, ids[row : row + 1, mask[row] == 1], 25)
        assert torch.equal(batch[row, 45:], alone[0, length:])


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_tokens_after_a_right_padded_prompt_follow_each_row_s_own_tokens(model_type: str) -> None:
    """generate reads the next token at the last column, a padding one for right-padded rows (transformers warns
    about that), so this feeds the same 20 tokens after every row's prompt by hand: each row's logits are those of
    the row alone, padding or not."""
    model = converted(model_type, sparsity_type="pooling")
    lengths = [45, 38, 17]
    ids, mask = padded_batch(lengths, 45, "right")
    more = ids_of(3, 20, seed=6)
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
        steps = [model(more[:, j : j + 1], past_key_values=cache).logits for j in range(20)]
        for row, length in enumerate(lengths):
            alone = model(torch.cat([ids[row : row + 1, :length], more[row : row + 1]], 1), use_cache=False).logits
            torch.testing.assert_close(torch.cat(steps, 1)[row], alone[0, length:], rtol=0, atol=1e-10)


def dense_cache_bytes(model_type: str, length: int) -> int:
    """Bytes of transformers' DynamicCache after `length` tokens on the unconverted model."""
    with torch.no_grad():
        out = plain(model_type, double=False)(ids_of(1, length), use_cache=True)
    cache = cache_of(out)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_the_cache_is_a_tenth_of_the_dense_one_and_does_not_grow() -> None:
    """Block 32, sparse 32, factor 4: after 4000 tokens at most 10% of the dense cache; after 8000 the same size."""
    model = converted("llama", double=False, block_size=32, sparse_block_size=32, sparsity_factor=4,
                      num_global_tokens=1, max_length=8192)
    sizes = {}
    for length in (4000, 8000):
        with torch.no_grad():
            sizes[length] = cache_of(model(ids_of(1, length), use_cache=True)).nbytes()
    assert sizes[4000] <= 0.10 * dense_cache_bytes("llama", 4000)
    assert sizes[8000] == sizes[4000]


def test_an_empty_transformers_cache_is_replaced_and_a_filled_one_refused() -> None:
    model = converted("llama")
    ids = ids_of(1, 30)
    with torch.no_grad():
        out = model(ids, past_key_values=DynamicCache())
        assert isinstance(cache_of(out), LSGCache)
        dense = cache_of(plain("llama")(ids, use_cache=True))
        with pytest.raises(ValueError, match="DynamicCache holding 30 tokens"):
            model(ids[:, :1], past_key_values=dense)


def test_what_a_cache_cannot_do_is_refused() -> None:
    model = converted("gpt2")
    ids = ids_of(2, 30)
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        with pytest.raises(NotImplementedError, match="cannot drop tokens"):
            cache.crop(3)
        with pytest.raises(ValueError, match="holds 2 rows but the call has 1"):
            model(ids[:1, :1], past_key_values=cache)
        mask = torch.ones(2, 31, dtype=torch.long)
        mask[1, -1] = 0
        with pytest.raises(ValueError, match="masks some of the new tokens"):
            model(ids[:, :1], attention_mask=mask, past_key_values=cache)
        other = converted("gpt2", block_size=4)
        with pytest.raises(ValueError, match="made for another LSG layout"):
            other(ids[:, :1], past_key_values=cache)
    short = converted("gpt2", max_length=4096)
    with torch.no_grad(), pytest.raises(ValueError, match="take the sequence to 4097 tokens .* at most 4096"):
        cache = cache_of(short(ids_of(1, 4090), use_cache=True))
        for _ in range(6):
            short(ids[:1, :1], past_key_values=cache)  # 4091 .. 4096 tokens: accepted
        short(ids[:1, :1], past_key_values=cache)
    encoder = lsg_patch.to_lsg(build("modernbert", "Model"), max_length=128, block_size=8)  # in every 5.x
    with pytest.raises(ValueError, match="bidirectional LSG attention keeps no key/value cache"):
        encoder(ids_of(1, 30), past_key_values=DynamicCache())


def test_threads_generating_with_one_model_each_get_their_own_result() -> None:
    model = converted("llama", sparsity_type="norm")
    prompts = [ids_of(1, 20 + 9 * i, seed=i) for i in range(4)]
    serial = [greedy(model, p, 12) for p in prompts]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = greedy(model, prompts[i], 12)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[i], serial[i]) for i in range(4))
