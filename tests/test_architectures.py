"""Every registry entry x every head class it lists, on tiny random models.

For each head: the patched model runs on a long, padded batch (longer than two blocks, not a multiple of the
block size); the state_dict keys are the original ones plus exactly the global table; and the padded row gives
the same outputs as the same row run alone (so padding, block padding and the masks line up).
Families without golden files (ALBERT, DistilBERT, mBART, Pegasus) are also checked against an oracle built
from the unpatched model's own modules with plain attention (inputs of at most two blocks, where LSG is
full attention over [globals; tokens]).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

import lsg_patch
from tests.helpers import (DECODER_LENGTH, LENGTH, LSG, MAX_LENGTH, PADDED_ROW_LENGTH, SHORT,
                           SHORT_PADDED, additive_mask, assert_seq2seq_matches_plain_modules, batch_inputs, pooled_trim,
                           registered_heads, row_alone)
from tests.tiny_models import TINY_CONFIGS, build

# Head classes transformers has that an entry may leave out, with the reason.
NOT_PATCHABLE = {"ForCausalLM": "decoder-only head of an encoder-decoder family: it has no encoder to patch"}


def global_key(model: torch.nn.Module, entry: lsg_patch.ArchitectureEntry) -> str:
    prefix = "" if model.base_model is model else model.base_model_prefix + "."
    parent = entry.global_embeddings_parent + "." if entry.global_embeddings_parent else ""
    return f"{prefix}{parent}global_embeddings.weight"


@pytest.mark.parametrize(("model_type", "head"), registered_heads())
def test_head_runs_long_padded_batch_with_unchanged_keys(model_type: str, head: str, tmp_path) -> None:  # noqa: ANN001
    """... and comes back bit-exact from save_pretrained under enabled()."""
    model = build(model_type, head)
    entry = lsg_patch.supported_architectures()[model_type]
    keys_before = set(model.state_dict())
    lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    assert set(model.state_dict()) == keys_before | {global_key(model, entry)}

    inputs = batch_inputs(model, head)
    no_cache = {"use_cache": False} if model.config.is_encoder_decoder or model.config.is_decoder else {}
    with torch.no_grad():
        batch = model(**inputs, **no_cache)
        alone = model(**row_alone(inputs, PADDED_ROW_LENGTH), **no_cache)
    compared = 0
    for name, value in alone.items():
        if not isinstance(value, torch.Tensor):
            continue
        expected_rows = value.shape[1] if value.dim() > 1 else None
        got = batch[name][1:2]
        if value.dim() > 1 and got.shape[1] != expected_rows:  # per-token output: keep the row's real tokens
            got = got[:, :expected_rows]
        assert got.shape == value.shape, f"{name}: {tuple(got.shape)} vs {tuple(value.shape)}"
        assert torch.isfinite(batch[name]).all(), name
        diff = (got - value).abs().max().item()
        assert diff < 1e-4, f"{model_type} {head} {name}: padded row differs from the row alone by {diff:.3g}"
        compared += 1
    assert compared, "no tensor output was compared"
    model.save_pretrained(tmp_path)
    with lsg_patch.enabled():
        again = type(model).from_pretrained(tmp_path).eval()
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    with torch.no_grad():
        reloaded = again(**inputs, **no_cache)
    for name, value in batch.items():  # equal up to kernel-level float reordering (bit-equal on the fused CPU path)
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(reloaded[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(lsg_patch.supported_architectures()))
def test_encoder_rows_per_family(model_type: str) -> None:
    """Encoder-only families return one row per input token; encoder-decoders keep the G global rows in front."""
    model = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    inputs = batch_inputs(model, "Model")
    with torch.no_grad():
        out = model(**inputs)
    if model.config.is_encoder_decoder:
        assert out.encoder_last_hidden_state.shape[1] == LSG["num_global_tokens"] + LENGTH
        assert out.last_hidden_state.shape[1] == DECODER_LENGTH
    else:
        assert out.last_hidden_state.shape[1] == LENGTH


def test_every_registry_entry_has_a_tiny_config_and_is_exercised() -> None:
    registered = set(lsg_patch.supported_architectures())
    assert registered == set(TINY_CONFIGS), f"entries without a tiny test config: {registered - set(TINY_CONFIGS)}"
    assert {t for t, _ in registered_heads()} == registered


@pytest.mark.parametrize("model_type", sorted(lsg_patch.supported_architectures()))
def test_entry_lists_every_head_class_transformers_has(model_type: str) -> None:
    prefix = MODEL_MAPPING_NAMES[model_type][: -len("Model")]
    available = {
        name[len(prefix):] for name in dir(transformers)
        if name.startswith(prefix) and (name[len(prefix):].startswith("For") or name[len(prefix):] in ("Model", "LMHeadModel", "EncoderModel"))
    }  # fmt: skip
    heads = set(lsg_patch.supported_architectures()[model_type].heads)
    assert heads <= available, f"{model_type}: heads transformers does not have: {heads - available}"
    assert available - heads <= set(NOT_PATCHABLE), f"{model_type}: heads not listed: {available - heads - set(NOT_PATCHABLE)}"


@pytest.mark.parametrize("model_type", ["bart", "mbart", "pegasus"])
def test_decoder_only_head_is_refused_and_left_unchanged(model_type: str) -> None:
    model = build(model_type, "ForCausalLM")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'encoder'"):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())


# Oracles: the unpatched model's own modules with plain attention over [globals; tokens] (short inputs).


@pytest.mark.parametrize("model_type", ["albert", "distilbert"])
@pytest.mark.parametrize("mask_first_token", [False, True])
def test_encoder_only_family_matches_plain_modules(model_type: str, mask_first_token: bool) -> None:
    plain = build(model_type, "Model", attn_implementation="eager")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, mask_first_token=mask_first_token, **LSG)
    inputs = batch_inputs(model, "Model", SHORT, SHORT_PADDED)
    g = LSG["num_global_tokens"]
    key_mask = inputs["attention_mask"].clone()
    if mask_first_token:
        key_mask[:, 0] = 0
    with torch.no_grad():
        embeddings = plain.embeddings(inputs["input_ids"])
        table = model.embeddings.global_embeddings.weight[:g]
        globals_ = plain.embeddings.LayerNorm(table).expand(2, -1, -1)
        hidden = torch.cat([globals_, embeddings], dim=1)
        encoder = plain.encoder if model_type == "albert" else plain.transformer
        hidden = encoder(hidden, attention_mask=additive_mask(key_mask, g)).last_hidden_state
        expected = pooled_trim(hidden, g)
        out = model(**inputs)
    assert (out.last_hidden_state - expected).abs().max().item() < 1e-5
    if model_type == "albert":
        pooled = plain.pooler_activation(plain.pooler(expected[:, 0]))
        assert (out.pooler_output - pooled).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", ["bart", "mbart", "pegasus"])
@pytest.mark.parametrize("mask_first_token", [False, True])
def test_seq2seq_family_matches_plain_modules(model_type: str, mask_first_token: bool) -> None:
    """scale_embedding=True: the token rows are scaled by upstream's own embedding, the global rows are not."""
    assert_seq2seq_matches_plain_modules(build(model_type, "Model", attn_implementation="eager"), mask_first_token)


