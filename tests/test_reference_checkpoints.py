"""Checkpoints saved by the public LSG project load with no remote code and reproduce its recorded outputs.

Each folder is built from a golden case the way the reference saves it: config.json with the LSG keys,
`auto_map`, `base_model_prefix: "lsg"` and an `LSG...` architecture; weights under the head's prefix; and a
`modeling_lsg_*.py` next to them — here one that leaves a marker file if it is ever executed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import lsg_patch
from tests.golden_cases import case_names, load_case

ATOL = 1e-5
ENCODER_CASES = [n for n in case_names() if not n.startswith(("bart", "convert_"))]
PREFIX = {"bert": "bert.", "roberta": "roberta."}


def reference_folder(folder: Path, case_name: str, head: str = "Model") -> Path:
    """A checkpoint folder as the reference saves it for LSG<Family><head>."""
    case = load_case(case_name)
    family = case.meta["reference_class"][len("LSG") : -len("Model")]  # "Bert", "Roberta"
    config = dict(case.meta["config"], architectures=[f"LSG{family}{head}"])
    weights = {k: v.contiguous() for k, v in case.weights.items()}
    if head != "Model":
        plain = getattr(transformers, f"{family}{head}")(case.plain_config()).eval()
        prefix = PREFIX[case.model_type]
        keep_pooler = any(k.startswith(prefix + "pooler.") for k in plain.state_dict())
        weights = {prefix + k: v for k, v in weights.items() if keep_pooler or not k.startswith("pooler.")}
        tied = ("cls.predictions.decoder.",)  # tied to the word embeddings and cls.predictions.bias: not saved
        weights.update({k: v.clone() for k, v in plain.state_dict().items() if not k.startswith((prefix, *tied))})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    marker = folder / "REMOTE_CODE_RAN"
    (folder / f"modeling_lsg_{case.model_type}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


def golden_inputs(case_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors = load_case(case_name).tensors
    inputs = {"input_ids": tensors["inputs.input_ids"], "attention_mask": tensors["inputs.attention_mask"]}
    return inputs, {k[len("outputs.") :]: v for k, v in tensors.items() if k.startswith("outputs.")}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g}"


@pytest.mark.parametrize("name", ENCODER_CASES)
def test_reference_base_model_checkpoint_reproduces_reference_outputs(name, tmp_path) -> None:
    folder = reference_folder(tmp_path / name, name)
    with lsg_patch.enabled():
        model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert not (folder / "REMOTE_CODE_RAN").exists()
    assert lsg_patch.is_lsg_model(model) and not hasattr(model.config, "auto_map")
    inputs, expected = golden_inputs(name)
    with torch.no_grad():
        out = model(**inputs)
    assert_close(out.last_hidden_state, expected["last_hidden_state"], f"{name} last_hidden_state")
    if "pooler_output" in expected:
        assert_close(out.pooler_output, expected["pooler_output"], f"{name} pooler_output")


def test_reference_masked_lm_checkpoint_loads_through_every_entry_point(tmp_path) -> None:
    folder = reference_folder(tmp_path / "mlm", "bert_global4_maskfirst", "ForMaskedLM")
    inputs, expected = golden_inputs("bert_global4_maskfirst")
    with lsg_patch.enabled():
        by_auto = transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
        by_class = transformers.BertForMaskedLM.from_pretrained(folder)
    by_helper = lsg_patch.from_pretrained(folder)  # picks BertForMaskedLM from architectures=["LSGBertForMaskedLM"]
    assert not (folder / "REMOTE_CODE_RAN").exists()
    with torch.no_grad():
        oracle_logits = by_auto.cls(expected["last_hidden_state"])  # the reference head reads the trimmed sequence
        for model in (by_auto, by_class, by_helper):
            assert type(model) is transformers.BertForMaskedLM
            assert model.config.num_global_tokens == 4 and model.config.mask_first_token is True
            assert_close(model.bert(**inputs).last_hidden_state, expected["last_hidden_state"], "MLM base output")
            assert_close(model(**inputs).logits, oracle_logits, "MLM logits")


def test_reference_roberta_classifier_checkpoint(tmp_path) -> None:
    folder = reference_folder(tmp_path / "cls", "roberta_norm", "ForSequenceClassification")
    inputs, expected = golden_inputs("roberta_norm")
    with lsg_patch.enabled():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        oracle = model.classifier(expected["last_hidden_state"])
        assert_close(model(**inputs).logits, oracle, "classifier logits")


def test_reference_checkpoint_resaved_by_lsg_patch_is_self_contained(tmp_path) -> None:
    folder = reference_folder(tmp_path / "ref", "bert_stride")
    with lsg_patch.enabled():
        model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "auto_map" not in saved and saved["architectures"] == ["BertModel"]
    assert saved["block_size"] == model.config.block_size and saved["sparsity_type"] == model.config.sparsity_type
    with lsg_patch.enabled():
        again = transformers.AutoModel.from_pretrained(tmp_path / "resaved")
    inputs, _ = golden_inputs("bert_stride")
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, again(**inputs).last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_reference_checkpoint_with_the_model_card_overrides(tmp_path) -> None:
    folder = reference_folder(tmp_path / "card", "bert_none")
    with lsg_patch.enabled():
        model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True, num_global_tokens=16,
                                                       block_size=64, sparse_block_size=64, sparsity_factor=4,
                                                       sparsity_type="none", mask_first_token=True, pool_with_global=True,
                                                       pass_global_tokens_to_decoder=True,
                                                       attention_probs_dropout_prob=0.0)  # fmt: skip
    assert not (folder / "REMOTE_CODE_RAN").exists()
    assert model.config.num_global_tokens == 16 and model.config.block_size == 64
    golden_table = load_case("bert_none").weights["embeddings.global_embeddings.weight"]
    assert torch.equal(model.embeddings.global_embeddings.weight, golden_table)  # resized use, same trained rows
