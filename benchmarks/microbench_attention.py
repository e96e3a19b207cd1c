#!/usr/bin/env python
"""Attention-only microbenchmark: cost per useful score of the LSG product against dense SDPA.

A "useful score" is a query-key pair the LSG product has to evaluate: every global query against all G + T
keys, and every token query of block i against the G globals, the sparse windows' items that exist and the
local tokens [(i-1)*bs, (i+2)*bs) that exist. The count is derived here from the layout alone (docs/LSG_SPEC.md
sections 6 and 7), independently of lsg_patch's own index tensors. Dense SDPA at 512 and 1024 tokens evaluates
L * L scores. Both run in the same process, on the same head count and head size.

    python benchmarks/microbench_attention.py                 # default shape: 4 heads of 64
    python benchmarks/microbench_attention.py --size base     # 12 heads of 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "@@BENCH "
HEADS = {"default": 4, "base": 12, "toy": 2}
HEAD_SIZE = {"default": 64, "base": 64, "toy": 32}
LAYOUTS = {
    "128/128 norm": dict(block_size=128, sparse_block_size=128, sparsity_factor=2, sparsity_type="norm"),
    "32/32 norm": dict(block_size=32, sparse_block_size=32, sparsity_factor=2, sparsity_type="norm"),
    "256/0": dict(block_size=256, sparse_block_size=0),
    "bos_pooling sf 8": dict(block_size=128, sparse_block_size=128, sparsity_factor=8, sparsity_type="bos_pooling"),
}


def useful_scores(layout: Any, num_tokens: int) -> int:
    """Query-key pairs the LSG product must evaluate, counted from the layout (see the module docstring)."""
    g, bs, t = layout.num_global_tokens, layout.block_size, num_tokens
    if t <= 2 * bs:
        return (g + t) ** 2
    total = g * (g + t)
    sparse = layout.sparsity_type != "none" and layout.sparse_block_size > 0 and layout.sparsity_factor > 0
    items = t // layout.sparsity_factor if sparse else 0
    step = bs // layout.sparsity_factor if sparse else 0
    sbs = layout.sparse_block_size
    for block in range(t // bs):
        keys = g + _overlap((block - 1) * bs, (block + 2) * bs, 0, t)
        if sparse:
            before = (block - 1) * step - sbs
            after = (block + 2) * step - 2 * (step % 2)
            keys += _overlap(before, before + sbs, 0, items) + _overlap(after, after + sbs, 0, items)
        total += bs * keys
    return total


def _overlap(start: int, stop: int, low: int, high: int) -> int:
    return max(0, min(stop, high) - max(start, low))


def median_time(step: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(HEADS), default="default")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384], help="LSG token counts")
    parser.add_argument("--dense-lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from lsg_patch.attention import AttentionLayout, lsg_attention, prepare_mask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads, d = HEADS[args.size], HEAD_SIZE[args.size]
    modes = ["forward", "train"] if args.backward else ["forward"]

    def timed(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], mode: str) -> float:
        if mode == "forward":
            with torch.no_grad():
                return median_time(lambda: fn(*tensors), args.runs)
        leaves = [x.detach().requires_grad_() for x in tensors]
        return median_time(lambda: fn(*leaves).sum().backward(), args.runs)

    rows: list[dict] = []
    dense_cost: dict[str, float] = {}
    for length in args.dense_lengths:
        q, k, v = (torch.randn(1, heads, length, d) for _ in range(3))
        for mode in modes:
            seconds = timed(F.scaled_dot_product_attention, [q, k, v], mode)
            scores = heads * length * length
            rows.append(dict(system="dense sdpa", length=length, mode=mode, seconds=seconds, scores=scores,
                             ns_per_score=seconds / scores * 1e9))
            dense_cost[mode] = min(dense_cost.get(mode, float("inf")), rows[-1]["ns_per_score"])
    for name in args.layouts:
        layout = AttentionLayout(**LAYOUTS[name])
        for length in args.lengths:
            g = layout.num_global_tokens
            q, k, v = (torch.randn(1, heads, g + length, d) for _ in range(3))
            mask = prepare_mask(torch.ones(1, length, dtype=torch.bool), layout)
            scores = heads * useful_scores(layout, length)
            for mode in modes:
                seconds = timed(lambda q_, k_, v_: lsg_attention(q_, k_, v_, mask, layout), [q, k, v], mode)
                cost = seconds / scores * 1e9
                rows.append(dict(system=f"lsg {name}", length=length, mode=mode, seconds=seconds, scores=scores,
                                 ns_per_score=cost, ratio_to_dense=cost / dense_cost[mode]))
    lines = [f"{heads} heads of {d}, batch 1, median of {args.runs} runs; useful scores summed over heads; "
             "ratio: ns per score against the cheapest dense SDPA length.", "",
             "| system | tokens | mode | seconds | useful scores | ns / score | x dense |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio_to_dense']:.2f}" if "ratio_to_dense" in r else "1 (ref)" if \
            r["ns_per_score"] == dense_cost[r["mode"]] else ""
        lines.append(f"| {r['system']} | {r['length']} | {r['mode']} | {r['seconds']:.4f} | {r['scores']:,} | "
                     f"{r['ns_per_score']:.3f} | {ratio} |")
    default = [r for r in rows if r["system"] == "lsg 128/128 norm" and r["mode"] == "forward"]
    for r in default:
        verdict = "met" if r["ratio_to_dense"] <= 2 else "NOT MET"
        lines.append(f"\n- {verdict}: lsg 128/128 norm at {r['length']} costs x{r['ratio_to_dense']:.2f} dense SDPA "
                     "per score (target <= 2)")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    print(RESULT_TAG + json.dumps({"rows": rows, "markdown": markdown}), flush=True)


if __name__ == "__main__":
    main()
