"""Stacks that embed their own input: decoder-only LMs (GPT-2, Llama, Mistral, Qwen2, Qwen3; causal LSG over the
whole prompt; the cache is tested in test_cache.py) and rotary encoders (GTE, NomicBERT, jina-embeddings-v3, EuroBERT, ModernBERT).

Oracle: the unconverted model itself, given [globals; tokens] as inputs_embeds and a 4-D boolean mask built here
from the definition of LSG without sparse keys (docs/LSG_SPEC.md section 6). Causal: a global query sees every
global key; the token at position p sees the globals and the tokens of its own and the previous block up to p.
Bidirectional: global queries see every key; token block i sees the globals and blocks i-1, i, i+1. No query
sees a padded token. transformers passes a 4-D mask through unchanged, so the plain model computes exactly that
attention, densely.
"""
from __future__ import annotations

import copy

import pytest
import torch

from transformers.masking_utils import create_bidirectional_sliding_window_mask

import lsg_patch
from tests.test_architectures import build

DECODERS = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
LSG = dict(block_size=8, sparse_block_size=0, sparsity_type="none", num_global_tokens=2)
MAX_LENGTH, LENGTH, PADDED = 128, 48, 30  # 6 whole blocks, no block padding


ENCODERS = ["gte", "nomic_bert", "jina_embeddings_v3", "eurobert", "modernbert"]


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
    base, g = plain.base_model, LSG["num_global_tokens"]
    globals_ = lsg_model.base_model.global_embeddings.weight[:g].detach()
    embeds = torch.cat([globals_.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    kwargs = {}
    if plain.config.model_type == "gpt2":  # learned table: tokens keep 0..T-1, globals get no position vector
        embeds[:, :g] -= base.wpe.weight[0]
        kwargs["position_ids"] = torch.cat([torch.zeros(1, g, dtype=torch.long), torch.arange(ids.shape[1])[None]], 1)
    if causal:
        kwargs["use_cache"] = False
    lsg_tokens = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1) if mask_first_token else mask
    lsg_mask = lsg_key_mask(lsg_tokens.bool(), g, LSG["block_size"], causal)
    if plain.config.model_type == "modernbert":  # its sliding-window layers: transformers' windowed mask, densely
        keys = torch.cat([torch.ones(ids.shape[0], g, dtype=torch.bool), mask.bool()], dim=1)
        sliding = create_bidirectional_sliding_window_mask(config=base.config, inputs_embeds=embeds, attention_mask=keys)
        lsg_mask = {"full_attention": lsg_mask, "sliding_attention": sliding}
    out = base(inputs_embeds=embeds, attention_mask=lsg_mask, **kwargs)
    hidden = out.last_hidden_state
    tokens = hidden[:, g:]
    return tokens if causal else torch.cat([hidden[:, :1], tokens[:, 1:]], dim=1)  # pool_with_global


def assert_matches_oracle(plain: torch.nn.Module, causal: bool, seed: int, mask_first_token: bool = False) -> None:
    """The LSG conversion of `plain` against the dense oracle, on a batch whose row 1 is padded."""
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, mask_first_token=mask_first_token, **LSG)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (2, LENGTH), generator=generator)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, PADDED:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = oracle_hidden(plain, model, ids, mask, causal, mask_first_token)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :PADDED], expected[1, :PADDED], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("model_type", "causal"), [(t, True) for t in DECODERS] + [(t, False) for t in ENCODERS])
def test_lsg_matches_the_dense_oracle_on_a_padded_batch(model_type: str, causal: bool) -> None:
    plain = build(model_type, "Model", attn_implementation="sdpa")  # sdpa reads a 4-D bool mask as allowed keys
    assert_matches_oracle(plain, causal, seed=0)


def test_modernbert_mask_first_token_masks_token_0_in_the_lsg_layers_only() -> None:
    """mask_first_token is an LSG option: the sliding-window layers keep token 0 as a key, as before."""
    assert_matches_oracle(build("modernbert", "Model", attn_implementation="sdpa"), causal=False, seed=1,
                          mask_first_token=True)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_given_position_ids_are_placed_like_the_default_ones(model_type: str) -> None:
    """position_ids given for the tokens (as generate passes them) mean what the default count means, also
    with block padding (37 tokens: padded to 40)."""
    model = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    ids = torch.randint(5, 99, (1, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        default = model(input_ids=ids).last_hidden_state
        explicit = model(input_ids=ids, position_ids=torch.arange(37)[None]).last_hidden_state
        later = model(input_ids=ids, position_ids=torch.arange(37)[None] + 3).last_hidden_state
    assert torch.equal(default, explicit)
    assert not torch.allclose(later, default)


@pytest.mark.parametrize("model_type", DECODERS)
def test_save_and_reload_under_enabled_is_bit_exact(model_type: str, tmp_path) -> None:  # noqa: ANN001
    head = "LMHeadModel" if model_type == "gpt2" else "ForCausalLM"
    model = lsg_patch.to_lsg(build(model_type, head), max_length=MAX_LENGTH, **LSG)
    model.save_pretrained(tmp_path)
    with lsg_patch.enabled():
        again = type(model).from_pretrained(tmp_path).eval()
    assert lsg_patch.is_lsg_model(again)
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    ids = torch.randint(5, 99, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    with pytest.raises(ValueError, match=f"at most {MAX_LENGTH}"):
        again(torch.zeros(1, MAX_LENGTH + 1, dtype=torch.long))
