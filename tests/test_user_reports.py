"""What a new user hit (issue 19): each test failed before its fix.

Oracles: the same model converted with a larger max_length (item 2), the same weights built with sdpa (item 4),
the uncached forward or generation (items 11, 12), the row run alone (item 14), the unconverted model's shapes.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lsg_patch
from lsg_patch import LSGCache
from tests.helpers import LSG, MAX_LENGTH
from tests.tiny_models import build, head_class, tiny_config


def ids_of(batch: int, length: int, seed: int = 0, vocab: int = 99) -> torch.Tensor:
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def encoder_rows(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The hidden rows the LSG part computes: the encoder's output of seq2seq models, else the model's."""
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    with torch.no_grad():
        output = model(**inputs)
    rows = getattr(output, "encoder_last_hidden_state", None)
    return output.last_hidden_state if rows is None else rows


# item 1: 4-D masks whose rows differ were cut to their last row


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)


def _block_diagonal(length: int, split: int) -> torch.Tensor:
    document = torch.arange(length) >= split
    return (document[:, None] == document[None, :])[None, None]


def test_item1_four_d_masks_whose_rows_differ_are_refused(bert: torch.nn.Module) -> None:
    length = 40
    ids = ids_of(1, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    band = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs() <= 4
    minimum = torch.finfo(torch.float32).min
    additive = torch.zeros(1, 1, length, length).masked_fill(~_block_diagonal(length, 17), minimum)
    for mask in (_block_diagonal(length, 17), causal, band[None, None], additive):
        with pytest.raises(ValueError, match="different query rows different keys"):
            bert(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("model_type, head", [("bert", "Model"), ("llama", "Model")])
def test_item1_row_constant_four_d_masks_still_work(model_type: str, head: str) -> None:
    """Padding expanded to 4-D (bidirectional), and the causal mask of a padded batch (causal models), as
    transformers' mask builders make them, give what the 2-D mask gives."""
    model = lsg_patch.to_lsg(build(model_type, head), max_length=MAX_LENGTH, **LSG)
    length = 40
    ids = ids_of(2, length, seed=1)
    mask = torch.ones(2, length, dtype=torch.long)
    padded = slice(None, 9) if model_type == "llama" else slice(27, None)  # left / right padding
    mask[1, padded] = 0
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if model_type == "llama":
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    expected = encoder_rows(model, input_ids=ids, attention_mask=mask)
    for four_d in (allowed, torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)):
        got = encoder_rows(model, input_ids=ids, attention_mask=four_d)
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], rtol=0, atol=0)


# item 2: inputs near max_length crashed when max_length is not a multiple of block_size

NEAR_MAX_FAMILIES = ["bert", "roberta", "electra", "albert", "distilbert", "bart", "mbart", "pegasus", "t5", "gpt2",
                     "llama", "eurobert"]


@pytest.mark.parametrize("model_type", NEAR_MAX_FAMILIES)
def test_item2_every_input_up_to_max_length_runs(model_type: str) -> None:
    """max_length 100 with blocks of 8: 97..100 tokens pad to 104 internally. The oracle is the same model
    converted to 104 (its table's first 100 rows are the same rows), which never runs out of positions."""
    plain = build(model_type, "Model")
    at_100 = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=100, **LSG)
    at_104 = lsg_patch.to_lsg(plain, max_length=104, **LSG)
    for length in range(97, 101):
        ids = ids_of(2, length, seed=length)
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, length - 5 :] = 0
        got = encoder_rows(at_100, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(got, encoder_rows(at_104, input_ids=ids, attention_mask=mask), rtol=0, atol=1e-6)


def test_item2_gpt2_generates_up_to_max_length_without_a_cache() -> None:
    plain = build("gpt2", "LMHeadModel")
    at_100 = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=100, **LSG)
    at_104 = lsg_patch.to_lsg(plain, max_length=104, **LSG)
    ids = ids_of(1, 95)
    runs = [m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
            for m in (at_100, at_104)]
    assert runs[0].shape == (1, 100)
    assert torch.equal(runs[0], runs[1])


