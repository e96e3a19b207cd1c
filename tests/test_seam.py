"""The seam: LSG as the "lsg" transformers attention implementation, selected for converted modules only.

After to_lsg every self-attention module keeps transformers' own class and parameters and runs "lsg"; every
other module (decoder self-attention, cross-attention) and every other model keep their implementation with
bit-identical outputs; from_lsg gives back the original config object; a module that would silently keep
dense attention is refused before anything changes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, create_bidirectional_mask

import lsg_patch
from lsg_patch import seam
from lsg_patch.registry_paths import find_modules
from tests.helpers import LSG, MAX_LENGTH, batch_inputs, registered_heads
from tests.tiny_models import build

ORIGINAL_CLASSES = {  # what each registry type's self-attention modules are in transformers
    "bert": "BertSelfAttention", "roberta": "RobertaSelfAttention", "camembert": "CamembertSelfAttention",
    "xlm-roberta": "XLMRobertaSelfAttention", "electra": "ElectraSelfAttention", "albert": "AlbertAttention",
    "distilbert": "DistilBertSelfAttention", "bart": "BartAttention", "mbart": "MBartAttention",
    "pegasus": "PegasusAttention", "gpt2": "GPT2Attention", "llama": "LlamaAttention", "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention", "qwen3": "Qwen3Attention", "gte": "GteAttention", "nomic_bert": "NomicBertAttention",
    "jina_embeddings_v3": "JinaEmbeddingsV3Attention", "eurobert": "EuroBertAttention", "modernbert": "ModernBertAttention",
    "t5": "T5Attention", "mt5": "MT5Attention", "umt5": "UMT5Attention",
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(lsg_patch.supported_architectures()))
def test_self_attention_keeps_its_class_and_parameters_and_runs_lsg(model_type: str) -> None:
    model = build(model_type, "Model")
    entry = lsg_patch.supported_architectures()[model_type]
    before = [(type(m), {n: p for n, p in m.named_parameters()}) for _, _, m in find_modules(model, entry.self_attention)]
    lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    after = [m for _, _, m in find_modules(model, entry.self_attention)]
    assert [type(m).__name__ for m in after] == [ORIGINAL_CLASSES[model_type]] * len(after)
    for (cls, parameters), module in zip(before, after):
        assert type(module) is cls
        assert all(p is parameters[n] for n, p in module.named_parameters())  # the very same tensors
        sliding = entry.keep_sliding_window_layers and getattr(module, "sliding_window", None) is not None
        assert module.config._attn_implementation == ("lsg_sliding" if sliding else "lsg")
    assert seam.selected_modules(model)
    assert model.config._attn_implementation != "lsg"  # the model's own config is not switched


@pytest.mark.parametrize("model_type", ["bart", "mbart", "pegasus", "t5", "umt5"])
def test_decoder_keeps_its_implementation_and_outputs(model_type: str) -> None:
    plain = build(model_type, "Model")
    model = lsg_patch.to_lsg(copy.deepcopy(plain), max_length=MAX_LENGTH, **LSG)
    for name, module in model.decoder.named_modules():
        if hasattr(module, "config"):
            assert module.config._attn_implementation == plain.config._attn_implementation, name
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(2, 40, plain.config.d_model, generator=generator)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    ids = torch.randint(5, 99, (2, 9), generator=generator)
    with torch.no_grad():
        expected = plain.decoder(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask)
        got = model.decoder(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


def test_bert_cross_attention_keeps_its_implementation() -> None:
    model = lsg_patch.to_lsg(build("bert", "LMHeadModel", add_cross_attention=True), max_length=MAX_LENGTH, **LSG)
    model = model.bert
    for layer in model.encoder.layer:
        assert layer.attention.self.config._attn_implementation == "lsg"
        assert layer.crossattention.self.config is model.config


def test_unconverted_model_in_the_same_process_is_bit_identical() -> None:
    other = build("bert", "Model")
    inputs = batch_inputs(other, "Model", length=60, padded_length=41)  # within the unconverted 64 positions
    with torch.no_grad():
        before = other(**inputs).last_hidden_state
        lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)
        after = other(**inputs).last_hidden_state
    assert torch.equal(before, after)
    assert all(getattr(m, "config", other.config) is other.config for m in other.modules())


@pytest.mark.parametrize("model_type", ["bert", "albert", "distilbert", "bart", "modernbert"])
def test_from_lsg_gives_back_the_previous_implementation(model_type: str) -> None:
    model = build(model_type, "Model")
    implementation = model.config._attn_implementation
    configs = {name: module.config for name, module in model.named_modules() if hasattr(module, "config")}
    lsg_patch.from_lsg(lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG))
    assert {name: module.config for name, module in model.named_modules() if hasattr(module, "config")} == configs
    # modules that held the model's config hold the model's own copy (the conversion made it, item 5 of issue 19),
    # the others their own object again
    shared = configs[""]
    assert all(module.config is (model.config if configs[name] is shared else configs[name])
               for name, module in model.named_modules() if hasattr(module, "config"))  # fmt: skip
    assert model.config._attn_implementation == implementation
    assert not seam.selected_modules(model)


def test_registered_keys_are_added_never_replaced() -> None:
    sdpa = AttentionInterface._global_mapping["sdpa"]
    sdpa_mask = AttentionMaskInterface._global_mapping["sdpa"]
    lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)
    assert AttentionInterface._global_mapping["lsg"] is seam.lsg_attention_function
    assert "lsg" in AttentionMaskInterface._global_mapping
    assert AttentionInterface._global_mapping["sdpa"] is sdpa
    assert AttentionMaskInterface._global_mapping["sdpa"] is sdpa_mask


def test_a_foreign_lsg_function_is_refused_and_the_model_left_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(AttentionInterface._global_mapping, "lsg", lambda *args, **kwargs: None)
    model = build("bert", "Model")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="already holds another function under 'lsg'"):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    assert not lsg_patch.is_lsg_model(model) and not seam.selected_modules(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_mask_requested_under_lsg_is_sdpas_not_dropped() -> None:
    config = build("bert", "Model").config
    embeds = torch.zeros(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    seam.register_with_transformers()
    config._attn_implementation = "sdpa"
    expected = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask)
    config._attn_implementation_internal = "lsg"
    got = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask)
    assert got is not None and torch.equal(got, expected)


class _DenseOnlyAttention(nn.Module):
    """An attention module whose forward never consults transformers' AttentionInterface."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        return hidden_states, None


