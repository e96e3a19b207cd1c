#!/usr/bin/env python
"""torch.profiler view of an lsg_patch model: top operators of the forward and of the backward.

Default: lsg_patch 128/128 norm, 4 layers / hidden 256 / 4 heads, 4096 tokens, 2 threads. The forward is
profiled in eval mode under no_grad; the backward in train mode, forward excluded (the table of the backward
lists the autograd operators that ran after `loss.backward()` started).

    python benchmarks/profile_lsg.py                        # the tables for the issue note
    python benchmarks/profile_lsg.py --system lsg-32-32-norm --length 16384 --top 30
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DEFAULT_LSG, SHAPES, SYSTEMS, build_model, make_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=[k for k, s in SYSTEMS.items()], default=DEFAULT_LSG)
    parser.add_argument("--size", choices=sorted(SHAPES), default="default")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    system = SYSTEMS[args.system]
    model = build_model(system, SHAPES[args.size], max(args.length, 512))
    inputs = make_inputs(system, args.length)
    sort = "self_cpu_time_total"

    model.eval()
    with torch.no_grad():
        model(**inputs)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as forward_profile:
            start = time.perf_counter()
            model(**inputs)
            forward_s = time.perf_counter() - start
    model.train()
    model(**inputs).last_hidden_state.square().mean().backward()  # warm-up
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).last_hidden_state.square().mean()
    with profile(activities=[ProfilerActivity.CPU]) as backward_profile:
        start = time.perf_counter()
        loss.backward()
        backward_s = time.perf_counter() - start

    print(f"{system.label}, size {args.size}, {args.length} tokens, {args.threads} threads, torch {torch.__version__}")
    for name, prof, seconds in (("FORWARD (eval, no_grad)", forward_profile, forward_s),
                                ("BACKWARD (train mode)", backward_profile, backward_s)):
        print(f"\n=== {name}: {seconds:.3f} s wall (profiled) ===")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
