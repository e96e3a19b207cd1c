#!/usr/bin/env python
"""Long-input benchmark: lsg_patch against full attention, Longformer, BigBird and LongT5, one model shape.

Every (system, length) runs in a fresh process, so peak memory is that configuration's alone. Inside it the
forward pass (eval, no_grad) is measured first, then forward+backward (train mode); the peak resident set size
is reset between the two (Linux /proc/self/clear_refs), so each phase gets its own peak. Memory is reported as
the peak RSS above the RSS after the model was built and warmed up (activations, grads, workspaces).

    python benchmarks/run.py --quick          # lengths 1024 and 4096, 3 runs: for development
    python benchmarks/run.py                  # the full run written up in benchmarks/RESULTS.md
    python benchmarks/run.py --size base --lengths 4096 --systems lsg-128-128-norm sdpa-nodrop

See benchmarks/README.md for what each system is and how the bounds work.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "@@BENCH "
VOCAB = 30522
SHAPES = {
    "default": dict(layers=4, hidden=256, heads=4, ffn=1024),
    "base": dict(layers=12, hidden=768, heads=12, ffn=3072),
    "toy": dict(layers=2, hidden=64, heads=2, ffn=128),  # smoke tests only
}
PHASES = ("forward", "train")


@dataclass(frozen=True)
class System:
    """One benchmarked attention: how to build it, and whether it is a peer of the LSG targets."""

    key: str
    family: str  # lsg | t5-lsg | t5 | bert | longformer | bigbird | longt5
    options: dict = field(default_factory=dict)
    global_path: bool = False  # every token has a path to the whole sequence (the peers of target 2)
    phases: tuple[str, ...] = PHASES
    label: str = ""


SYSTEMS = {
    s.key: s
    for s in (
        System("lsg-128-128-norm", "lsg", dict(block_size=128, sparse_block_size=128, sparsity_factor=2,
                                               sparsity_type="norm"), True, label="lsg_patch 128/128 norm"),
        System("lsg-32-32-norm", "lsg", dict(block_size=32, sparse_block_size=32, sparsity_factor=2,
                                             sparsity_type="norm"), True, label="lsg_patch 32/32 norm"),
        System("lsg-128-128-norm-nodrop", "lsg", dict(block_size=128, sparse_block_size=128, sparsity_factor=2,
                                                      sparsity_type="norm", dropout=0.0), True, ("train",),
               label="lsg_patch 128/128 norm, dropout 0"),
        System("lsg-128-128-norm-ckpt", "lsg", dict(block_size=128, sparse_block_size=128, sparsity_factor=2,
                                                    sparsity_type="norm", checkpointing=True), False, ("train",),
               label="lsg_patch 128/128 norm, gradient checkpointing"),
        System("lsg-256-0", "lsg", dict(block_size=256, sparse_block_size=0), True, label="lsg_patch 256/0"),
        System("lsg-bos-sf8", "lsg", dict(block_size=128, sparse_block_size=128, sparsity_factor=8,
                                          sparsity_type="bos_pooling"), True, label="lsg_patch bos_pooling sf 8"),
        System("sdpa", "bert", dict(attn="sdpa", dropout=0.1), True, label="full sdpa"),
        System("sdpa-nodrop", "bert", dict(attn="sdpa", dropout=0.0), True, ("train",), label="full sdpa, dropout 0"),
        System("eager", "bert", dict(attn="eager", dropout=0.1), True, label="full eager"),
        System("longformer-256", "longformer", dict(window=256), True, label="Longformer w256"),
        System("longformer-512", "longformer", dict(window=512), True, label="Longformer w512"),
        System("bigbird", "bigbird", dict(block=64, random=3), True, label="BigBird 64 r3"),
        System("longt5-local", "longt5", dict(attention="local"), False, label="LongT5 local"),
        System("longt5-tglobal", "longt5", dict(attention="transient-global"), True, label="LongT5 tglobal"),
        System("t5-full", "t5", {}, True, label="T5 full (dense bias)"),
        System("t5-lsg-128-0", "t5-lsg", dict(block_size=128, sparse_block_size=0), True,
               label="T5 + lsg_patch 128/0"),
        System("t5-lsg-128-128-norm", "t5-lsg", dict(block_size=128, sparse_block_size=128, sparsity_factor=2,
                                                     sparsity_type="norm"), True, label="T5 + lsg_patch 128/128 norm"),
    )
}
DEFAULT_LSG = "lsg-128-128-norm"
CHECKPOINTED_LSG = "lsg-128-128-norm-ckpt"
TARGET_LENGTHS = (4096, 16384)
BF16_RTOL = 1.6e-2  # torch.testing's default relative tolerance for bfloat16
COLD_MMAP_THRESHOLD = 64 * 1024  # bytes; --cold-memory: larger allocations are mmap'd and unmapped when freed


# --------------------------------------------------------------------------------------------------------------
# Building models (also used by profile_lsg.py)


def build_model(system: System, shape: dict, max_length: int) -> Any:
    """A randomly initialised encoder of the given shape; LSG systems are BERT (512 positions) + to_lsg."""
    from transformers import AutoConfig, AutoModel

    common = dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], intermediate_size=shape["ffn"], vocab_size=VOCAB)
    opts = system.options
    if system.family == "lsg":
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import lsg_patch

        lsg_options = {k: v for k, v in opts.items() if k not in ("dropout", "checkpointing")}
        config = AutoConfig.for_model("bert", max_position_embeddings=512,
                                      attention_probs_dropout_prob=opts.get("dropout", 0.1), **common)
        model = AutoModel.from_config(config, attn_implementation="sdpa")
        model = lsg_patch.to_lsg(model, max_length=max_length, bos_token_id=101, mask_token_id=103, **lsg_options)
        if opts.get("checkpointing"):  # transformers' own, whole layers (5.x's new name where it exists)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        return model
    if system.family == "bert":
        config = AutoConfig.for_model("bert", max_position_embeddings=max_length,
                                      attention_probs_dropout_prob=opts["dropout"], **common)
        return AutoModel.from_config(config, attn_implementation=opts["attn"])
    if system.family == "longformer":
        config = AutoConfig.for_model("longformer", attention_window=opts["window"],
                                      max_position_embeddings=max_length + 2, **common)
        return AutoModel.from_config(config)
    if system.family == "bigbird":
        config = AutoConfig.for_model("big_bird", attention_type="block_sparse", block_size=opts["block"],
                                      num_random_blocks=opts["random"], max_position_embeddings=max_length, **common)
        return AutoModel.from_config(config)
    t5_shape = dict(d_model=shape["hidden"], d_ff=shape["ffn"], num_layers=shape["layers"], num_heads=shape["heads"],
                    d_kv=shape["hidden"] // shape["heads"], vocab_size=VOCAB)
    if system.family == "longt5":
        from transformers import LongT5EncoderModel

        return LongT5EncoderModel(AutoConfig.for_model("longt5", encoder_attention_type=opts["attention"], **t5_shape))
    if system.family in ("t5", "t5-lsg"):  # the T5 encoder LongT5 is built on (same shape), as is or converted
        from transformers import T5EncoderModel

        model = T5EncoderModel(AutoConfig.for_model("t5", **t5_shape))
        if system.family == "t5":
            return model
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import lsg_patch

        return lsg_patch.to_lsg(model, max_length=max_length, **opts)
    raise ValueError(f"unknown family {system.family!r}")


def make_inputs(system: System, length: int, batch: int = 1) -> dict:
    """Random token ids, a full attention mask, and Longformer's global token (the first one, as for CLS)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if system.family == "longformer":
        global_mask = torch.zeros_like(ids)
        global_mask[:, 0] = 1
        inputs["global_attention_mask"] = global_mask
    return inputs


