"""Fill a masked word far past position 512 of a long document.

    python examples/fill_mask.py --model roberta-base --max-length 4096
    python examples/fill_mask.py --tiny      # tiny random model (its guesses are random), offline
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

import lsg_patch

FILLER = "The committee met every week to discuss the budget, the schedule and the new members. "


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", help="checkpoint folder or hub name")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (offline)")
    args = parser.parse_args(argv)

    if args.tiny:
        from _tiny import tiny_model

        model, tokenizer = tiny_model(AutoModelForMaskedLM)
        args.max_length, block_size, repeats = 1024, 32, 40
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForMaskedLM.from_pretrained(args.model).eval()
        block_size, repeats = 128, args.max_length // 40

    lsg_patch.to_lsg(model, max_length=args.max_length, tokenizer=tokenizer, block_size=block_size,
                     sparse_block_size=block_size)
    text = FILLER * repeats + f"After all these meetings the committee finally approved the {tokenizer.mask_token}."
    batch = tokenizer(text, truncation=True, max_length=args.max_length, return_tensors="pt")
    position = (batch["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    with torch.no_grad():
        logits = model(**batch).logits[0, position]
    guesses = [tokenizer.decode([i]).strip() for i in logits.topk(5).indices.tolist()]
    print(f"document of {batch['input_ids'].shape[1]} tokens, mask at position {position}")
    print("top 5:", ", ".join(guesses))
    return guesses


if __name__ == "__main__":
    main()
