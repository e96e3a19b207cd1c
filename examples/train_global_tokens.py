"""Train only the global tokens (and the task head) of a converted model, as the LSG model cards suggest
for a first adaptation: every pretrained weight stays frozen, so a few steps on little data are enough
to teach the new global tokens to collect the document.

    python examples/train_global_tokens.py --model roberta-base --max-length 4096 --steps 200
    python examples/train_global_tokens.py --tiny      # tiny random model, toy data, offline
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lsg_patch

TOPICS = [
    "The match went to extra time and the home team scored twice from corners in the last minutes. ",
    "The central bank raised interest rates again and markets fell as investors feared a recession. ",
]


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The global embeddings, plus every parameter outside the base model (the task head)."""
    prefix = model.base_model_prefix + "."
    return [name for name, _ in model.named_parameters()
            if "global_embeddings" in name or not name.startswith(prefix)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", help="checkpoint folder or hub name")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="tiny random model, 10 steps (offline)")
    args = parser.parse_args(argv)

    if args.tiny:
        from _tiny import tiny_model

        model, tokenizer = tiny_model(AutoModelForSequenceClassification, num_labels=2)
        args.max_length, args.steps, block_size, repeats = 512, 10, 32, 12
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        block_size, repeats = 128, args.max_length // 20

    lsg_patch.to_lsg(model, max_length=args.max_length, tokenizer=tokenizer, block_size=block_size,
                     sparse_block_size=block_size, num_global_tokens=4)
    names = set(trainable_names(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {count:,} of {sum(p.numel() for p in model.parameters()):,} parameters: {sorted(names)}")

    batch = tokenizer([topic * repeats for topic in TOPICS], truncation=True, max_length=args.max_length,
                      padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2 if args.tiny else 1e-3)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")
    changed = sorted(name for name, p in model.named_parameters() if not torch.equal(p, before[name]))
    print(f"parameters changed by training: {changed}")
    return {"losses": losses, "trainable": sorted(names), "changed": changed}


if __name__ == "__main__":
    main()
