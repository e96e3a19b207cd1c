"""Every layout the registry knows is also inferred for a model type it does not name (issue 19, item 15).

Two kinds of evidence:
* each registered model type, renamed to a type the registry does not know, is inferred to the registered entry
  (every field but the description and the head list) and converts to the same model, output for output;
* transformers' own unregistered relatives convert by inference and match a dense oracle built from their own
  modules: PLBart and Blenderbot (BART's layout, a word embedding that scales itself), BlenderbotSmall and Marian
  (an encoder that scales the words, Marian's table sinusoidal), Switch Transformers (T5's), on short padded
  batches where LSG is full attention over [globals; tokens]; MVP and M2M100 are refused, each with its reason.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lsg_patch
from lsg_patch.architecture_inference import infer_entry
from tests.helpers import (LOCAL_LENGTH, LOCAL_LSG, LOCAL_PADDED, LSG, MAX_LENGTH, assert_seq2seq_matches_plain_modules,
                           batch_inputs, t5_oracle_encoder)
from tests.tiny_models import TINY_CONFIGS, build, unregistered_model

DISTINCT = ("description", "heads")  # what an inferred entry says about itself


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_a_registered_layout_under_an_unknown_name_is_inferred_to_the_same_entry(model_type: str) -> None:
    registered = lsg_patch.supported_architectures()[model_type]
    renamed = build(model_type, "Model")
    renamed.config.model_type = f"unregistered-{model_type}"
    assert lsg_patch.architecture_support(renamed).startswith("inferred: ")
    inferred = infer_entry(renamed, renamed.config.model_type)
    different = {f.name: (getattr(inferred, f.name), getattr(registered, f.name))
                 for f in dataclasses.fields(registered)
                 if f.name not in DISTINCT and getattr(inferred, f.name) != getattr(registered, f.name)}
    assert not different, different

    reference = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    lsg_patch.to_lsg(renamed, max_length=MAX_LENGTH, **LSG)
    inputs = batch_inputs(reference, "Model")
    with torch.no_grad():
        expected, got = reference(**inputs), renamed(**inputs)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name


BART_RELATIVES = {"plbart": "BartFamily", "blenderbot": "BartFamily", "blenderbot-small": "PegasusFamily",
                  "marian": "PegasusFamily"}  # the adapter: who scales the word vectors


def unregistered(model_type: str, **overrides) -> torch.nn.Module:
    model = unregistered_model(model_type, **overrides)
    assert model_type not in lsg_patch.supported_architectures()
    return model


@pytest.mark.parametrize("model_type", sorted(BART_RELATIVES))
@pytest.mark.parametrize("mask_first_token", [False, True])
def test_bart_relatives_convert_by_inference_and_match_their_own_modules(model_type: str, mask_first_token: bool
                                                                         ) -> None:
    plain = unregistered(model_type, attn_implementation="eager")
    entry = infer_entry(plain, model_type)
    assert entry.adapter.endswith(":" + BART_RELATIVES[model_type])
    assert entry.position_kind == ("sinusoidal" if model_type == "marian" else "learned")
    assert entry.position_offset == (2 if model_type == "plbart" else 0)
    assert_seq2seq_matches_plain_modules(plain, mask_first_token)


def test_a_sinusoidal_table_is_regenerated_and_a_learned_one_tiled() -> None:
    marian = lsg_patch.to_lsg(unregistered("marian"), max_length=MAX_LENGTH, **LSG)
    table = marian.encoder.embed_positions.weight
    assert table.shape[0] == MAX_LENGTH and not torch.equal(table[64:], table[:64])  # new positions, not a repeat
    blenderbot = lsg_patch.to_lsg(unregistered("blenderbot"), max_length=MAX_LENGTH, **LSG)
    table = blenderbot.encoder.embed_positions.weight
    assert table.shape[0] == MAX_LENGTH and torch.equal(table[64:], table[:64])


def test_a_t5_relative_converts_by_inference_and_matches_its_own_modules() -> None:
    """Switch Transformers: T5's layout (layer 0 owns the bias), its feed-forward a mixture of experts."""
    plain = unregistered("switch_transformers", attn_implementation="eager")
    assert infer_entry(plain, "switch_transformers").adapter.endswith(":T5Family")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LOCAL_LSG)
    ids = torch.randint(5, 99, (2, LOCAL_LENGTH), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, LOCAL_LENGTH, dtype=torch.long)
    mask[1, LOCAL_PADDED:] = 0
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = t5_oracle_encoder(plain, model, ids, mask)
    valid = torch.cat([torch.ones(2, LOCAL_LSG["num_global_tokens"], dtype=torch.bool), mask.bool()], 1)
    torch.testing.assert_close(encoded[valid], expected[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("model_type", "reason"), [
    ("mvp", "MvpAttention does not call ALL_ATTENTION_FUNCTIONS"),
    ("m2m_100", r"encoder.embed_positions \(M2M100SinusoidalPositionalEmbedding\) is not a position table"),
])  # fmt: skip
def test_a_relative_that_cannot_take_the_layout_is_refused_with_the_reason(model_type: str, reason: str) -> None:
    model = unregistered(model_type)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=reason):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    assert model.state_dict().keys() == state.keys() and not lsg_patch.is_lsg_model(model)
