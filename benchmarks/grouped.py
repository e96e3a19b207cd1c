#!/usr/bin/env python
"""Grouped-query attention on LSG's block path: key heads shared by their query heads (lsg_patch now) against
keys repeated to the query heads first (what the seam did before), `lsg_attention` alone.

Every (mode, length, phase) runs in a fresh process: time is the median of --runs after one warm-up, memory the
peak resident set size of one cold call above the inputs (Linux; glibc's mmap threshold at 64 KiB so that freed
buffers leave the RSS, as benchmarks/run.py --cold-memory). Modes alternate A-B-B-A.

    python benchmarks/grouped.py                       # 4096 and 16384 tokens, 32 heads sharing 8 key heads
    python benchmarks/grouped.py --lengths 4096 --heads 8 --kv-heads 2 --threads 1
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("shared", "repeated")
PHASES = ("forward", "train")


def peak_kib() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process: peak of a cold call first, then the timed runs."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    sys.path.insert(0, str(ROOT))
    import torch

    from lsg_patch.attention import AttentionLayout, lsg_attention, prepare_mask

    torch.set_num_threads(args.threads)
    layout = AttentionLayout(block_size=128, sparse_block_size=128, sparsity_factor=2, sparsity_type=args.sparsity)
    length, d = layout.num_global_tokens + args.length, args.head_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, length, args.heads, d, generator=generator).transpose(1, 2)  # transformers' layout
    key, value = (torch.randn(1, length, args.kv_heads, d, generator=generator).transpose(1, 2) for _ in range(2))
    mask = prepare_mask(torch.ones(1, args.length, dtype=torch.bool), layout)
    train = args.phase == "train"
    leaves = [x.requires_grad_(train) for x in (query, key, value)]

    def step() -> None:
        keys = leaves[1:]
        if args.mode == "repeated":
            keys = [x.repeat_interleave(args.heads // args.kv_heads, dim=1) for x in keys]
        with torch.set_grad_enabled(train):
            out = lsg_attention(leaves[0], *keys, mask, layout)
            if train:
                torch.autograd.grad(out.square().sum(), leaves)

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = peak_kib()
    step()
    peak = (peak_kib() - before) / 1024
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), peak_mib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sparsity", default="norm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "LENGTH", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode, args.length, args.phase = args.child[0], int(args.child[1]), args.child[2]
        print(json.dumps(child(args)))
        return
    common = [f"--heads={args.heads}", f"--kv-heads={args.kv_heads}", f"--head-dim={args.head_dim}",
              f"--sparsity={args.sparsity}", f"--runs={args.runs}", f"--threads={args.threads}"]
    results: dict[tuple[str, int, str], list[dict]] = {}
    for length in args.lengths:
        for phase in PHASES:
            for mode in (*MODES, *reversed(MODES)):  # A-B-B-A
                done = subprocess.run([sys.executable, __file__, *common, "--child", mode, str(length), phase],
                                      capture_output=True, text=True, check=True)
                results.setdefault((mode, length, phase), []).append(json.loads(done.stdout.splitlines()[-1]))
                print(mode, length, phase, results[mode, length, phase][-1], flush=True)
    lines = [f"`lsg_attention`, {args.heads} query heads sharing {args.kv_heads} key heads of {args.head_dim}, "
             f"block 128, sparse block 128, factor 2, {args.sparsity}, 1 global, batch 1, float32, {args.threads} "
             f"threads; each cell the median over two processes (A-B-B-A) of the median of {args.runs} runs; peak: "
             "RSS of one cold call above the inputs.", "",
             "| tokens | phase | shared s | repeated s | repeated / shared | shared peak MiB | repeated peak MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for length in args.lengths:
        for phase in PHASES:
            cell = {mode: (statistics.median(r["seconds"] for r in results[mode, length, phase]),
                           max(r["peak_mib"] for r in results[mode, length, phase])) for mode in MODES}
            lines.append(f"| {length} | {phase} | {cell['shared'][0]:.3f} | {cell['repeated'][0]:.3f} | "
                         f"{cell['repeated'][0] / cell['shared'][0]:.2f} | {cell['shared'][1]:.0f} | "
                         f"{cell['repeated'][1]:.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