# item 4: models built with attn_implementation="flex_attention" failed on every forward


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "albert", "distilbert"])
def test_item4_flex_attention_models_run_as_sdpa_ones(model_type: str) -> None:
    """LSG layers read the caller's key mask, never the mask of the implementation the model was built with."""
    models = []
    for implementation in ("flex_attention", "sdpa"):
        torch.manual_seed(0)
        model = head_class(model_type, "Model")(tiny_config(model_type, attn_implementation=implementation)).eval()
        models.append(lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG))
    ids = ids_of(2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 29:] = 0
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        flex, sdpa = (encoder_rows(m, **inputs) for m in models)
        torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-6)


# item 11: unclear errors (empty batch, position ids past the table) and LSGCache()


@pytest.mark.parametrize("model_type, head", [("bert", "Model"), ("gpt2", "Model"), ("llama", "Model"),
                                              ("bart", "Model")])
def test_item11_a_batch_of_zero_rows_is_refused_clearly(model_type: str, head: str) -> None:
    model = lsg_patch.to_lsg(build(model_type, head), max_length=MAX_LENGTH, **LSG)
    with pytest.raises(ValueError, match=r"0 rows \(shape \(0, 40\)\)"):
        encoder_rows(model, input_ids=torch.zeros(0, 40, dtype=torch.long))


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_item11_position_ids_past_the_table_name_the_value_and_the_table(model_type: str) -> None:
    model = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    with pytest.raises(ValueError, match=r"position_ids holds 239, outside the position table of 128 rows"):
        model(input_ids=ids_of(1, 40), position_ids=torch.arange(200, 240)[None])
    with pytest.raises(ValueError, match=r"position_ids holds -1"):
        model(input_ids=ids_of(1, 40), position_ids=torch.arange(-1, 39)[None])


def test_item11_lsgcache_is_constructible_and_serves_the_model_it_is_passed_to() -> None:
    model = lsg_patch.to_lsg(build("llama", "ForCausalLM"), max_length=MAX_LENGTH, **LSG).double()
    ids = ids_of(2, 37)
    cache = LSGCache()
    with torch.no_grad():
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        cached = model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        uncached = model(input_ids=ids, use_cache=False).logits[:, -1]
        made = model(input_ids=ids, use_cache=True)
    assert cache.layout == (made.past_key_values if getattr(made, "cache", None) is None else made.cache).layout
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-10)


# item 12: right-padded generation changed with the cache


@pytest.mark.parametrize("model_type, head", [("llama", "ForCausalLM"), ("gpt2", "LMHeadModel"),
                                              ("bert", "LMHeadModel")])
@pytest.mark.parametrize("sparsity_type", ["norm", "pooling"])
def test_item12_right_padded_generation_is_the_same_with_and_without_the_cache(model_type: str, head: str,
                                                                               sparsity_type: str) -> None:
    model = lsg_patch.to_lsg(build(model_type, head), max_length=MAX_LENGTH,
                             **{**LSG, "sparsity_type": sparsity_type}).double()
    ids = ids_of(2, 30, seed=3)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 21:], ids[1, 21:] = 0, 0
    runs = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           use_cache=use_cache, pad_token_id=0) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


# item 14: hidden states and attentions said one thing per family

HIDDEN_FAMILIES = [("bert", "Model"), ("albert", "Model"), ("distilbert", "Model"), ("bart", "Model"),
                   ("t5", "Model"), ("gpt2", "Model"), ("llama", "Model"), ("modernbert", "Model"),
                   ("eurobert", "Model")]


