"""Keeps benchmarks/gpu_check.py working where no GPU is: its quick CPU run passes and reports every check.

The GPU budget is small, so the script has to work the first time it meets a GPU; this runs the same code
paths on the CPU (fp16 and peak memory aside) and checks the report names every golden case and sparsity type.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.golden_cases import case_names

ROOT = Path(__file__).resolve().parent.parent
SPARSITY_TYPES = ("none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh")


def result_rows(report: str) -> dict[tuple[str, str], str]:
    """(check, dtype) -> the result cell of the report's correctness table."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("check", "---"):
            rows[cells[0], cells[1]] = cells[4]
    return rows


def test_quick_cpu_run_passes_and_reports_every_check(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    # one thread: on a small shared machine, extra threads only wait for cores (the checks do not depend on it)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    assert report in done.stdout  # the whole report is printed too
    rows = result_rows(report)
    expected = {("backend", "-")}
    expected |= {(f"golden {name}", dtype) for name in case_names() for dtype in ("float32", "bfloat16")}
    for kind in SPARSITY_TYPES:
        for suffix in ("", " causal"):
            expected |= {(f"product {kind}{suffix}", dtype) for dtype in ("float32", "bfloat16")}
            expected.add((f"gradient {kind}{suffix}", "float32"))
    expected |= {(f"dropout {kind}{suffix} = CPU", "float32") for kind in ("norm", "pooling", "lsh")
                 for suffix in ("", " causal")}
    assert expected <= set(rows), sorted(expected - set(rows))
    assert all(result.startswith("PASS") for result in rows.values()), {k: v for k, v in rows.items()
                                                                       if not v.startswith("PASS")}
    for tokens in (256, 512):
        for mode in ("forward", "train"):
            assert f"| attention | {tokens} | float32 | {mode} |" in report
    for system in ("lsg_patch 128/128 norm", "full sdpa"):
        for precision in ("fp32", "bf16 autocast"):
            assert f"| toy | {system} | 512 | {precision} |" in report
    assert "- toy shape, 512 tokens, fp32: lsg_patch trains in" in report
    for mode in ("forward", "train"):
        assert f"\n| 512 | float32 | {mode} |" in report  # a row of the grouped-query table
    for tokens in (256, 512):  # issue 20's rows: the triton backend runs on CUDA only
        for mode in ("forward", "train"):
            for dropout in ("0", "0.1"):
                row = f"| {tokens} | float32 | {mode} | {dropout} |"
                assert f"{row} LSG triton | CUDA only | - | - |" in report
                for system in ("LSG portable", "dense flash"):
                    assert f"{row} {system} |" in report and f"{row} {system} | error" not in report
    assert "FAIL" not in report and "PASS: all" in done.stdout
