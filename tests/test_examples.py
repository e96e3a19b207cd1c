"""Run every example script (with --tiny) and the getting-started notebook, so they cannot rot."""
from __future__ import annotations

import os
import runpy
import tempfile
from pathlib import Path

import pytest
import torch

import lsg_patch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scripts import examples/_tiny.py as a sibling


def run_example(name: str, *argv: str):
    """Execute the script's code and call its main(argv), as `python examples/<name>.py ARGV` would."""
    namespace = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")
    return namespace["main"](list(argv))


def test_every_example_is_covered():
    scripts = {path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("_")}
    assert scripts == {"classify_long_document", "fill_mask", "summarize_bart", "train_global_tokens",
                       "convert_save_reload", "finetune_long", "generate_long", "late_chunking"}  # finetune_long runs in tests/test_quality.py
    assert [path.name for path in EXAMPLES.glob("*.ipynb")] == ["getting_started.ipynb"]


def test_classify_long_document(capsys):
    probabilities = run_example("classify_long_document", "--tiny")
    assert probabilities.shape == (2, 2)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))
    assert "documents of [" in capsys.readouterr().out


def test_fill_mask(capsys):
    guesses = run_example("fill_mask", "--tiny")
    assert len(guesses) == 5
    position = int(capsys.readouterr().out.split("mask at position ")[1].split()[0])
    assert position > 512  # the masked word lies past what the original model could read


def test_summarize_bart(capsys):
    assert "bart" in lsg_patch.supported_architectures()
    summary = run_example("summarize_bart", "--tiny")
    assert isinstance(summary, str)
    assert "summarized" in capsys.readouterr().out


def test_train_global_tokens():
    result = run_example("train_global_tokens", "--tiny")
    expected = ["bert.embeddings.global_embeddings.weight", "classifier.bias", "classifier.weight"]
    assert result["trainable"] == expected
    assert result["changed"] == expected
    assert len(result["losses"]) == 10


def test_convert_save_reload(tmp_path, capsys):
    difference = run_example("convert_save_reload", "--tiny", "--out", str(tmp_path / "saved"))
    assert difference < 1e-6
    assert (tmp_path / "saved" / "config.json").exists()
    assert "after from_lsg: is LSG False" in capsys.readouterr().out


def test_convert_save_reload_removes_its_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where tempfile creates folders without --out
    run_example("convert_save_reload", "--tiny")
    saved_to = capsys.readouterr().out.split("saved to ")[1].split(":")[0]
    assert Path(saved_to).parent == tmp_path and list(tmp_path.iterdir()) == []


def test_getting_started_notebook(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LSG_EXAMPLE_TOKENS", "1200")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(EXAMPLES / "getting_started.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs)
    assert "positions after: 4096" in text
    assert "document tokens: 1200" in text
    related, unrelated = (float(text.split(f"{word}: ")[1].split()[0]) for word in ("related", "unrelated"))
    assert related > unrelated
    assert (tmp_path / "attention_pattern.png").exists()
    assert any("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)
    assert "is LSG: False" in text


def test_generate_long(capsys):
    result = run_example("generate_long", "--tiny", "--new", "8")
    assert result["tokens"].shape == (8,)
    assert result["lsg_bytes"] < result["dense_bytes"] / 2  # 2048 tokens; the LSG cache holds about 450 rows
    assert "LSGCache:" in capsys.readouterr().out


def test_late_chunking(capsys):
    result = run_example("late_chunking", "--tiny")
    spans = result["spans"]
    assert len(spans) > 3 and spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert result["embeddings"].shape == (len(spans), 32) and len(result["best"]) == 3
    torch.testing.assert_close(result["embeddings"].norm(dim=-1), torch.ones(len(spans)))
    assert f"indexed {len(spans)} chunks" in capsys.readouterr().out