@pytest.mark.parametrize("model_type", ["bart", "pegasus"])
def test_seq2seq_without_global_tokens_for_the_decoder(model_type: str) -> None:
    """pass_global_tokens_to_decoder=False: the encoder output has one row per token, row 0 from global 0."""
    model = lsg_patch.to_lsg(
        build(model_type, "Model"), max_length=MAX_LENGTH, pass_global_tokens_to_decoder=False, **LSG
    )
    reference = lsg_patch.to_lsg(build(model_type, "Model"), max_length=MAX_LENGTH, **LSG)
    inputs = batch_inputs(model, "Model")
    with torch.no_grad():
        out = model(**inputs)
        with_globals = reference.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    encoded = with_globals.last_hidden_state
    g = LSG["num_global_tokens"]
    assert out.encoder_last_hidden_state.shape[1] == LENGTH
    assert torch.allclose(out.encoder_last_hidden_state, pooled_trim(encoded, g), atol=1e-6)
    assert model.config.pass_global_tokens_to_decoder is False


def test_albert_shared_layers_share_one_lsg_module() -> None:
    model = lsg_patch.to_lsg(build("albert", "Model", num_hidden_layers=4), max_length=MAX_LENGTH, **LSG)
    attention = model.encoder.albert_layer_groups[0].albert_layers[0].attention
    assert type(attention) is transformers.models.albert.modeling_albert.AlbertAttention
    assert attention.config._attn_implementation == "lsg"
    assert len(model.encoder.albert_layer_groups) == 1
    assert len(lsg_patch.seam.selected_modules(model)) == 1  # one shared module serves the 4 layers


@pytest.mark.parametrize("model_type", ["bart", "pegasus"])
def test_seq2seq_position_tables_and_from_lsg(model_type: str) -> None:
    model = build(model_type, "ForConditionalGeneration")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    offset = 2 if model_type == "bart" else 0
    for side in ("encoder", "decoder"):
        table = getattr(model.model, side).embed_positions.weight
        old = original[f"model.{side}.embed_positions.weight"]
        assert table.shape[0] == MAX_LENGTH + offset
        if model_type == "pegasus":  # sinusoidal: regenerated, so the first rows are the original ones
            assert torch.allclose(table[: old.shape[0]], old, atol=1e-6)
        else:  # tiled after the offset rows
            assert torch.equal(table[:offset], old[:offset])
            assert torch.equal(table[offset + 64 : offset + 128], old[offset:])
    assert model.config.max_position_embeddings == MAX_LENGTH
    lsg_patch.from_lsg(model)
    assert set(model.state_dict()) == set(original)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in original.items())
    assert model.config.max_position_embeddings == 64
