"""Adversarial cases of the LSGCache: layouts, batches, inputs and cache operations the main tests do not reach.

The oracle is always the forward without a cache (float64, to 1e-10): the logits of tokens fed after a cached prompt
equal the uncached forward over the whole sequence, and each row of a padded batch gives what it gives alone.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from lsg_patch import LSGCache
from lsg_patch.families.base import _TABLE_WITHOUT_GLOBALS
from tests.helpers import cache_of, converted, greedy, ids_of, padded_batch


def cached_logits(model: torch.nn.Module, ids: torch.Tensor, prompt: int, step: int, **kwargs) -> torch.Tensor:
    """Logits of a cached prompt of `prompt` tokens, then the rest fed `step` tokens per call."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True, **kwargs)
        cache, got = cache_of(out), [out.logits]
        for start in range(prompt, ids.shape[1], step):
            got.append(model(ids[:, start : start + step], past_key_values=cache).logits)
    assert isinstance(cache, LSGCache)
    return torch.cat(got, dim=1)


def uncached_logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def assert_rows_as_alone(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, more: torch.Tensor,
                         **kwargs) -> None:
    """Cache a padded prompt, feed `more` one token per call: each row's logits are its real tokens' alone."""
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True, **kwargs))
        got = torch.cat([model(more[:, j : j + 1], past_key_values=cache).logits for j in range(more.shape[1])], 1)
    for row in range(ids.shape[0]):
        real = int(mask[row].sum())
        alone = uncached_logits(model, torch.cat([ids[row : row + 1, mask[row] == 1], more[row : row + 1]], 1))
        torch.testing.assert_close(got[row], alone[0, real:], rtol=0, atol=1e-10)


LAYOUTS = {
    "more globals than a block": dict(num_global_tokens=10, block_size=4, sparse_block_size=4, sparsity_factor=2),
    "sparse block not a multiple of the step": dict(block_size=8, sparse_block_size=6, sparsity_factor=2),
    "odd step": dict(block_size=12, sparse_block_size=5, sparsity_factor=4),
    "factor equals block": dict(block_size=4, sparse_block_size=4, sparsity_factor=4),
    "block 12 factor 3": dict(block_size=12, sparse_block_size=12, sparsity_factor=3),
    "no sparse keys": dict(block_size=8, sparse_block_size=0),
    "block of one token": dict(block_size=1, sparse_block_size=1, sparsity_factor=1),
}


