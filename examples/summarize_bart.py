"""Summarize a long document with a BART-like model whose encoder reads up to --max-length tokens.

Only the encoder gets LSG attention; the decoder and generation are unchanged. A plain BART checkpoint
was not trained on long inputs: fine-tune it on long documents for good summaries.

    python examples/summarize_bart.py --model facebook/bart-large-cnn --max-length 4096
    python examples/summarize_bart.py --tiny      # tiny random BART (its output is random), offline
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import lsg_patch

REPORT = (
    "The city council reviewed the transport plan for the next decade. It proposes two new tram lines, "
    "safer cycling routes and lower fares for students, paid for by a tax on parking in the centre. "
)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/bart-large-cnn", help="checkpoint folder or hub name")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--tiny", action="store_true", help="tiny random BART (offline)")
    args = parser.parse_args(argv)

    if args.tiny:
        from _tiny import tiny_model

        model, tokenizer = tiny_model(AutoModelForSeq2SeqLM, model_type="bart")
        args.max_length, args.max_new_tokens, block_size, repeats = 1024, 8, 32, 20
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model).eval()
        block_size, repeats = 128, args.max_length // 40

    lsg_patch.to_lsg(model, max_length=args.max_length, tokenizer=tokenizer, block_size=block_size,
                     sparse_block_size=block_size, sparsity_type="bos_pooling")
    batch = tokenizer(REPORT * repeats, truncation=True, max_length=args.max_length, return_tensors="pt",
                      return_token_type_ids=False)
    start = time.perf_counter()
    with torch.no_grad():
        summary_ids = model.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=2)
    summary = tokenizer.decode(summary_ids[0], skip_special_tokens=True)
    print(f"summarized {batch['input_ids'].shape[1]} tokens into {summary_ids.shape[1]} in "
          f"{time.perf_counter() - start:.2f} s:\n{summary}")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
