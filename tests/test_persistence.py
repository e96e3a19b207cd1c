"""save_pretrained -> from_pretrained of LSG models: bit-exact, every setting kept, no key warnings."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

import lsg_patch
from lsg_patch.config import LSGConfig
from lsg_patch.swap import LOAD_NOTE_KEY
from tests.tiny_models import BERT_FAMILY, tiny_model

HEADS = (AutoModelForSequenceClassification, AutoModelForMaskedLM, AutoModelForTokenClassification)
OPTIONS = dict(block_size=16, sparse_block_size=8, sparsity_factor=4, sparsity_type="bos_pooling", num_global_tokens=3,
               mask_first_token=True, bos_token_id=1, mask_token_id=2)  # fmt: skip


@pytest.fixture
def hf_warnings(caplog):
    """transformers' own log records (its loggers do not propagate by default)."""
    transformers.utils.logging.enable_propagation()
    caplog.set_level(logging.WARNING, logger="transformers")
    yield caplog
    transformers.utils.logging.disable_propagation()


def batch(length: int = 150, vocab: int = 99) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def key_warnings(caplog) -> list[str]:
    words = ("missing", "unexpected", "mismatch", "newly initialized")
    return [r.getMessage() for r in caplog.records if any(w in r.getMessage().lower() for w in words)]


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"state_dict entries differ: {different[:5]}"
    with torch.no_grad():
        out_a, out_b = a(**inputs), b(**inputs)
    assert torch.equal(out_a[0], out_b[0])


@pytest.mark.parametrize("model_type", BERT_FAMILY)
@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
def test_round_trip_is_bit_exact_with_no_key_warnings(model_type, head, tmp_path, hf_warnings) -> None:
    model = tiny_model(model_type, head)
    lsg_patch.to_lsg(model, max_length=256, **OPTIONS)
    model.save_pretrained(tmp_path)
    hf_warnings.clear()
    with lsg_patch.enabled():
        again = head.from_pretrained(tmp_path)
    assert key_warnings(hf_warnings) == []
    assert lsg_patch.is_lsg_model(again) and type(again) is type(model)
    assert LSGConfig.from_model_config(again.config) == LSGConfig.from_model_config(model.config)
    assert again.config.max_position_embeddings == model.config.max_position_embeddings
    assert_same_model(model, again, batch())


def test_round_trip_keeps_a_reconfigured_model_and_its_dtype(tmp_path, hf_warnings) -> None:
    model = tiny_model("roberta", AutoModelForSequenceClassification)
    lsg_patch.to_lsg(model, max_length=256, **OPTIONS)
    lsg_patch.to_lsg(model, max_length=512, sparsity_type="stride", num_global_tokens=5)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    hf_warnings.clear()
    again = lsg_patch.from_pretrained(tmp_path)  # the class comes from the config's architectures
    assert key_warnings(hf_warnings) == []
    assert type(again).__name__ == "RobertaForSequenceClassification"
    assert again.config.sparsity_type == "stride" and again.config.num_global_tokens == 5 and again.config.block_size == 16
    assert again.roberta.embeddings.global_embeddings.weight.dtype == torch.bfloat16
    assert_same_model(model, again, batch(400))


def test_round_trip_of_a_seq2seq_model(tmp_path, hf_warnings) -> None:
    assert "bart" in lsg_patch.supported_architectures()
    config = AutoConfig.for_model("bart", vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config).eval()
    lsg_patch.to_lsg(model, max_length=256, block_size=16, sparse_block_size=16, num_global_tokens=2,
                     bos_token_id=0, mask_token_id=3)  # fmt: skip
    model.save_pretrained(tmp_path)
    hf_warnings.clear()
    with lsg_patch.enabled():
        again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert key_warnings(hf_warnings) == []
    inputs = batch(150)
    inputs["decoder_input_ids"] = inputs["input_ids"][:, :7]
    assert_same_model(model, again, inputs)


def test_a_checkpoint_loaded_without_lsg_patch_says_what_it_needs(tmp_path, hf_warnings) -> None:
    model = tiny_model("bert", AutoModelForSequenceClassification)
    lsg_patch.to_lsg(model, max_length=256, **OPTIONS)
    model.save_pretrained(tmp_path)
    note = json.loads((tmp_path / "config.json").read_text())[LOAD_NOTE_KEY]
    assert "lsg_patch.enabled()" in note and "lsg_patch.from_pretrained" in note
    hf_warnings.clear()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not lsg_patch.is_lsg_model(plain)
    assert getattr(plain.config, LOAD_NOTE_KEY) == note  # shown with the config, e.g. print(model.config)
    assert any("global_embeddings" in message for message in key_warnings(hf_warnings))


def test_from_lsg_after_reload_gives_the_plain_attention_back(tmp_path) -> None:
    model = tiny_model("bert", AutoModelForSequenceClassification)
    lsg_patch.to_lsg(model, max_length=256, **OPTIONS)
    model.save_pretrained(tmp_path)
    with lsg_patch.enabled():
        again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    lsg_patch.from_lsg(again)
    assert not lsg_patch.is_lsg_model(again)
    assert not hasattr(again.config, LOAD_NOTE_KEY) and not hasattr(again.config, "block_size")
    assert type(again.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sparsity_type": "nrom"}, r"invalid: sparsity_type='nrom' is not accepted"),
        ({"block_size": 10, "sparsity_factor": 4}, r"invalid: block_size=10 is not a multiple of sparsity_factor=4"),
        ({"num_global_tokens": 600}, r"invalid: num_global_tokens=600 is not accepted"),
    ],
)
def test_invalid_saved_settings_raise_before_weights_are_loaded(changes, message, tmp_path) -> None:
    model = tiny_model("bert")
    lsg_patch.to_lsg(model, max_length=256, **OPTIONS)
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with lsg_patch.enabled(), pytest.raises(ValueError, match=message):
        transformers.AutoModel.from_pretrained(tmp_path)


def test_lsg_config_with_weights_lacking_the_global_table_raises(tmp_path) -> None:
    tiny_model("bert").save_pretrained(tmp_path)
    edit_config(tmp_path, block_size=16, sparsity_type="norm", num_global_tokens=1)
    with lsg_patch.enabled(), pytest.raises(ValueError, match=r"lack embeddings.global_embeddings.weight"):
        transformers.AutoModel.from_pretrained(tmp_path)


def test_lsg_patch_from_pretrained_refuses_a_plain_checkpoint(tmp_path) -> None:
    tiny_model("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not an LSG checkpoint"):
        lsg_patch.from_pretrained(tmp_path)