@pytest.mark.parametrize("model_type,kind", [("llama", "norm"), ("gpt2", "bos_pooling"), ("bert", "lsh"),
                                             ("qwen2", "block_stride")])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_layouts_across_the_full_and_block_path_boundary(model_type: str, kind: str, layout: str) -> None:
    """Prompts of exactly 2 blocks (full path) and 2 blocks + 1 (block path), then calls of 17, 5 and 2 tokens
    that cross block boundaries and, from the 2-block prompt, the full/block boundary inside one call."""
    lsg = LAYOUTS[layout]
    model = converted(model_type, sparsity_type=kind, **lsg)
    two_blocks = 2 * lsg["block_size"]
    ids = ids_of(1, two_blocks + 40, seed=len(layout))
    expected = uncached_logits(model, ids)
    for prompt, step in ((two_blocks, 17), (two_blocks + 1, 5), (1, 2)):
        torch.testing.assert_close(cached_logits(model, ids, prompt, step), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert", "roberta"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_row_that_is_all_padding_gives_what_its_new_tokens_give_alone(model_type: str, side: str) -> None:
    """Regression: BERT-family decoders (pool_with_global) give their token 0 global token 0's output; a row whose
    prompt is all padding fed its token 0 after the prompt and got the token's own output instead."""
    ids, mask = padded_batch([30, 0, 5], 30, side)
    assert_rows_as_alone(converted(model_type, sparsity_type="pooling"), ids, mask, ids_of(3, 20, seed=7))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("mask_first_token", [False, True])
def test_bos_pooling_after_a_prompt_that_is_all_padding(model_type: str, mask_first_token: bool) -> None:
    """Regression: bos_pooling weighs items by token 0's query, which the cache took from the prompt; for a row
    whose prompt is all padding that was a padding token's query, not the query of its token 0 fed later."""
    model = converted(model_type, sparsity_type="bos_pooling", mask_first_token=mask_first_token)
    ids, mask = padded_batch([40, 0, 3], 40, "left")
    assert_rows_as_alone(model, ids, mask, ids_of(3, 30, seed=2))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_generate_continues_from_the_cache_it_returned(model_type: str) -> None:
    """Regression: generate(sequences, cache=the cache it returned) slices the input to its uncached tokens only
    when some cache layer is not linear attention; with no transformers layers the LSGCache looked all linear, the
    whole sequence was fed again after the cache, and the tokens were wrong."""
    model = converted(model_type, sparsity_type="norm")
    ids = ids_of(2, 30, seed=1)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
    sequences, cache = first.sequences, cache_of(first)
    assert isinstance(cache, LSGCache) and cache.get_seq_length() == 39
    mask = torch.ones_like(sequences)
    resumed = greedy(model, sequences, 10, past_key_values=cache, attention_mask=mask)
    assert torch.equal(resumed, greedy(model, sequences, 10, attention_mask=mask, use_cache=False))


def test_a_cached_gpt2_call_leaves_no_note_for_other_position_tables() -> None:
    """Regression: a call after a cached prompt told GPT-2's table hooks "no global rows" by the table's id and left
    that note set; once the model was freed, a BART positions table reusing the id (seen in practice) lost its
    global rows' offset and gave wrong outputs. The note is cleared after every call, also one that raises."""
    model = converted("gpt2")  # max_length 4096
    ids = ids_of(1, 4095)
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        model(ids[:, :1], past_key_values=cache)
        assert _TABLE_WITHOUT_GLOBALS.get() is None
        with pytest.raises(ValueError, match="take the sequence to 4097 tokens"):
            model(ids[:, :1], past_key_values=cache)
    assert _TABLE_WITHOUT_GLOBALS.get() is None


def test_cached_gpt2_calls_interleaved_with_uncached_calls_of_another_gpt2() -> None:
    """The table hooks of one converted GPT-2 must not leak into another's calls in the same thread."""
    first, second = converted("gpt2", sparsity_type="norm"), converted("gpt2", num_global_tokens=3)
    ids = ids_of(1, 40, seed=2)
    expected_first, expected_second = uncached_logits(first, ids), uncached_logits(second, ids)
    with torch.no_grad():
        cache = cache_of(first(ids[:, :30], use_cache=True))
        for column in range(30, 36):
            got = first(ids[:, column : column + 1], past_key_values=cache).logits
            torch.testing.assert_close(got, expected_first[:, column : column + 1], rtol=0, atol=1e-10)
            other = second(ids, use_cache=column % 2 == 0).logits
            torch.testing.assert_close(other, expected_second, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["llama", "bert", "roberta"])
def test_holes_and_mask_first_token_in_a_padded_batch(model_type: str) -> None:
    """Padding inside rows (holes) and left padding with mask_first_token: each row as its real tokens alone."""
    ids = ids_of(3, 40, seed=8)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[0, 10:17] = mask[1, :3] = mask[1, 30:33] = mask[2, :31] = 0
    model = converted(model_type, sparsity_type="norm", mask_first_token=True)
    assert_rows_as_alone(model, ids, mask, ids_of(3, 20, seed=9))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_prompt_as_embeddings_or_with_shifted_positions(model_type: str) -> None:
    """inputs_embeds for the prompt and for later calls; explicit position_ids (offset 7) for the prompt only:
    later tokens continue from its last position."""
    model = converted(model_type, sparsity_type="norm")
    ids = ids_of(1, 50, seed=3)
    embeds = model.get_input_embeddings()(ids).detach()
    expected = uncached_logits(model, ids)
    with torch.no_grad():
        out = model(inputs_embeds=embeds[:, :30], use_cache=True)
        cache, got = cache_of(out), [out.logits]
        got += [model(inputs_embeds=embeds[:, j : j + 2], past_key_values=cache).logits for j in range(30, 50, 2)]
    torch.testing.assert_close(torch.cat(got, 1), expected, rtol=0, atol=1e-10)
    positions = torch.arange(50)[None] + 7
    torch.testing.assert_close(cached_logits(model, ids, 30, 3, position_ids=positions[:, :30]),
                               uncached_logits(model, ids, position_ids=positions), rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "roberta"])
