"""sentence-transformers as a first-class user: to_lsg on a SentenceTransformer, its saved folders under enabled(),
and `lsg-patch convert` on a sentence-transformers folder (all-MiniLM-L6-v2: Transformer, Pooling, Normalize)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lsg_patch
from lsg_patch.demo import PARAGRAPH, minilm_path

sentence_transformers = pytest.importorskip("sentence_transformers")
SentenceTransformer = sentence_transformers.SentenceTransformer
ROOT = Path(__file__).resolve().parents[1]
LONG = PARAGRAPH * 20  # about 1200 tokens
OPTIONS = dict(block_size=32, sparse_block_size=32)


@pytest.fixture(scope="module")
def original() -> "SentenceTransformer":
    return SentenceTransformer(minilm_path(), device="cpu")


@pytest.fixture(scope="module")
def converted(original) -> "SentenceTransformer":
    return lsg_patch.to_lsg(copy.deepcopy(original), max_length=1024, **OPTIONS)


def embed(model, text: str = LONG) -> torch.Tensor:
    return model.encode([text], convert_to_tensor=True)[0]


def test_to_lsg_accepts_a_sentence_transformer_and_raises_its_length(original, converted) -> None:
    assert original.max_seq_length == 256
    assert lsg_patch.is_lsg_model(converted) and not lsg_patch.is_lsg_model(original)
    assert converted.max_seq_length == 1024 and converted.tokenizer.model_max_length == 1024
    assert converted[0].auto_model.config.block_size == 32
    features = converted.tokenize([LONG])
    assert features["input_ids"].shape[1] == 1024  # what encode() feeds the model: the long text, not 256 tokens
    vector = embed(converted)
    assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)  # the Normalize module still runs
    assert not torch.allclose(vector, embed(original), atol=1e-3)  # it read past token 256


def test_a_failed_to_lsg_leaves_the_sentence_transformer_as_it_was(original) -> None:
    model = copy.deepcopy(original)
    with pytest.raises(ValueError, match="block_size=30 is not a multiple of sparsity_factor=4"):
        lsg_patch.to_lsg(model, max_length=1024, block_size=30, sparsity_factor=4)
    assert model.max_seq_length == 256 and not lsg_patch.is_lsg_model(model)


def test_a_folder_saved_by_sentence_transformers_loads_back_under_enabled(converted, tmp_path) -> None:
    converted.save(str(tmp_path))
    with lsg_patch.enabled():
        again = SentenceTransformer(str(tmp_path), device="cpu")
    assert lsg_patch.is_lsg_model(again) and again.max_seq_length == 1024
    torch.testing.assert_close(embed(again), embed(converted), atol=1e-6, rtol=0)


def test_the_cli_keeps_a_sentence_transformers_folder_one(converted, tmp_path) -> None:
    output = tmp_path / "minilm-lsg"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "lsg_patch", "convert", minilm_path(), str(output), "--max-length", "1024",
         "--block-size", "32", "--sparse-block-size", "32"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sentence-transformers folder: kept modules.json" in result.stdout
    modules = json.loads((output / "modules.json").read_text())
    assert [m["type"].rpartition(".")[2] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((output / "sentence_bert_config.json").read_text())["max_seq_length"] == 1024
    assert (output / "1_Pooling" / "config.json").is_file()
    with lsg_patch.enabled():
        model = SentenceTransformer(str(output), device="cpu")
    assert lsg_patch.is_lsg_model(model) and model.max_seq_length == 1024
    vector = embed(model)
    assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(vector, embed(converted), atol=1e-5, rtol=0)  # the CLI writes what to_lsg(st) gives


def test_the_cli_converts_a_transformer_module_kept_in_a_subfolder(tmp_path) -> None:
    """Layouts where modules.json puts the Transformer module in its own folder (0_Transformer) convert too."""
    from transformers import AutoModel, AutoTokenizer

    from lsg_patch.cli import main
    from tests.tiny_models import tiny_model

    source = tmp_path / "st"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tiny_model("bert", AutoModel, vocab_size=tokenizer.vocab_size, max_position_embeddings=128).save_pretrained(
        source / "0_Transformer")
    tokenizer.save_pretrained(source / "0_Transformer")
    (source / "0_Transformer" / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    pooling = json.loads((Path(minilm_path()) / "1_Pooling" / "config.json").read_text())
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": 32}))
    modules = [{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]  # fmt: skip
    (source / "modules.json").write_text(json.dumps(modules))

    output = tmp_path / "out"
    assert main(["convert", str(source), str(output), "--max-length", "512", "--block-size", "32"]) == 0
    assert json.loads((output / "modules.json").read_text()) == modules
    assert json.loads((output / "0_Transformer" / "config.json").read_text())["block_size"] == 32
    assert json.loads((output / "0_Transformer" / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    with lsg_patch.enabled():
        model = SentenceTransformer(str(output), device="cpu")
    assert lsg_patch.is_lsg_model(model) and model.max_seq_length == 512
    vector = embed(model, PARAGRAPH * 8)
    assert vector.shape == (32,) and vector.norm().item() == pytest.approx(1.0, abs=1e-5)
