"""Unregistered model types converted through an entry inferred from their modules, or refused with what was
missing and how to register them."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

import lsg_patch
from tests.helpers import LOCAL_LSG as LSG
from tests.helpers import MAX_LENGTH, assert_matches_oracle

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2, pad_token_id=0)  # fmt: skip
INFERABLE = {"ernie": {}, "gemma": dict(num_key_value_heads=2, head_dim=8), "olmo": {}}


def tiny(model_type: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **INFERABLE.get(model_type, {}), **overrides})
    return AutoModel.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(INFERABLE))
def test_unregistered_layouts_are_inferred_logged_and_saved(model_type: str, caplog, tmp_path) -> None:  # noqa: ANN001
    assert model_type not in lsg_patch.supported_architectures()
    with caplog.at_level(logging.INFO, logger="lsg_patch"):
        model = lsg_patch.to_lsg(tiny(model_type), max_length=MAX_LENGTH, **LSG)
    assert any("inferred its entry from its modules" in r.getMessage() for r in caplog.records)
    ids = torch.randint(5, 99, (2, 45), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, 30:] = 0
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[1:, :30]).last_hidden_state
    torch.testing.assert_close(batched[1, :30], alone[0], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    with lsg_patch.enabled():
        again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).last_hidden_state, batched)


@pytest.mark.parametrize("model_type", ["gemma", "olmo"])
def test_inferred_rotary_stacks_match_the_dense_oracle(model_type: str) -> None:
    assert_matches_oracle(tiny(model_type, attn_implementation="sdpa"), causal=True, seed=1)


def test_unknown_layout_names_what_is_missing_and_how_to_register() -> None:
    model = tiny("opt", ffn_dim=64, word_embed_proj_dim=32)
    with pytest.raises(ValueError, match=r"'opt' .*could not be inferred .*no 'embed_tokens'.*"
                                         r"lsg_patch.register\('opt', ArchitectureEntry"):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH)
    assert not lsg_patch.is_lsg_model(model)


class RemoteCodeSelfAttention(nn.Module):
    """Stands for a remote-code attention (ALiBi, say) in a model that reports a transformers layout."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.config = inner.config

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        return hidden_states, None


@pytest.mark.parametrize("model_type", ["ernie", "bert"])
def test_foreign_attention_in_a_known_layout_is_refused_before_any_change(model_type: str) -> None:
    model = tiny(model_type)
    for layer in model.encoder.layer:
        layer.attention.self = RemoteCodeSelfAttention(layer.attention.self)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="RemoteCodeSelfAttention.*(remote code|does not call)"):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH)
    assert model.state_dict().keys() == state.keys() and not lsg_patch.is_lsg_model(model)


def test_architecture_support_tells_registered_from_inferred() -> None:
    assert lsg_patch.architecture_support(tiny("bert")) == "registered"
    assert lsg_patch.architecture_support(tiny("ernie")).startswith("inferred: BERT-like encoder")
    assert lsg_patch.architecture_support(tiny("gemma")).startswith("inferred: Llama-like rotary stack")
    with pytest.raises(ValueError, match="could not be inferred"):
        lsg_patch.architecture_support(tiny("opt", ffn_dim=64, word_embed_proj_dim=32))