def test_token_type_ids_in_the_prompt_and_after_it(model_type: str) -> None:
    """Token types move with their tokens (left padding) and are read in calls after the prompt."""
    model = converted(model_type, sparsity_type="pooling")
    vocab = model.config.type_vocab_size if hasattr(model.config, "type_vocab_size") else model.config.vocab_size
    ids, mask = padded_batch([40, 13], 40, "left")
    types = (torch.arange(60)[None] % 3 == 0).long().expand(2, -1) % vocab
    more = ids_of(2, 20, seed=4)
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, token_type_ids=types[:, :40], use_cache=True))
        got = torch.cat([model(more[:, j : j + 1], token_type_ids=types[:, 40 + j : 41 + j], past_key_values=cache
                               ).logits for j in range(20)], 1)
    for row, real in enumerate([40, 13]):
        keep = mask[row] == 1
        row_types = torch.cat([types[row, :40][keep], types[row, 40:]])[None]
        alone = uncached_logits(model, torch.cat([ids[row : row + 1, keep], more[row : row + 1]], 1),
                                token_type_ids=row_types)
        torch.testing.assert_close(got[row], alone[0, real:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_deepcopy_reset_and_batch_select(model_type: str) -> None:
    """A deep copy mid-generation continues independently of the original; reset() starts a new prompt; selecting
    rows (in another order) keeps each selected row's state."""
    model = converted(model_type, sparsity_type="lsh")
    ids = ids_of(3, 60, seed=3)
    expected = uncached_logits(model, ids)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :30], use_cache=True))
        for j in range(30, 40):
            model(ids[:, j : j + 1], past_key_values=cache)
        twin = copy.deepcopy(cache)
        for branch in (cache, twin):
            got = torch.cat([model(ids[:, j : j + 1], past_key_values=branch).logits for j in range(40, 50)], 1)
            torch.testing.assert_close(got, expected[:, 40:50], rtol=0, atol=1e-10)
        cache.reset()
        out = model(ids[:, :45], past_key_values=cache)
        got = torch.cat([out.logits, model(ids[:, 45:60], past_key_values=cache).logits], 1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        twin.batch_select_indices(torch.tensor([2, 0]))
        got = torch.cat([model(ids[[2, 0], j : j + 1], past_key_values=twin).logits for j in range(50, 60)], 1)
        torch.testing.assert_close(got, expected[[2, 0], 50:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_sampling_and_padded_beam_search_with_the_cache_equal_them_without(model_type: str) -> None:
    """Sampling with num_return_sequences (same seed), and beam search over a left-padded batch with an odd layout."""
    model = converted(model_type, sparsity_type="norm")
    ids = ids_of(2, 30, seed=3)
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        with torch.no_grad():
            sampled.append(model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=True,
                                          num_return_sequences=2, pad_token_id=0, use_cache=use_cache))
    assert torch.equal(*sampled)
    model = converted(model_type, sparsity_type="pooling", block_size=4, sparse_block_size=6, num_global_tokens=5)
    ids, mask = padded_batch([25, 9], 25, "left")
    beams = dict(num_beams=4, num_return_sequences=3, attention_mask=mask)
    assert torch.equal(greedy(model, ids, 20, **beams), greedy(model, ids, 20, use_cache=False, **beams))


def test_two_caches_of_one_gpt2_in_two_threads_next_to_uncached_generation() -> None:
    """Threads share the model, never a cache; GPT-2's table hooks (per thread) keep cached and uncached apart."""
    model = converted("gpt2", sparsity_type="pooling")
    prompts = [ids_of(2, 25 + 13 * i, seed=i) for i in range(3)]
    jobs = [(p, True) for p in prompts] + [(prompts[0], False)]
    serial = [greedy(model, p, 15, use_cache=c) for p, c in jobs]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = greedy(model, jobs[i][0], 15, use_cache=jobs[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[i], serial[i]) for i in range(len(jobs)))


def test_gradients_flow_through_cached_calls() -> None:
    """Grad mode: cached calls give the uncached logits and backpropagate (the cache writes no saved tensor)."""
    model = converted("llama", sparsity_type="bos_pooling")
    ids, mask = padded_batch([40, 0], 40, "left")  # row 1: its token 0 (bos_pooling's query) after the prompt
    more = ids_of(2, 10, seed=2)
    cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
    got = torch.cat([model(more[:, j : j + 1], past_key_values=cache).logits for j in range(10)], 1)
    got.sum().backward()
    expected = uncached_logits(model, torch.cat([ids[:1], more[:1]], 1))[0, 40:]
    torch.testing.assert_close(got[0].detach(), expected, rtol=0, atol=1e-10)
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.parameters())


def test_a_prompt_that_is_not_whole_blocks_without_adaptive_padding_is_refused_clearly() -> None:
    """adaptive=False: a prompt longer than 2 blocks must be whole blocks, with or without a cache."""
    model = converted("llama", adaptive=False)
    with torch.no_grad(), pytest.raises(ValueError, match="25 tokens is not a multiple of block_size=8"):
        model(ids_of(1, 25), use_cache=True)


def test_prefill_in_chunks_is_exact_and_padding_past_the_first_chunk_is_refused() -> None:
    """generate's prefill_chunk_size feeds the prompt as a cached prompt plus calls after it: exact when the first
    chunk holds all the padding; else the later chunks mask tokens after the prompt, refused with a pointer to it."""
    model = converted("llama", sparsity_type="norm")
    ids = ids_of(2, 50, seed=1)
    assert torch.equal(greedy(model, ids, 10, prefill_chunk_size=16), greedy(model, ids, 10, use_cache=False))
    ids, mask = padded_batch([50, 20], 50, "left")
    assert torch.equal(greedy(model, ids, 10, attention_mask=mask, prefill_chunk_size=32),
                       greedy(model, ids, 10, attention_mask=mask, use_cache=False))
    with pytest.raises(ValueError, match="masks some of the new tokens.*prefill_chunk_size"):
        greedy(model, ids, 10, attention_mask=mask, prefill_chunk_size=16)
