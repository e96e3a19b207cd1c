"""Classify long documents with an encoder that was pretrained on 512 tokens.

to_lsg extends the position table and swaps in LSG attention, so the classifier reads the whole document
instead of its first 512 tokens. The classification head of a plain checkpoint is untrained: fine-tune it
(see train_global_tokens.py), or start from a fine-tuned classifier.

    python examples/classify_long_document.py --model path/or/name/of/a/classifier --max-length 4096
    python examples/classify_long_document.py --tiny      # tiny random model, offline, a few seconds
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lsg_patch

REVIEW = (
    "The hotel was close to the station and the staff were friendly. Breakfast was generous, the rooms were "
    "quiet at night, and the view over the harbour made up for the small bathroom. "
)
COMPLAINT = (
    "The heating failed on the second night, nobody answered at the desk, and the refund we were promised "
    "never arrived. The corridor smelled of smoke and the lift was out of order for the whole week. "
)


def main(argv: list[str] | None = None) -> torch.Tensor:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", help="checkpoint folder or hub name")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--sparsity-type", default="norm")
    parser.add_argument("--tiny", action="store_true", help="tiny random model and short documents (offline)")
    args = parser.parse_args(argv)

    if args.tiny:
        from _tiny import tiny_model

        model, tokenizer = tiny_model(AutoModelForSequenceClassification, num_labels=2)
        args.max_length, args.block_size, words = 1024, 32, 700
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        words = 3 * args.max_length

    lsg_patch.to_lsg(model, max_length=args.max_length, tokenizer=tokenizer, block_size=args.block_size,
                     sparse_block_size=args.block_size, sparsity_type=args.sparsity_type)
    documents = [" ".join((REVIEW * 200).split()[:words]), " ".join((COMPLAINT * 200).split()[: words // 2])]
    batch = tokenizer(documents, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        probabilities = model(**batch).logits.softmax(-1)
    seconds = time.perf_counter() - start
    lengths = batch["attention_mask"].sum(1).tolist()
    print(f"classified {len(documents)} documents of {lengths} tokens in {seconds:.2f} s "
          f"(LSG, block_size {model.config.block_size}, sparsity {model.config.sparsity_type})")  # fmt: skip
    for length, row in zip(lengths, probabilities.tolist()):
        labels = ", ".join(f"{model.config.id2label[i]}: {p:.3f}" for i, p in enumerate(row))
        print(f"  {length:5d} tokens -> {labels}")
    return probabilities


if __name__ == "__main__":
    main()
