"""Fine-tune all-MiniLM-L6-v2 for long-document retrieval two ways on the same budget, and compare them on
the held-out documents of the quality benchmark (benchmarks/quality/):

  LSG    converted to 4096 tokens, reads each document whole; trained (a) on the global tokens only and
         (b) on all weights
  chunks the unconverted model, a document = the mean of its 256-token chunk embeddings; all weights trained

Same objective for both: a passage cut out of a training document must find that document among the batch's
documents (in-batch negatives, MultipleNegativesRanking-style, scale 20; batches of one kind of text, so the
negatives are hard). Same batches, same order, same steps. Training windows are `--crop` tokens (a step's
cost grows with them); evaluation reads the whole held-out documents (up to 3.6k tokens).

    python examples/finetune_long.py              # 48 steps: about 15 minutes on 2 shared CPU cores
    python examples/finetune_long.py --quick      # random tiny model, a few steps: checks the pipeline

The report goes to benchmarks/quality/results/finetune (committed); with --quick to benchmarks/out/finetune-quick
(ignored by git), so a check never overwrites the committed results. --out chooses another folder.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmark package lives in the repository

from benchmarks.quality import encoders as E  # noqa: E402
from benchmarks.quality.corpus import Document, build_documents, machine_sources, token_offsets  # noqa: E402
from benchmarks.quality.report import Scored, differences, machine, summary  # noqa: E402
from benchmarks.quality.run import (OUT, chunk_methods, held_out_documents,  # noqa: E402
                                    whole_document_method, write_report)

QUICK_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "finetune-quick"  # git ignores benchmarks/out
SCALE = 20.0
QUERY_TOKENS = 64

Encoder = Callable[[torch.nn.Module, object, list[list[int]]], torch.Tensor]


@dataclass(frozen=True)
class Example:
    """A training window of a document and a passage cut out of it (it stays in the window)."""

    window: list[int]
    query: list[int]


def training_batches(documents: list[Document], tokenizer, steps: int, batch_size: int, crop: int,
                     seed: int = 0) -> list[list[Example]]:
    """`steps` batches. Each epoch every document gives one example: a random window of `crop` tokens and a
    passage at a uniform depth in it. Examples are batched with others whose passage is the same kind of text
    (category), so the in-batch negatives are hard (eight changelogs, not one changelog among licenses); the
    remainders of the categories form mixed batches. A batch never holds one document twice."""
    rng = random.Random(seed)
    ids = E.token_ids(tokenizer, [d.text for d in documents])
    batches: list[list[Example]] = []
    while len(batches) < steps:
        groups: dict[str, list[Example]] = {}
        for index in rng.sample(range(len(ids)), len(ids)):
            start = rng.randrange(max(1, len(ids[index]) - crop + 1))
            window = ids[index][start: start + crop]
            at = rng.randrange(max(1, len(window) - QUERY_TOKENS + 1))
            category = documents[index].categories[start + at >= documents[index].split_token]
            groups.setdefault(category, []).append(Example(window, window[at: at + QUERY_TOKENS]))
        full = [g[k: k + batch_size] for g in groups.values() for k in range(0, len(g) - batch_size + 1, batch_size)]
        rest = [e for g in groups.values() for e in g[len(g) - len(g) % batch_size:]]
        epoch = full + [rest[k: k + batch_size] for k in range(0, len(rest), batch_size)]
        rng.shuffle(epoch)
        batches.extend(epoch)
    return batches[:steps]


def encode_whole(model: torch.nn.Module, tokenizer, windows: list[list[int]]) -> torch.Tensor:
    return E.encode(model, *E.pad([E.with_specials(tokenizer, w) for w in windows], tokenizer.pad_token_id))


def chunked_encoder(size: int) -> Encoder:
    """Documents as the normalised mean of their chunk embeddings, with gradients through every chunk."""
    def encode_chunked(model: torch.nn.Module, tokenizer, windows: list[list[int]]) -> torch.Tensor:
        pieces = [E.chunk(w, size) for w in windows]
        flat = [E.with_specials(tokenizer, p) for ps in pieces for p in ps]
        embeddings = E.encode(model, *E.pad(flat, tokenizer.pad_token_id))
        groups = embeddings.split([len(ps) for ps in pieces])
        return F.normalize(torch.stack([g.mean(0) for g in groups]), dim=-1)
    return encode_chunked


def train(model: torch.nn.Module, tokenizer, batches: list[list[Example]], encode_documents: Encoder, *,
          lr: float, trainable: Callable[[str], bool], label: str) -> dict:
    """In-batch-negative contrastive training; returns the losses and the seconds it took.

    Dropout stays off (eval mode): with a few dozen steps regularisation does not matter, and LSG's fused
    CPU kernel runs only without dropout."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable(name))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for step, batch in enumerate(batches):
        queries = encode_whole(model, tokenizer, [e.query for e in batch])
        documents = encode_documents(model, tokenizer, [e.window for e in batch])
        loss = F.cross_entropy(SCALE * queries @ documents.T, torch.arange(len(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"  {label} step {step + 1}: loss {loss.item():.3f} [{time.perf_counter() - start:.0f} s]", flush=True)
    model.requires_grad_(False)
    return {"losses": losses, "seconds": time.perf_counter() - start,
            "trained_parameters": sum(p.numel() for p in parameters)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="random tiny model, 8 training documents, 2 steps")
    parser.add_argument("--train-docs", type=int, default=160)
    parser.add_argument("--eval-docs", type=int, default=30, help="held-out documents (as the benchmark)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=1024, help="training window in tokens")
    parser.add_argument("--chunk", type=int, default=256, help="chunk size of the baseline")
    parser.add_argument("--sparsity-type", default="norm")
    parser.add_argument("--lr-global", type=float, default=1e-2, help="learning rate of the global tokens")
    parser.add_argument("--lr", type=float, default=3e-5, help="learning rate when training all weights")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report folder (default {OUT / 'finetune'}; with --quick {QUICK_OUT})")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_docs, args.eval_docs, args.steps, args.batch_size, args.crop = 8, 6, 2, 4, 600
    torch.manual_seed(0)
    start = time.perf_counter()
    base, tokenizer = E.load_base(args.quick)
    train_documents = build_documents(machine_sources(not args.quick), "train", args.train_docs,
                                      token_offsets(tokenizer))
    batches = training_batches(train_documents, tokenizer, args.steps, args.batch_size, args.crop)
    documents = held_out_documents(tokenizer, args.eval_docs, args.quick)
    doc_ids = E.token_ids(tokenizer, [d.text for d in documents])
    query_texts = [q.text for d in documents for q in d.queries]
    print(f"{len(train_documents)} training documents, {len(batches)} batches of {args.batch_size} windows of "
          f"{args.crop} tokens; "
          f"{len(documents)} held-out documents, {len(query_texts)} queries", flush=True)
    lsg = {"sparsity_type": args.sparsity_type}
    chunk_name = f"chunk-mean-{args.chunk}"

    def evaluate_chunks(model: torch.nn.Module, prefix: str) -> dict[str, Scored]:
        queries = E.query_embeddings(model, tokenizer, query_texts)
        found = chunk_methods(model, tokenizer, documents, doc_ids, queries, args.chunk)
        return {prefix + n: found[n] for n in (chunk_name, f"best-chunk-{args.chunk}")}

    results: dict[str, Scored] = {}
    training: dict[str, dict] = {}
    results.update(evaluate_chunks(base, ""))
    results[f"lsg-{args.sparsity_type}"] = whole_document_method(E.to_lsg_copy(base, tokenizer, lsg), tokenizer,
                                                                  documents, doc_ids, query_texts)
    print(f"[{time.perf_counter() - start:.0f} s] zero-shot evaluated", flush=True)
    runs = (("ft-lsg-global", True, lambda name: "global_embeddings" in name, args.lr_global),
            ("ft-lsg-all", True, lambda name: True, args.lr),
            ("ft-chunks", False, lambda name: True, args.lr))
    for label, converted, trainable, lr in runs:
        model = E.to_lsg_copy(base, tokenizer, lsg) if converted else copy.deepcopy(base)
        encoder = encode_whole if converted else chunked_encoder(args.chunk)
        training[label] = train(model, tokenizer, batches, encoder, lr=lr, trainable=trainable, label=label)
        if converted:
            results[label] = whole_document_method(model, tokenizer, documents, doc_ids, query_texts)
        else:
            results.update(evaluate_chunks(model, "ft-"))
        print(f"[{time.perf_counter() - start:.0f} s] {label}: trained in {training[label]['seconds']:.0f} s, "
              f"held-out R@1 {results[label if converted else 'ft-' + chunk_name].recall.mean():.3f}", flush=True)

    pairs = [("ft-lsg-all", "ft-" + chunk_name), ("ft-lsg-global", "ft-" + chunk_name),
             ("ft-lsg-all", f"lsg-{args.sparsity_type}"), ("ft-lsg-global", f"lsg-{args.sparsity_type}"),
             ("ft-" + chunk_name, chunk_name), ("ft-lsg-all", f"ft-best-chunk-{args.chunk}")]
    summary_ = summary(results, documents)
    rows = differences(results, documents, pairs)
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("quick", "out"))
    command = "python examples/finetune_long.py " + ("--quick" if args.quick else options)
    header = (f"Fine-tuning, {'random tiny model (--quick)' if args.quick else 'all-MiniLM-L6-v2'}: "
              f"{len(train_documents)} training documents, {args.steps} steps of {args.batch_size} "
              f"({args.crop}-token windows), evaluated on {len(documents)} held-out documents "
              f"({len(query_texts)} queries). Training seconds: "
              + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in training.items())
              + f". Command: `{command}`. Machine: {machine()}. Total {time.perf_counter() - start:.0f} s.")
    report = {"header": header, "training": training, "summary": summary_, "differences": rows}
    write_report(args.out or (QUICK_OUT if args.quick else OUT / "finetune"), report, "Held-out quality after fine-tuning, by evidence depth")
    return report


if __name__ == "__main__":
    main()
