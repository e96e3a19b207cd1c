"""`lsg-patch run -- python script.py`: unmodified scripts (that know nothing of lsg_patch) get LSG models."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM, AutoTokenizer

import lsg_patch
from lsg_patch.cli import main
from tests.helpers import minilm_folder as minilm_path
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
# Written for plain transformers: a pipeline on a long text, and a model loaded in a second thread.
SCRIPT = """
import sys, threading
from transformers import AutoModelForMaskedLM, pipeline

path = sys.argv[1]
fill = pipeline("fill-mask", model=path, tokenizer=path)
text = "word " * (min(600, fill.tokenizer.model_max_length) - 10) + fill.tokenizer.mask_token + " end"
guesses = fill(text)
loaded = {}
thread = threading.Thread(target=lambda: loaded.setdefault("model", AutoModelForMaskedLM.from_pretrained(path)))
thread.start()
thread.join()
config = fill.model.config
print("RESULT", hasattr(fill.model.bert.embeddings, "global_embeddings"),
      hasattr(loaded["model"].bert.embeddings, "global_embeddings"), getattr(config, "block_size", None),
      config.max_position_embeddings, len(guesses))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A plain tiny BERT (128 positions, MiniLM tokenizer) and its LSG conversion, saved."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    plain = tmp_path_factory.mktemp("plain")
    model = tiny_model("bert", AutoModelForMaskedLM, vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    lsg = tmp_path_factory.mktemp("lsg")
    lsg_patch.to_lsg(model, max_length=1024, tokenizer=tokenizer, block_size=32, sparse_block_size=32)
    model.save_pretrained(lsg)
    tokenizer.save_pretrained(lsg)
    script = tmp_path_factory.mktemp("script") / "script.py"
    script.write_text(SCRIPT)
    return {"plain": plain, "lsg": lsg, "script": script}


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([*args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def result_line(completed: subprocess.CompletedProcess) -> list[str]:
    assert completed.returncode == 0, completed.stderr[-3000:]
    return next(line for line in completed.stdout.splitlines() if line.startswith("RESULT")).split()[1:]


def test_the_script_alone_gets_plain_models(folders) -> None:
    """The control: without `run`, plain transformers drops the global tokens (and the test would be vacuous)."""
    assert result_line(run(sys.executable, str(folders["script"]), str(folders["lsg"])))[:2] == ["False", "False"]


def test_run_loads_lsg_checkpoints_as_lsg_models_in_every_thread(folders) -> None:
    completed = run(sys.executable, "-m", "lsg_patch.cli", "run", "--", sys.executable, str(folders["script"]),
                    str(folders["lsg"]))  # fmt: skip
    assert result_line(completed) == ["True", "True", "32", "1024", "5"]


def test_python_m_lsg_patch_run_passes_options_to_enabled(folders) -> None:
    completed = run(sys.executable, "-m", "lsg_patch", "run", "--max-length", "512", "--block-size", "64", "--",
                    sys.executable, str(folders["script"]), str(folders["plain"]))  # fmt: skip
    assert result_line(completed) == ["True", "True", "64", "512", "5"]


def test_bad_run_options_fail_with_one_line_before_the_command_runs(tmp_path, capsys) -> None:
    """In-process is safe here: options are validated before the process would be replaced by the command."""
    marker = tmp_path / "ran"
    assert main(["run", "--block-size", "0", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]) == 1
    assert not marker.exists()
    assert capsys.readouterr().err == "lsg-patch: error: block_size=0 is not accepted: it must be at least 1\n"
    assert main(["run", "--sparsity-factor", "3", "--block-size", "64", "--", "true"]) == 1
    assert "block_size=64 is not a multiple of sparsity_factor=3" in capsys.readouterr().err
    assert main(["run", "--"]) == 1
    assert "needs a command after --" in capsys.readouterr().err


def test_python_m_lsg_patch_is_the_lsg_patch_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lsg-patch": "lsg_patch.cli:main"}
    as_module = run(sys.executable, "-m", "lsg_patch", "--help")
    as_cli = run(sys.executable, "-c", "import sys; from lsg_patch.cli import main; sys.exit(main())", "--help")
    assert as_module.returncode == 0 and as_module.stdout == as_cli.stdout and "run" in as_module.stdout


def test_the_bootstrap_runs_the_sitecustomize_it_shadows(tmp_path) -> None:
    """A virtualenv's or distribution's sitecustomize (coverage, path set-up, ...) still runs under lsg-patch run."""
    from lsg_patch.run import child_environment

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIR_SITECUSTOMIZE'] = 'ran'\n")
    env = child_environment({"max_length": 256}, dict(os.environ, PYTHONPATH=os.pathsep.join([str(theirs), str(ROOT)])))
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith("_bootstrap")
    check = ("import os, sys, lsg_patch.context as c; "
             "print(os.environ.get('THEIR_SITECUSTOMIZE'), c._PROCESS_BLOCK.options.max_length, 'lsg_patch' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["ran", "256", "True"]
