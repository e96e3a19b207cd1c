#!/usr/bin/env python
"""torch.profiler view of an lsg_patch model: top operators of the forward and of the backward.

Default: lsg_patch 128/128 norm, 4 layers / hidden 256 / 4 heads, 4096 tokens, 2 threads, CPU. Three tables:
the forward in eval mode under no_grad, the forward in train mode (dropout on), and the backward, forward
excluded (the autograd operators that ran after `loss.backward()` started). On CUDA the tables also time the
kernels and are sorted by their device time.

    python benchmarks/profile_lsg.py                        # the tables for the issue note
    python benchmarks/profile_lsg.py --system lsg-32-32-norm --length 16384 --top 30
    python benchmarks/profile_lsg.py --device cuda --autocast fp16 --length 16384
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DEFAULT_LSG, SHAPES, SYSTEMS, build_model, make_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=[k for k, s in SYSTEMS.items()], default=DEFAULT_LSG)
    parser.add_argument("--size", choices=sorted(SHAPES), default="default")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--autocast", choices=("none", "fp16", "bf16"), default="none")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    system = SYSTEMS[args.system]
    model = build_model(system, SHAPES[args.size], max(args.length, 512)).to(device)
    inputs = {k: v.to(device) for k, v in make_inputs(system, args.length).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.autocast)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def timed(run: Callable[[], object]) -> tuple[object, Any, float]:
        """run() once to warm up, then once profiled: its result, the profile, the wall seconds."""
        run()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            result = run()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return result, prof, seconds

    def forward() -> object:
        with autocast():
            return model(**inputs).last_hidden_state.float().square().mean()

    model.eval()
    with torch.no_grad():
        _, eval_profile, eval_s = timed(forward)
    model.train()
    forward().backward()  # warm-up of the backward
    model.zero_grad(set_to_none=True)
    loss, train_profile, train_s = timed(forward)
    _, backward_profile, backward_s = timed(lambda: loss.backward(retain_graph=True))

    print(f"{system.label}, size {args.size}, {args.length} tokens, {args.device}, autocast {args.autocast}, "
          f"{args.threads} threads, torch {torch.__version__}")
    for name, prof, seconds in (("FORWARD (eval, no_grad)", eval_profile, eval_s),
                                ("FORWARD (train mode)", train_profile, train_s),
                                ("BACKWARD (train mode)", backward_profile, backward_s)):
        print(f"\n=== {name}: {seconds * 1e3:.2f} ms wall (profiled) ===")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