@pytest.mark.parametrize("model_type, head", HIDDEN_FAMILIES)
def test_item14_hidden_states_are_the_callers_token_rows_in_every_family(model_type: str, head: str) -> None:
    """Shapes of the unconverted model; a padded row's states are its states alone (rows in the caller's order);
    the last state stays tied to the output where transformers ties them."""
    plain = build(model_type, head)
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    length, real = 37, 26
    ids = ids_of(2, length, seed=2)
    mask = torch.ones(2, length, dtype=torch.long)
    causal = model_type in ("gpt2", "llama")
    padding = slice(None, length - real) if causal else slice(real, None)  # left padding for decoders
    mask[1, padding] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    alone = {"input_ids": ids[1:, mask[1].bool()], "output_hidden_states": True}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"], alone["decoder_input_ids"] = ids[:, :3], ids[1:2, :3]
    with torch.no_grad():
        expected_shapes = [h.shape for h in _states(plain(**inputs))]
        output, single = model(**inputs), model(**alone)
    states = _states(output)
    assert [h.shape for h in states] == expected_shapes
    for batch_state, alone_state in zip(states, _states(single)):
        torch.testing.assert_close(batch_state[1, mask[1].bool()], alone_state[0], rtol=0, atol=1e-5)
    if not model.config.is_encoder_decoder and model_type != "eurobert":
        assert states[-1] is output.last_hidden_state


def _states(output: object) -> tuple[torch.Tensor, ...]:
    states = getattr(output, "encoder_hidden_states", None)
    return output.hidden_states if states is None else states


@pytest.mark.parametrize("model_type", ["bert", "bart", "llama"])
def test_item14_output_attentions_is_refused(model_type: str) -> None:
    """Asked by the call, or by the config of a model built with eager attention (transformers refuses the config
    setting for sdpa models itself)."""
    model = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    with pytest.raises(ValueError, match="output_attentions=True: LSG attention computes no attention weights"):
        encoder_rows(model, input_ids=ids_of(1, 40), output_attentions=True)
    eager = lsg_patch.to_lsg(build(model_type, "Model", attn_implementation="eager"), max_length=MAX_LENGTH, **LSG)
    eager.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions=True"):
        encoder_rows(eager, input_ids=ids_of(1, 40))


# item 10: norm chose keys by rounding when key norms tie exactly

ROTARY = [("eurobert", "Model"), ("modernbert", "Model"), ("qwen3", "Model")]
NORM_TIES = dict(LSG, sparse_block_size=4)


def repeated_tokens(seed: int, period: int, length: int) -> torch.Tensor:
    """A short random pattern repeated: under rotary embeddings each occurrence of a token has the same key norm."""
    return ids_of(1, period, seed=seed).repeat(1, length // period + 1)[:, :length]


@pytest.mark.parametrize("model_type, head", ROTARY)
def test_item10_norm_gives_float32_what_float64_gives_on_repeated_tokens(model_type: str, head: str) -> None:
    """Qwen3's key norm (default weights) gives every key the same norm, the others a repeated token's keys."""
    model = lsg_patch.to_lsg(build(model_type, head), max_length=MAX_LENGTH, **NORM_TIES)
    double = copy.deepcopy(model).double()
    for seed in range(3):
        ids = repeated_tokens(seed, 5, 100)
        with torch.no_grad():
            single, reference = (m(input_ids=ids).last_hidden_state for m in (model, double))
        torch.testing.assert_close(single.double(), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_item10_a_left_padded_row_generates_what_it_generates_alone_in_float32(model_type: str) -> None:
    """Not seen failing before the fix on these tiny models (their padded and alone passes round alike); kept as
    the check the issue asks for."""
    model = lsg_patch.to_lsg(build(model_type, "ForCausalLM"), max_length=MAX_LENGTH, **NORM_TIES)
    for seed in range(2):
        row = repeated_tokens(seed, 3, 45)
        other = ids_of(1, 52, seed=seed + 10)
        ids = torch.cat([other, torch.cat([torch.zeros(1, 7, dtype=torch.long), row], dim=1)])
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                               do_sample=False, pad_token_id=0)[1, 52:]
        alone = model.generate(input_ids=row, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, 45:]
        assert torch.equal(batch, alone)