def forward_step(model: Any, inputs: dict) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).last_hidden_state


def train_step(model: Any, inputs: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**inputs).last_hidden_state.float().square().mean().backward()


# --------------------------------------------------------------------------------------------------------------
# Child process: one (system, length)


def _status_kib(key: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Free what can be freed and reset the peak RSS to the current RSS; False where Linux does not allow it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _emit(record: dict) -> None:
    print(RESULT_TAG + json.dumps(record), flush=True)


def child_main(spec: dict) -> None:
    import torch

    try:  # die with the parent (PR_SET_PDEATHSIG), so an interrupted run leaves no orphan behind
        ctypes.CDLL("libc.so.6").prctl(1, 9)
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    system = SYSTEMS[spec["system"]]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = build_model(system, SHAPES[spec["size"]], spec["max_length"]).to(dtype)
    inputs = make_inputs(system, spec["length"], spec["batch"])
    for phase in spec["phases"]:
        _emit({"event": "start", "phase": phase})
        model.train(phase == "train")
        step = train_step if phase == "train" else forward_step
        start = time.perf_counter()
        for _ in range(spec["warmup"]):
            step(model, inputs)
        warm_s = time.perf_counter() - start
        per_run = warm_s / max(spec["warmup"], 1)
        if spec["warmup"] and warm_s + per_run * spec["min_runs"] > spec["time_limit"]:
            _emit({"event": "over_time", "phase": phase,
                   "note": f"one warm-up run took {per_run:.1f} s, so {spec['min_runs']} runs exceed the bound"})
            return  # later phases are slower still
        if spec.get("page_in"):  # the kernels' code is read from the libraries now, not during the measured step
            step(model, make_inputs(system, spec["page_in"], spec["batch"]))
            model.zero_grad(set_to_none=True)
        exact_peak = _reset_peak()
        baseline_kib, file_kib = _status_kib("VmRSS"), _status_kib("RssFile")
        times: list[float] = []
        planned = spec["runs"]
        while len(times) < planned:
            start = time.perf_counter()
            step(model, inputs)
            times.append(time.perf_counter() - start)
            if len(times) == 1:  # slow configurations get fewer runs, never fewer than min_runs
                planned = min(spec["runs"], max(spec["min_runs"], int(spec["budget"] / times[0])))
        peak_kib = _status_kib("VmHWM")
        model.zero_grad(set_to_none=True)
        _emit({"event": "done", "phase": phase, "times": times, "median_s": statistics.median(times),
               "peak_mib": (peak_kib - baseline_kib) / 1024, "rss_mib": peak_kib / 1024,
               "baseline_mib": baseline_kib / 1024, "exact_peak": exact_peak,
               "paged_in_mib": (_status_kib("RssFile") - file_kib) / 1024})


def dtype_check_main(args: argparse.Namespace) -> None:
    """bf16 against fp32 on the same weights: speed of lsg_patch, and output error next to plain BERT's."""
    import copy

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    length = args.check_length
    result: dict[str, Any] = {"length": length, "systems": {}}
    lines = [f"bf16 vs fp32 (`.to(torch.bfloat16)`), {length} tokens, size {args.size}, median of {args.runs} runs:",
             "", "| system | fwd fp32 s | fwd bf16 s | train fp32 s | train bf16 s | max abs err | rel. err (Frobenius) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key in (DEFAULT_LSG, "sdpa"):
        system = SYSTEMS[key]
        fp32 = build_model(system, SHAPES[args.size], max(length, 512))
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        inputs = make_inputs(system, length)
        timings, outputs = {}, {}
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            model.eval()
            outputs[name] = forward_step(model, inputs).float()
            timings[f"fwd_{name}"] = statistics.median(_time_it(lambda: forward_step(model, inputs), args.runs))
            model.train()
            train_step(model, inputs)
            timings[f"train_{name}"] = statistics.median(_time_it(lambda: train_step(model, inputs), args.runs))
        error = outputs["bf16"] - outputs["fp32"]
        relative = (error.norm() / outputs["fp32"].norm()).item()
        entry = dict(timings, max_abs_err=error.abs().max().item(), rel_err=relative)
        result["systems"][key] = entry
        lines.append(f"| {system.label} | {entry['fwd_fp32']:.3f} | {entry['fwd_bf16']:.3f} | {entry['train_fp32']:.3f} "
                     f"| {entry['train_bf16']:.3f} | {entry['max_abs_err']:.3g} | {relative:.3g} |")
    lsg = result["systems"][DEFAULT_LSG]
    within = lsg["rel_err"] <= BF16_RTOL
    no_slower = lsg["fwd_bf16"] <= lsg["fwd_fp32"] * 1.05 and lsg["train_bf16"] <= lsg["train_fp32"] * 1.05
    lines += ["", f"- {'met' if within else 'NOT MET'}: lsg_patch bf16 output within bf16 tolerance of fp32 "
              f"(relative error {lsg['rel_err']:.3g} <= {BF16_RTOL}; plain BERT sdpa: "
              f"{result['systems']['sdpa']['rel_err']:.3g})",
              f"- {'met' if no_slower else 'NOT MET'}: lsg_patch bf16 no slower than fp32 (5% margin): forward "
              f"x{lsg['fwd_fp32'] / lsg['fwd_bf16']:.2f}, train x{lsg['train_fp32'] / lsg['train_bf16']:.2f} speed-up"]
    result["markdown"] = "\n".join(lines) + "\n"
    print(result["markdown"])
    print(RESULT_TAG + json.dumps(result), flush=True)


def _time_it(step: Any, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------------------------
# Parent: scheduling, bounds, prediction


@dataclass
class Row:
    system: str
    length: int
    phase: str
    status: str  # ok | over_time | over_memory | error
    median_s: float | None = None
    runs: int = 0
    times: list = field(default_factory=list)
    peak_mib: float | None = None
    rss_mib: float | None = None
    note: str = ""
    paged_in_mib: float | None = None  # library code paged in (file-backed RSS) during the measured runs


def _predict(history: list[tuple[int, float]], length: int) -> float | None:
    """Log-log extrapolation from the last two lengths, None with fewer points.

    The slope is clamped to [1, 2]: no system here grows faster than quadratically, and on a busy machine two
    noisy points can suggest any slope.
    """
    if len(history) < 2:
        return None
    (l0, v0), (l1, v1) = history[-2], history[-1]
    slope = min(2.0, max(1.0, math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(l1 / l0)))
    return v1 * (length / l1) ** slope


def min_runs(system: System, length: int, args: argparse.Namespace) -> int:
    """The target systems keep all --runs at the target lengths; the others may drop to --min-runs when slow."""
    target = system.family == "lsg" or system.global_path or system.key == "longt5-local"
    return args.runs if (target and length in TARGET_LENGTHS) else args.min_runs


def run_config(system: System, length: int, phases: list[str], args: argparse.Namespace) -> list[Row]:
    """Run one configuration in a fresh process, killing it at the time or memory bound."""
    spec = dict(system=system.key, length=length, phases=phases, size=args.size, dtype=args.dtype,
                threads=args.threads, batch=args.batch, warmup=args.warmup, runs=args.runs,
                min_runs=min_runs(system, length, args), time_limit=args.time_limit, budget=args.budget,
                max_length=args.max_length, page_in=args.page_in)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if args.cold_memory:  # glibc then returns every freed tensor at once: the RSS peak is the live-memory peak
        env["MALLOC_MMAP_THRESHOLD_"] = str(COLD_MMAP_THRESHOLD)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    records: list[dict] = []
    stderr: list[str] = []

    def read(stream: Any, sink: list, parse: bool) -> None:
        for line in stream:
            if parse and line.startswith(RESULT_TAG):
                sink.append(json.loads(line[len(RESULT_TAG):]))
                sink[-1]["at"] = time.monotonic()
            elif not parse:
                sink.append(line)

    readers = [threading.Thread(target=read, args=(proc.stdout, records, True), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, stderr, False), daemon=True)]
    for reader in readers:
        reader.start()
    killed, max_rss = "", 0
    while proc.poll() is None:
        try:
            max_rss = max(max_rss, _status_kib("VmRSS", str(proc.pid)))
        except (OSError, KeyError):
            pass
        started = [r for r in records if r["event"] == "start"]
        if max_rss > args.mem_limit_gib * 2**20:
            killed = f"over_memory:killed at {max_rss / 2**20:.1f} GiB RSS (bound {args.mem_limit_gib} GiB)"
        elif started and started[-1]["phase"] not in {r["phase"] for r in records if r["event"] == "done"} \
                and time.monotonic() - started[-1]["at"] > args.time_limit:
            killed = f"over_time:killed after {args.time_limit:.0f} s (bound)"
        if killed:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    rows = []
    done = {r["phase"]: r for r in records if r["event"] == "done"}
    over = {r["phase"]: r for r in records if r["event"] == "over_time"}
    if over:
        killed = "over_time:" + next(iter(over.values()))["note"]
    for phase in phases:
        if phase in done:
            r = done[phase]
            rows.append(Row(system.key, length, phase, "ok", r["median_s"], len(r["times"]), r["times"],
                            r["peak_mib"], r["rss_mib"], "" if r["exact_peak"] else "peak includes model build",
                            r.get("paged_in_mib")))
        elif killed:
            status, note = killed.split(":", 1)
            rows.append(Row(system.key, length, phase, status, note=note))
            killed = "over_time:not run: the previous phase hit a bound" if status == "over_time" else killed
        else:
            tail = "".join(stderr[-5:]).strip().splitlines()
            rows.append(Row(system.key, length, phase, "error", note=(tail[-1] if tail else f"exit {proc.returncode}")))
    return rows


def plan_and_run(args: argparse.Namespace, progress: Any) -> list[Row]:
    rows: list[Row] = []
    for key in args.systems:
        system = SYSTEMS[key]
        phases = [p for p in args.phases if p in system.phases]
        history: dict[str, list[tuple[int, float, float]]] = {p: [] for p in phases}
        blocked: dict[str, str] = {}
        for length in args.lengths:
            to_run = []
            for phase in phases:
                reason = blocked.get(phase) or _predicted_bound(history[phase], length, min_runs(system, length, args), args)
                if reason:
                    status, note = reason.split(":", 1)
                    rows.append(Row(key, length, phase, status, note=note))
                    blocked.setdefault(phase, f"{status}:a shorter length was already {status.replace('_', ' ')}")
                else:
                    to_run.append(phase)
            if not to_run:
                continue
            for row in run_config(system, length, to_run, args):
                rows.append(row)
                _print_row(row)
                if row.status == "ok":
                    history[row.phase].append((length, row.median_s, row.rss_mib))
                elif row.status.startswith("over"):
                    blocked[row.phase] = f"{row.status}:a shorter length was already {row.status.replace('_', ' ')}"
            progress(rows)
    return rows


def _predicted_bound(history: list[tuple[int, float, float]], length: int, runs: int, args: argparse.Namespace
                     ) -> str:
    seconds = _predict([(n, t) for n, t, _ in history], length)
    memory = _predict([(n, m) for n, _, m in history], length)
    if memory is not None and memory > args.mem_limit_gib * 1024:
        return f"over_memory:predicted {memory / 1024:.1f} GiB RSS from shorter lengths (bound {args.mem_limit_gib} GiB)"
    if seconds is not None and seconds * (args.warmup + runs) > args.time_limit:
        return f"over_time:predicted {seconds:.0f} s per run from shorter lengths (bound {args.time_limit:.0f} s)"
    return ""


def _print_row(row: Row) -> None:
    if row.status == "ok":
        paged_in = "" if row.paged_in_mib is None else f" ({row.paged_in_mib:.2f} MiB of library code paged in)"
        print(f"  {row.system:18s} {row.length:6d} {row.phase:8s} {row.median_s:8.3f} s (n={row.runs})"
              f" {row.peak_mib:9.1f} MiB{paged_in}", flush=True)
    else:
        print(f"  {row.system:18s} {row.length:6d} {row.phase:8s} {row.status}: {row.note}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Reporting


def _cell_time(row: Row | None) -> str:
    if row is None:
        return "-"
    if row.status == "ok":
        return f"{row.median_s:.3f} ({row.runs})"
    text = {"over_time": "over time bound", "over_memory": "over memory bound"}.get(row.status, "error")
    if row.note.startswith(("predicted", "a shorter")):
        return text + " (not run)"
    if row.note.startswith("one warm-up run took"):
        return text + f" ({row.note.split()[4]} s/run)"
    return text


def _cell_memory(row: Row | None) -> str:
    if row is None:
        return "-"
    return f"{row.peak_mib:.0f}" if row.status == "ok" else _cell_time(row)


def markdown_tables(rows: list[Row], lengths: list[int], systems: list[str]) -> str:
    index = {(r.system, r.length, r.phase): r for r in rows}
    head = "| system | " + " | ".join(str(n) for n in lengths) + " |\n|---|" + "---:|" * len(lengths) + "\n"
    parts = []
    for phase, title in (("forward", "Forward (eval, no_grad)"), ("train", "Forward + backward (train mode)")):
        body = "".join(f"| {SYSTEMS[s].label} | " + " | ".join(_cell_time(index.get((s, n, phase))) for n in lengths)
                       + " |\n" for s in systems if phase in SYSTEMS[s].phases)
        parts.append(f"### {title}: median seconds (runs)\n\n{head}{body}")
        body = "".join(f"| {SYSTEMS[s].label} | " + " | ".join(_cell_memory(index.get((s, n, phase))) for n in lengths)
                       + " |\n" for s in systems if phase in SYSTEMS[s].phases)
        parts.append(f"### {title}: peak memory above the built model, MiB\n\n{head}{body}")
    notes = sorted({f"- {SYSTEMS[r.system].label}, {r.length}, {r.phase}: {r.status.replace('_', ' ')}: {r.note}"
                    for r in rows if r.status != "ok"})
    if notes:
        parts.append("### Bounds and errors\n\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def target_report(rows: list[Row], size: str) -> str:
    """Check the issue's targets against this run; a missing or bounded measurement is said as such."""
    index = {(r.system, r.length, r.phase): r for r in rows}
    lines = []

    def compare(subject: str, peer: str, length: int, phase: str) -> None:
        a, b = index.get((subject, length, phase)), index.get((peer, length, phase))
        if a is None or b is None:
            return
        name = f"{SYSTEMS[subject].label} vs {SYSTEMS[peer].label} at {length}, {phase}"
        if a.status != "ok":
            lines.append(f"- NOT MET {name}: lsg_patch {a.status.replace('_', ' ')}")
        elif b.status != "ok":
            lines.append(f"- met {name}: peer {b.status.replace('_', ' ')} ({b.note}); lsg_patch "
                         f"{a.median_s:.3f} s, {a.peak_mib:.0f} MiB")
        else:
            faster, leaner = a.median_s < b.median_s, a.peak_mib < b.peak_mib
            verdict = "met" if faster and leaner else "NOT MET"
            lines.append(f"- {verdict} {name}: time {a.median_s:.3f} vs {b.median_s:.3f} s "
                         f"(x{b.median_s / a.median_s:.2f}), memory {a.peak_mib:.0f} vs {b.peak_mib:.0f} MiB")

    if size == "base":
        for length in sorted({r.length for r in rows}):
            compare(DEFAULT_LSG, "sdpa-nodrop", length, "train")
            compare("lsg-128-128-norm-nodrop", "sdpa-nodrop", length, "train")
    else:
        peers = [s.key for s in SYSTEMS.values() if s.global_path and s.family not in ("lsg", "t5-lsg")]
        for length in TARGET_LENGTHS:
            for phase in PHASES:
                for peer in peers:
                    compare(DEFAULT_LSG, peer, length, phase)
                compare("lsg-32-32-norm", "longt5-local", length, phase)
                compare("t5-lsg-128-128-norm", "longt5-tglobal", length, phase)
            plain, forward = index.get((DEFAULT_LSG, length, "train")), index.get((DEFAULT_LSG, length, "forward"))
            checkpointed = index.get((CHECKPOINTED_LSG, length, "train"))
            if plain and forward and checkpointed and plain.status == forward.status == checkpointed.status == "ok":
                extra = checkpointed.median_s - plain.median_s  # the recomputation: a train-mode forward
                lines.append(f"- info gradient checkpointing at {length}: {checkpointed.median_s:.3f} vs "
                             f"{plain.median_s:.3f} s, {extra:.3f} s more (one eval forward: {forward.median_s:.3f} "
                             f"s; a train-mode forward records autograd and drops out, and costs more); memory "
                             f"{checkpointed.peak_mib:.0f} vs {plain.peak_mib:.0f} MiB")
        for key in [k for k in SYSTEMS if SYSTEMS[k].family == "lsg"]:
            a, b = index.get((key, 4096, "forward")), index.get((key, 16384, "forward"))
            if a and b and a.status == b.status == "ok":
                slope = math.log(b.median_s / a.median_s) / math.log(4)
                verdict = "met" if slope <= 1.1 or key != DEFAULT_LSG else "NOT MET"
                lines.append(f"- {verdict if key == DEFAULT_LSG else 'info'} forward log-log slope 4096->16384 "
                             f"of {SYSTEMS[key].label}: {slope:.2f} (target <= 1.1)")
    return "\n".join(lines) + "\n" if lines else "(no target pair measured in this run)\n"


def plot(rows: list[Row], systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    colours = plt.get_cmap("tab20").colors  # one colour per system (up to 20): the default cycle has only 10
    panels = [("forward", "median_s", "forward time (s)"), ("train", "median_s", "forward+backward time (s)"),
              ("forward", "peak_mib", "forward peak memory (MiB)"), ("train", "peak_mib", "train peak memory (MiB)")]
    for axis, (phase, attr, title) in zip(axes.flat, panels):
        for i, key in enumerate(systems):
            points = sorted((r.length, getattr(r, attr)) for r in rows
                            if r.system == key and r.phase == phase and r.status == "ok" and getattr(r, attr) > 0)
            if points:
                style = "-" if SYSTEMS[key].family in ("lsg", "t5-lsg") else "--"
                axis.plot(*zip(*points), style, marker="o", label=SYSTEMS[key].label, color=colours[i % len(colours)])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("tokens")
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    more = axes[1, 1].get_legend_handles_labels()
    for handle, label in zip(*more):
        if label not in labels:
            handles.append(handle)
            labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(memory_gib, 1), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="default",
                        help="default: 4 layers/256/4 heads; base: 12/768/12; toy: smoke tests")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--runs", type=int, default=5, help="timed runs per phase (median reported)")
    parser.add_argument("--min-runs", type=int, default=3,
                        help="slow non-target configurations may drop to this many runs (targets keep --runs)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="seconds per phase (warm-up + runs); slower configurations are 'over time bound'")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="soft seconds of timed runs per phase: beyond it non-target configurations drop to "
                             "--min-runs runs")
    parser.add_argument("--mem-limit-gib", type=float, default=12.0, help="RSS bound of a child process")
    parser.add_argument("--max-length", type=int, default=None,
                        help="position table size of every model (default: max(16384, longest length))")
    parser.add_argument("--quick", action="store_true", help="lengths 1024 and 4096, 3 runs")
    parser.add_argument("--no-extras", action="store_true", help="skip the bf16 check and the attention microbenchmark")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--dtype-check", action="store_true",
                        help="only run the bf16-vs-fp32 check (in this process) and print it")
    parser.add_argument("--check-length", type=int, default=None, help="length of the bf16 check (default 4096)")
    parser.add_argument("--report-from", type=Path, nargs="+", metavar="JSON",
                        help="only re-render results.md/.png (into --out) from results.json files (partial ones "
                             "too); later files replace earlier rows of the same configuration")
    parser.add_argument("--cold-memory", action="store_true",
                        help="peak memory of one cold step (no warm-up, one run) per fresh process, with glibc's "
                             f"mmap threshold at {COLD_MMAP_THRESHOLD // 1024} KiB so that freed tensors leave the "
                             "RSS at once (reproducible to 0.1 MiB); its times are not comparable with other runs")
    parser.add_argument("--page-in", type=int, default=0, metavar="TOKENS",
                        help="with --cold-memory: one step at this length first, so that the code of the kernels "
                             "the step runs is already paged in from the libraries (file-backed pages count in the "
                             "RSS, and systems that run more distinct kernels page in more)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.page_in and not args.cold_memory:
        parser.error("--page-in only applies to --cold-memory runs (warm runs are paged in by their warm-up)")
    if args.cold_memory:
        args.warmup, args.runs, args.min_runs = 0, 1, 1
    if args.quick:
        args.lengths, args.runs, args.min_runs = [1024, 4096], 3, min(args.min_runs, 3)
    args.min_runs = min(args.min_runs, args.runs)
    args.lengths = sorted(set(args.lengths))
    args.max_length = args.max_length or max(16384, max(args.lengths))
    args.check_length = args.check_length or (4096 if 4096 in args.lengths or args.size != "toy" else max(args.lengths))
    return args


def run_extra(script: str, extra_args: list[str], args: argparse.Namespace) -> dict | None:
    """Run the bf16 check or the attention microbenchmark in its own process and return its JSON."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--threads", str(args.threads), *extra_args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        print(f"{script} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.split(RESULT_TAG, 1)[1]) if RESULT_TAG in done.stdout else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    if args.dtype_check:
        dtype_check_main(args)
        return
    if args.report_from:
        report_from(args.report_from, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"size {args.size} {SHAPES[args.size]}, dtype {args.dtype}, lengths {args.lengths}, runs {args.runs}, "
          f"threads {args.threads}; {info['cpu']}, torch {info['torch']}, transformers {info['transformers']}",
          flush=True)
    started = time.monotonic()

    def report(rows: list[Row], extras: dict[str, Any], final: bool) -> str:
        return write_report(args, info, rows, extras, time.monotonic() - started, final)

    rows = plan_and_run(args, lambda partial: report(partial, {}, final=False))
    extras: dict[str, Any] = {}
    if not args.no_extras:
        runs = ["--runs", str(args.runs)]
        extras["bf16 check"] = run_extra("run.py", ["--dtype-check", "--size", args.size, "--check-length",
                                                     str(args.check_length), *runs], args)
        extras["attention microbenchmark"] = run_extra("microbench_attention.py", ["--size", args.size, *runs], args)
    print("\n" + report(rows, extras, final=True))
    print(f"written: {args.out / 'results.md'}, results.json" + ("" if args.no_plot else ", results.png"))


def write_report(args: argparse.Namespace, info: dict, rows: list[Row], extras: dict[str, Any], elapsed: float,
                 final: bool, draw: bool | None = None, live: bool = True) -> str:
    """Write results.md / .json (/ .png when final); called after every configuration, so an interrupted run
    keeps what it measured. live: the run is this process's (False when re-rendering saved results)."""
    shape = SHAPES[args.size]
    if live:
        info["load_average_latest"] = os.getloadavg()
    state = "" if final else " (partial: the run was still going)"
    header = (f"Run of {info['date']}{state}, {elapsed / 60:.1f} min: size {args.size} ({shape['layers']} layers, "
              f"hidden {shape['hidden']}, {shape['heads']} heads, ffn {shape['ffn']}), batch {args.batch}, "
              f"{args.dtype}, {args.threads} threads, warm-up {args.warmup}, median of the runs in parentheses.\n"
              f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; python {info['python']}, "
              f"torch {info['torch']}, transformers {info['transformers']}; load average at start "
              f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'])}, at the end "
              f"{', '.join(f'{x:.2f}' for x in info.get('load_average_latest', ())) or 'not recorded'}.\n"
              f"Bounds: {args.time_limit:.0f} s per phase, {args.mem_limit_gib} GiB RSS per process.\n")
    extras_md = "".join(f"\n### {name}\n\n{value['markdown']}\n" for name, value in extras.items()
                        if value and "markdown" in value)
    markdown = (f"{header}\n{markdown_tables(rows, args.lengths, args.systems)}\n### Targets\n\n"
                f"{target_report(rows, args.size)}{extras_md}")
    (args.out / "results.md").write_text(markdown)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "rows": [vars(r) for r in rows], "extras": extras, "elapsed_s": elapsed, "final": final}, indent=1))
    if (final if draw is None else draw) and not args.no_plot:
        plot(rows, args.systems, args.out / "results.png")
    return markdown


def report_from(paths: list[Path], out: Path) -> None:
    """Re-render results.md and results.png from results.json files (also partial ones of interrupted runs);
    with several files, a later file's rows replace an earlier file's rows for the same configuration."""
    runs = [json.loads(path.read_text()) for path in paths]
    rows_by_key: dict[tuple, Row] = {}
    for data in runs:
        for r in data["rows"]:
            rows_by_key[(r["system"], r["length"], r["phase"])] = Row(**r)
    rows = list(rows_by_key.values())
    first = runs[0]
    systems = [k for k in SYSTEMS if any(k in data["args"]["systems"] for data in runs)]
    lengths = sorted({n for data in runs for n in data["args"]["lengths"]})
    saved = argparse.Namespace(**dict(first["args"], out=out, no_plot=False, systems=systems, lengths=lengths))
    extras = {k: v for data in runs for k, v in data["extras"].items()}
    out.mkdir(parents=True, exist_ok=True)
    final = all(data.get("final", False) for data in runs)
    print(write_report(saved, first["machine"], rows, extras, sum(d["elapsed_s"] for d in runs), final,
                       draw=True, live=False))


if __name__ == "__main__":
    main()
