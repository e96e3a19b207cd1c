"""Peak memory and time of one forward of a small random ModernBERT converted to LSG at a long length.

    taskset -c 0 python benchmarks/modernbert_sliding.py --tokens 32768

Run it once per version in a fresh process (the peak is the process's maximum resident set size): put the
checkout to measure first on PYTHONPATH. It prints one JSON line: the lsg_patch it imported, the resident set
before the timed forward and the process peak (MiB), and the seconds of each timed forward.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import ModernBertConfig, ModernBertModel

import lsg_patch


def resident_mib() -> float:
    """The current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--runs", type=int, default=1, help="timed forwards after one short warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModernBertConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                              num_attention_heads=4, local_attention=128, global_attn_every_n_layers=3,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                              attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = lsg_patch.to_lsg(ModernBertModel(config).eval(), max_length=args.tokens)
    ids = torch.randint(5, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids[:, :1024])  # warm-up: kernels and allocator, at a short length
        before = resident_mib()
        seconds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            model(input_ids=ids)
            seconds.append(round(time.perf_counter() - start, 3))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"lsg_patch": lsg_patch.__file__, "tokens": args.tokens, "threads": args.threads,
                      "resident_before_mib": round(before), "peak_mib": round(peak), "seconds": seconds}))


if __name__ == "__main__":
    main()
