"""Stacks that embed their own input: decoder-only LMs (GPT-2, Llama, Mistral, Qwen2, Qwen3; causal LSG over the
whole prompt; the cache is tested in test_cache.py) and rotary encoders (GTE, NomicBERT, jina-embeddings-v3, EuroBERT, ModernBERT).

Oracle (tests/helpers.py): the unconverted model itself, given [globals; tokens] as inputs_embeds and a 4-D boolean
mask built from the definition of LSG without sparse keys (docs/LSG_SPEC.md section 6). Causal: a global query sees every
global key; the token at position p sees the globals and the tokens of its own and the previous block up to p.
Bidirectional: global queries see every key; token block i sees the globals and blocks i-1, i, i+1. No query
sees a padded token. transformers passes a 4-D mask through unchanged, so the plain model computes exactly that
attention, densely.
"""
from __future__ import annotations

import pytest
import torch

import lsg_patch
from tests.helpers import LOCAL_LSG as LSG
from tests.helpers import MAX_LENGTH, assert_matches_oracle
from tests.tiny_models import build

DECODERS = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
ENCODERS = ["gte", "nomic_bert", "jina_embeddings_v3", "eurobert", "modernbert"]


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
