"""Causal LSG generation with its constant-size cache (LSGCache) against transformers' dense cache.

Three measurements, written as one markdown report:
* cache bytes per layer after a prompt, for every sparsity type, and their ratio to the dense cache of the same model
  (measured DynamicCache at 4k and 16k tokens; at 64k its size is computed from its shape, 2 x kv heads x tokens x
  head size x 4 bytes per layer, since a dense 64k prefill does not fit this machine's time);
* time per generated token after a 16k-token prompt: LSG (LSGCache) against the unconverted model (SDPA, DynamicCache),
  each run in its own process, A-B-B-A, median of the per-token times of every run;
* LSG prefill time at 4k, 8k and 16k tokens and the log-log slope from 4k to 16k.

Model: a Llama of random weights (hidden 256, 4 layers, 4 query heads, 2 key/value heads, vocabulary 32000), fp32,
batch 1. LSG: block 128, sparse 128, factor 2, norm (the defaults), unless --layout says otherwise.

    python benchmarks/generation.py --out benchmarks/results/generation.md          # about 10 minutes on 2 cores
    python benchmarks/generation.py --quick                                         # smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPARSITY_TYPES = ["norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling", "none"]
LAYOUT = dict(block_size=128, sparse_block_size=128, sparsity_factor=2)


def build(lsg: dict | None, max_length: int):
    """The benchmark Llama, converted with `lsg` (None: unconverted, SDPA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lsg_patch

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=max_length + 512,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if lsg is not None:
        model = lsg_patch.to_lsg(model, max_length=max_length, **lsg)
    return model


def cache_bytes(cache) -> int:
    """Bytes of any cache: an LSGCache says it; a DynamicCache is its layers' keys and values."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def returned_cache(output):
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def child(spec: dict) -> dict:
    """One measurement in this process (see `main`)."""
    import torch

    torch.set_num_threads(spec["threads"])
    ids = torch.randint(5, 32000, (1, spec["tokens"]), generator=torch.Generator().manual_seed(0))
    model = build(spec.get("lsg"), max(spec["tokens"], 4096) + spec.get("steps", 0))
    with torch.no_grad():
        if spec["kind"] == "bytes":
            cache = returned_cache(model(ids, use_cache=True))
            layers = len(model.model.layers)
            return {"bytes_per_layer": cache_bytes(cache) / layers}
        if spec["kind"] == "prefill":
            model(ids[:, :256], use_cache=True)  # warm-up
            times = []
            for _ in range(spec["runs"]):
                start = time.perf_counter()
                model(ids, use_cache=True)
                times.append(time.perf_counter() - start)
            return {"seconds": statistics.median(times)}
        out = model(ids, use_cache=True)  # "decode": per-token time after the prompt
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        return {"per_token": times[2:]}  # the first steps warm the kernels up


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"child {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    lsg_default = dict(LAYOUT, sparsity_type="norm")
    base = {"threads": args.threads}
    report: dict = {"bytes": {}, "dense_bytes": {}, "decode": {}, "prefill": {}}
    for kind in args.kinds:
        lsg = dict(LAYOUT, sparsity_type=kind)
        report["bytes"][kind] = run_child({**base, "kind": "bytes", "tokens": args.bytes_tokens, "lsg": lsg})
        print("bytes", kind, report["bytes"][kind], flush=True)
    for tokens in args.dense_tokens:
        report["dense_bytes"][tokens] = run_child({**base, "kind": "bytes", "tokens": tokens})
        print("dense bytes", tokens, report["dense_bytes"][tokens], flush=True)
    for tokens in args.constant_tokens:  # the LSG cache does not grow: measured, not assumed
        report["bytes"][f"norm@{tokens}"] = run_child({**base, "kind": "bytes", "tokens": tokens, "lsg": lsg_default})
    systems = {"lsg": lsg_default, "dense": None}
    times: dict[str, list[float]] = {"lsg": [], "dense": []}
    for name in ["lsg", "dense", "dense", "lsg"] * args.rounds:
        spec = {**base, "kind": "decode", "tokens": args.prompt, "steps": args.steps, "lsg": systems[name]}
        times[name] += run_child(spec)["per_token"]
        print("decode", name, statistics.median(times[name]), flush=True)
    report["decode"] = {name: statistics.median(values) for name, values in times.items()}
    for tokens in args.prefill_tokens:
        spec = {**base, "kind": "prefill", "tokens": tokens, "runs": args.runs, "lsg": lsg_default}
        report["prefill"][tokens] = run_child(spec)["seconds"]
        print("prefill", tokens, report["prefill"][tokens], flush=True)
    return report


def markdown(report: dict, args: argparse.Namespace, started: str) -> str:
    import torch
    import transformers

    dense = {int(k): v["bytes_per_layer"] for k, v in report["dense_bytes"].items()}
    per_token_dense = dense[min(dense)] / min(dense)  # a dense cache grows by the same bytes with every token
    lines = [
        "# Causal LSG generation: constant-size cache against the dense cache",
        "",
        f"Command: `python benchmarks/generation.py {' '.join(args.argv)}`, started {started}. Machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {args.threads} torch thread(s). {args.conditions}",
        "",
        "Model: Llama with random weights, hidden 256, 4 layers, 4 query heads, 2 key/value heads (head size 64), "
        "fp32, batch 1. LSG: block 128, sparse block 128, sparsity factor 2.",
        "",
        f"## Cache bytes per layer after a {report_tokens(args.bytes_tokens)} prompt",
        "",
        "| sparsity type | LSGCache bytes / layer | / dense at 4k | / dense at 16k | / dense at 64k |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in args.kinds:
        ours = report["bytes"][kind]["bytes_per_layer"]
        ratios = [ours / (per_token_dense * tokens) for tokens in (4096, 16384, 65536)]
        lines.append(f"| {kind} | {ours:,.0f} | " + " | ".join(f"{r:.2%}" for r in ratios) + " |")
    lines += ["", "Dense cache (transformers' DynamicCache, same model), bytes per layer: "
              + ", ".join(f"{tokens} tokens {value:,.0f} (measured)" for tokens, value in sorted(dense.items()))
              + f"; 65536 tokens {per_token_dense * 65536:,.0f} (from its shape: {per_token_dense:.0f} bytes per "
              "token and layer).",
              "The LSG cache does not grow with the prompt (norm): "
              + ", ".join(f"{key.split('@')[1]} tokens {value['bytes_per_layer']:,.0f}"
                          for key, value in report["bytes"].items() if "@" in key) + " bytes per layer.",
              "", f"## Time per generated token after a {report_tokens(args.prompt)} prompt", "",
              "| system | ms per token (median) |", "|---|---:|",
              f"| lsg_patch, LSGCache (norm) | {report['decode']['lsg'] * 1000:.2f} |",
              f"| unconverted, SDPA + DynamicCache | {report['decode']['dense'] * 1000:.2f} |",
              "", f"dense / LSG: {report['decode']['dense'] / report['decode']['lsg']:.2f}x "
              f"({args.rounds * 2} processes per system, A-B-B-A, {args.steps - 2} timed steps each).",
              "", "## LSG prefill", "", "| tokens | seconds (median) |", "|---:|---:|"]
    prefill = {int(k): v for k, v in report["prefill"].items()}
    lines += [f"| {tokens} | {seconds:.3f} |" for tokens, seconds in sorted(prefill.items())]
    low, high = min(prefill), max(prefill)
    slope = math.log(prefill[high] / prefill[low]) / math.log(high / low)
    lines += ["", f"Log-log slope from {low} to {high} tokens: {slope:.3f}.", ""]
    return "\n".join(lines)


def report_tokens(tokens: int) -> str:
    return f"{tokens}-token"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny lengths and few runs (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="A-B-B-A rounds of the decoding measurement")
    parser.add_argument("--steps", type=int, default=34, help="tokens generated per decoding run (2 warm-up)")
    parser.add_argument("--runs", type=int, default=3, help="timed prefills per length (median)")
    parser.add_argument("--conditions", default="", help="a sentence on the machine's load, for the report")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.argv = sys.argv[1:] if argv is None else argv
    args.kinds = SPARSITY_TYPES
    if args.quick:
        args.kinds, args.bytes_tokens, args.dense_tokens, args.constant_tokens = ["norm", "none"], 600, [300], [900]
        args.prompt, args.prefill_tokens, args.rounds, args.steps, args.runs = 600, [300, 600], 1, 4, 1
    else:
        args.bytes_tokens, args.dense_tokens, args.constant_tokens = 4096, [4096, 16384], [16384, 65536]
        args.prompt, args.prefill_tokens = 16384, [4096, 8192, 16384]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = markdown(measure(args), args, started)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
