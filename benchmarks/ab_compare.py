"""Two checkouts of lsg_patch side by side: the same benchmark rows, run in A-B-B-A order, as time ratios.

    python benchmarks/ab_compare.py --old ../old-checkout --new . --lengths 4096 16384 \
        --systems lsg-128-128-norm lsg-128-128-norm-nodrop --out benchmarks/results/ab.md

Each run is `benchmarks/run.py` of that checkout (fresh processes, its own lsg_patch first on sys.path), so the
two versions share the machine's state at the time: ratios stay meaningful on a noisy machine where absolute
times do not. Reported per row: the medians of both versions over their two runs, and new / old.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_rows(checkout: Path, system: str, length: int, runs: int, threads: int) -> dict[str, float]:
    """Median seconds per phase of one system at one length, measured by that checkout's run.py."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, str(checkout / "benchmarks" / "run.py"), "--lengths", str(length),
                        "--systems", system, "--runs", str(runs), "--min-runs", str(runs), "--threads", str(threads),
                        "--no-extras", "--no-plot", "--out", out], cwd=checkout, check=True, capture_output=True)
        rows = json.loads((Path(out) / "results.json").read_text())["rows"]
    return {row["phase"]: row["median_s"] for row in rows if row["status"] == "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--systems", nargs="+", default=["lsg-128-128-norm", "lsg-128-128-norm-nodrop"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = ["| system | tokens | phase | old s | new s | new / old |", "|---|---:|---|---:|---:|---:|"]
    for system in args.systems:
        for length in args.lengths:
            times: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
            for version in ("old", "new", "new", "old"):
                checkout = args.old if version == "old" else args.new
                for phase, seconds in run_rows(checkout.resolve(), system, length, args.runs, args.threads).items():
                    times[version].setdefault(phase, []).append(seconds)
                print(f"{system} {length} {version}: {times[version]}", flush=True)
            for phase in sorted(times["new"]):
                old, new = (statistics.median(times[v][phase]) for v in ("old", "new"))
                lines.append(f"| {system} | {length} | {phase} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
