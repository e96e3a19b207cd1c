"""ONNX export of the shipped MiniLM (all-MiniLM-L6-v2 converted to 4096 and 16384 tokens): onnxruntime against
lsg_patch in PyTorch, on the CPU.

    PYTHONPATH=. python benchmarks/export_onnx.py --threads 1      # writes benchmarks/results/export/

Steps, each system measured in its own process (so one's allocations never count for the other):
1. export: `lsg_patch.export_onnx` of the plain MiniLM folder at max_length 4096 and 16384 (model.onnx and the
   sentence-transformers graph sentence_embedding.onnx), timed;
2. parity: model.onnx in onnxruntime against the PyTorch model on padded batches of 2 (the second row padded to 60%)
   at 512, 1000, 4096 and 8192 tokens (the 16384 export; 512 and 4096 also on the 4096 one), max |difference| of
   last_hidden_state over the real tokens;
3. memory: peak resident memory of a process that loads the model and runs one forward of batch 1 at 4096 and 16384
   tokens (and its resident memory once loaded, before the forward), for onnxruntime and PyTorch;
4. latency: median of --repeats forwards of batch 1 at 4096 tokens after one warm-up, same --threads for both.
The machine's load average is recorded before and after: timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "export"
LENGTHS = {4096: (512, 4096), 16384: (1000, 8192)}  # parity lengths per export
MEMORY_LENGTHS = (4096, 16384)
VOCAB = (1000, 30000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/lsg_export_bench", help="where the ONNX folders are written")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.work, args.threads, args.repeats)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": _machine(), "threads": args.threads, "repeats": args.repeats,
                     "load_before": os.getloadavg()}
    results["export_s"] = {str(n): _run(["export", str(n)], args)["seconds"] for n in LENGTHS}
    results["parity"] = [_run(["parity", str(n), str(length)], args) for n, lengths in LENGTHS.items()
                         for length in lengths]
    results["memory"] = [_run(["memory", system, str(length)], args) for length in MEMORY_LENGTHS
                         for system in ("onnxruntime", "pytorch")]
    results["latency"] = [_run(["latency", system, "4096"], args) for system in ("onnxruntime", "pytorch")]
    results["load_after"] = os.getloadavg()
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "results.md").write_text(_markdown(results))
    print(_markdown(results))


def _run(step: list[str], args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--work", args.work, "--threads", str(args.threads), "--repeats",
               str(args.repeats), "--child", *step]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(step)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(step, result, flush=True)
    return result


def _child(step: list[str], work: str, threads: int, repeats: int) -> dict:
    kind = step[0]
    if kind == "export":
        from lsg_patch import export_onnx
        from lsg_patch.demo import minilm_path

        start = time.perf_counter()
        export_onnx(minilm_path(), _folder(work, int(step[1])), max_length=int(step[1]), overwrite=True)
        return {"seconds": round(time.perf_counter() - start, 1)}
    import torch

    torch.set_num_threads(threads)
    if kind == "parity":
        return _parity(work, int(step[1]), int(step[2]), threads)
    system, length = step[1], int(step[2])
    export_length = 4096 if length <= 4096 else 16384
    rss_loaded = None
    if system == "onnxruntime":
        session = _session(work, export_length, threads)
        forward = lambda feed: session.run(None, {k: v.numpy() for k, v in feed.items()})  # noqa: E731
    else:
        model = _torch_model(export_length)
        forward = lambda feed: _torch_forward(model, feed)  # noqa: E731
    feed = _inputs(1, length, padded=False)
    rss_loaded = _rss_mib()
    if kind == "memory":
        forward(feed)
        return {"system": system, "length": length, "rss_loaded_mib": rss_loaded, "peak_rss_mib": _peak_rss_mib()}
    forward(feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(feed)
        times.append(time.perf_counter() - start)
    return {"system": system, "length": length, "median_s": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times]}


def _parity(work: str, export_length: int, length: int, threads: int) -> dict:
    import numpy as np

    session = _session(work, export_length, threads)
    model = _torch_model(export_length)
    feed = _inputs(2, length, padded=True)
    expected = _torch_forward(model, feed).numpy()
    got = session.run(["last_hidden_state"], {k: v.numpy() for k, v in feed.items()})[0]
    real = feed["attention_mask"].numpy().astype(bool)
    return {"export": export_length, "length": length, "batch": 2,
            "max_abs_diff": float(np.abs(got - expected)[real].max())}


def _folder(work: str, max_length: int) -> Path:
    return Path(work) / f"minilm-lsg-{max_length}"


def _session(work: str, max_length: int, threads: int):  # noqa: ANN202
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(_folder(work, max_length) / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])


def _torch_model(max_length: int):  # noqa: ANN202
    """The MiniLM converted as export_onnx converts it (to_lsg of the SentenceTransformer, deterministic)."""
    from sentence_transformers import SentenceTransformer

    import lsg_patch
    from lsg_patch.demo import minilm_path

    sentence = lsg_patch.to_lsg(SentenceTransformer(minilm_path(), device="cpu"), max_length=max_length)
    return sentence[0].auto_model.eval()


def _torch_forward(model, feed):  # noqa: ANN001, ANN202
    import torch

    with torch.inference_mode():
        return model(**feed).last_hidden_state


def _inputs(batch: int, length: int, padded: bool) -> dict:
    import torch

    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(*VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, int(length * 0.6):] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _machine() -> str:
    import platform

    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


def _markdown(results: dict) -> str:
    lines = [f"# ONNX export of MiniLM-L6 (LSG 4096 / 16384): onnxruntime vs lsg_patch in PyTorch",
             "", f"Machine: {results['machine']}; {results['threads']} thread(s) for both systems; load average "
             f"{'/'.join(f'{x:.1f}' for x in results['load_before'])} before, "
             f"{'/'.join(f'{x:.1f}' for x in results['load_after'])} after (shared machine: timings are noisy).",
             "", "Export time (`export_onnx`, model.onnx + sentence_embedding.onnx): "
             + ", ".join(f"{n}: {s} s" for n, s in results["export_s"].items()), "",
             "| parity: export | tokens | batch (row 2 padded to 60%) | max abs diff, last_hidden_state |",
             "|---|---|---|---|"]
    lines += [f"| {p['export']} | {p['length']} | {p['batch']} | {p['max_abs_diff']:.2e} |" for p in results["parity"]]
    lines += ["", "| memory: system | tokens | RSS loaded (MiB) | peak RSS after one forward (MiB) | growth (MiB) |",
              "|---|---|---|---|---|"]
    lines += [f"| {m['system']} | {m['length']} | {m['rss_loaded_mib']} | {m['peak_rss_mib']} | "
              f"{m['peak_rss_mib'] - m['rss_loaded_mib']:.1f} |" for m in results["memory"]]
    lines += ["", f"| latency: system | tokens | median of {results['repeats']} (s) | runs (s) |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['length']} | {r['median_s']} | {', '.join(map(str, r['times_s']))} |"
              for r in results["latency"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
