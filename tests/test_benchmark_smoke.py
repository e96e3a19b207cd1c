"""Keeps benchmarks/ from rotting: the fastest run of the benchmark script, and its score count checked
against lsg_patch's own key index (two independent derivations of the same layout)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from microbench_attention import LAYOUTS, useful_scores  # noqa: E402

from lsg_patch.attention import AttentionLayout  # noqa: E402
from lsg_patch.attention.masks import block_key_index  # noqa: E402


def test_benchmark_script_runs_lsg_and_sdpa_on_a_toy_model(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "toy", "--lengths", "256", "512",
               "--runs", "1", "--warmup", "0", "--systems", "lsg-128-128-norm", "sdpa", "--no-extras", "--no-plot",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["system"], r["length"], r["phase"]): r for r in report["rows"]}
    assert set(rows) == {(s, n, p) for s in ("lsg-128-128-norm", "sdpa") for n in (256, 512)
                         for p in ("forward", "train")}
    markdown = (tmp_path / "results.md").read_text()
    for row in rows.values():  # the report states what was measured: one run, its time, memory within the process'
        assert row["status"] == "ok", row
        assert row["runs"] == len(row["times"]) == 1 and row["median_s"] == row["times"][0], row
        assert 0 <= row["peak_mib"] <= row["rss_mib"], row
        assert f"{row['median_s']:.3f} (1)" in markdown, row
    assert "lsg_patch 128/128 norm" in markdown and "full sdpa" in markdown


@pytest.mark.slow
def test_generation_benchmark_runs_and_reports_a_constant_cache(tmp_path: Path) -> None:
    out = tmp_path / "generation.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = out.read_text()
    assert "| norm | 461,184 |" in report  # globals, 2 x 128 token slots (2 key heads), 192 items per key head
    assert "900 tokens 461,184 bytes per layer" in report  # after 600 and 900 tokens: the same size
    assert "ms per token" in report and "Log-log slope" in report


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [256, 512, 1024, 4096])
def test_useful_score_count_matches_the_product_key_index(name: str, tokens: int) -> None:
    layout = AttentionLayout(**LAYOUTS[name])
    g = layout.num_global_tokens
    if layout.uses_full_attention(tokens):
        expected = (g + tokens) ** 2
    else:
        _, exists = block_key_index(layout, tokens)
        expected = int(exists[0].sum()) * layout.block_size + g * (g + tokens)
    assert useful_scores(layout, tokens) == expected