def test_module_outside_the_interface_is_refused_before_any_change() -> None:
    model = build("bert", "Model")
    model.encoder.layer[1].attention.self = _DenseOnlyAttention(model.encoder.layer[1].attention.self)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="_DenseOnlyAttention.*does not call its attention through"):
        lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    assert not seam.selected_modules(model) and not lsg_patch.is_lsg_model(model)
    assert model.state_dict().keys() == state.keys()


def test_an_lsg_layer_called_alone_says_how_to_call_it() -> None:
    model = lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)
    with pytest.raises(RuntimeError, match="call the whole model"):
        model.encoder.layer[0](torch.zeros(1, 40, 32))


def test_a_bert_decoder_with_cross_attention_refuses_a_cache_and_runs_without() -> None:
    """Its cache would hold the encoder's keys too (EncoderDecoderCache); LSGCache covers self-attention only
    (the cache itself is tested in test_cache.py)."""
    model = lsg_patch.to_lsg(build("bert", "LMHeadModel", add_cross_attention=True), max_length=MAX_LENGTH, **LSG)
    generator = torch.Generator().manual_seed(0)
    ids, states = torch.randint(5, 99, (1, 40), generator=generator), torch.randn(1, 9, 32, generator=generator)
    with pytest.raises(ValueError, match="cross-attention.*use_cache=False"):
        model(ids, encoder_hidden_states=states, use_cache=True)
    assert model(ids, encoder_hidden_states=states, use_cache=False).logits.shape == (1, 40, 99)


def test_model_config_changes_still_reach_converted_modules() -> None:
    model = lsg_patch.to_lsg(build("bert", "Model"), max_length=MAX_LENGTH, **LSG)
    module = model.encoder.layer[0].attention.self
    model.config.some_new_setting = 7
    assert module.config.some_new_setting == 7
    assert copy.deepcopy(model).encoder.layer[0].attention.self.config._attn_implementation == "lsg"


@pytest.mark.parametrize(("model_type", "head"), [c for c in registered_heads() if c[1] == "Model"])
def test_every_type_really_runs_lsg(model_type: str, head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "lsg" function is what every converted layer calls (dense attention would not pass through it)."""
    calls = []
    original = seam.lsg_attention_function

    def counting(module, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(module)
        return original(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "lsg", counting)
    model = build(model_type, head)
    config = model.config
    layers = getattr(config, "encoder_layers", None) or getattr(config, "n_layers", None) or config.num_hidden_layers
    if lsg_patch.supported_architectures()[model_type].keep_sliding_window_layers:  # the others run "lsg_sliding"
        layers = config.layer_types.count("full_attention")
    monkeypatch.setattr(seam.interface, "lsg_attention_function", counting)  # registration sees its own function
    lsg_patch.to_lsg(model, max_length=MAX_LENGTH, **LSG)
    with torch.no_grad():
        model(**batch_inputs(model, head))
    assert len(calls) == layers


def test_print_shows_which_modules_run_lsg_and_how() -> None:
    model = lsg_patch.to_lsg(build("bart", "Model"), max_length=MAX_LENGTH, **LSG)
    text = repr(model)
    assert "attn_implementation='lsg'" in repr(model.encoder.layers[1].self_attn)
    assert "lsg" not in repr(model.decoder)  # decoder self- and cross-attention are not LSG
    assert "block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type='norm'" in text
    lsg_patch.to_lsg(model, sparsity_type="pooling")
    assert "sparsity_type='pooling'" in repr(model) and "sparsity_type='norm'" not in repr(model)
    lsg_patch.from_lsg(model)
    assert "lsg" not in repr(model)
