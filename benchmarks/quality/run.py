"""Zero-shot long-document quality of all-MiniLM-L6-v2 on this machine's own text: truncation, chunks, and
LSG conversions to 4096 tokens, by evidence depth.

    python -m benchmarks.quality.run                 # full run (30 documents; 10-15 minutes on 2 shared cores)
    python -m benchmarks.quality.run --quick         # random tiny model, 6 documents: checks the pipeline
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import encoders as E
from .corpus import Document, build_documents, machine_sources, token_offsets
from .report import (PAST_512, Scored, difference_table, differences, machine, metric_table, plot, score,
                     summary)

OUT = Path(__file__).resolve().parent / "results"


def held_out_documents(tokenizer, count: int, quick: bool = False) -> list[Document]:
    """The evaluation documents: the same for the benchmark and the fine-tuning example."""
    return build_documents(machine_sources(not quick), "held_out", count, token_offsets(tokenizer))


def chunk_methods(base, tokenizer, documents: list[Document], doc_ids, queries: torch.Tensor,
                  size: int) -> dict[str, Scored]:
    """truncate-, chunk-mean- and best-chunk-`size` from one pass of the unconverted model over the chunks."""
    chunks, first_s, all_s = E.chunk_embeddings(base, tokenizer, doc_ids, size)
    first = torch.stack([c[0] for c in chunks])
    means = E.chunk_mean(chunks)
    return {f"truncate-{size}": score(queries @ first.T, documents, first, first_s),
            f"chunk-mean-{size}": score(queries @ means.T, documents, means, all_s),
            f"best-chunk-{size}": score(E.best_chunk_scores(queries, chunks), documents, None, all_s)}


def whole_document_method(model, tokenizer, documents: list[Document], doc_ids, query_texts: list[str]) -> Scored:
    """An LSG model reading each document whole."""
    queries = E.query_embeddings(model, tokenizer, query_texts)
    embeddings, seconds = E.whole_embeddings(model, tokenizer, doc_ids)
    return score(queries @ embeddings.T, documents, embeddings, seconds)


def reference_pairs(results: dict[str, Scored]) -> list[tuple[str, str]]:
    """Every LSG variant against truncation to 512, the better chunk-mean (by overall MRR) and lsg-norm (the
    default), plus lsg-norm against best-chunk-256."""
    chunk = max((n for n in results if n.startswith("chunk-mean")), key=lambda n: results[n].reciprocal.mean())
    lsg = [n for n in results if n.startswith("lsg")]
    return ([(n, ref) for ref in ("truncate-512", chunk) for n in lsg] + [("lsg-norm", "best-chunk-256")]
            + [(n, "lsg-norm") for n in lsg if n != "lsg-norm"])


def write_report(out: Path, report: dict, title: str) -> None:
    """results.json (the whole report), results.md (its tables), the plot; the header and the headline
    differences printed. report holds "header", "summary" and "differences" (shared by the zero-shot benchmark and
    examples/finetune_long.py)."""
    header, summary_, rows = report["header"], report["summary"], report["differences"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    text = [header, "", "### Retrieval recall@1 by passage depth", "", metric_table(summary_, "recall@1"),
            "", "### Retrieval MRR by passage depth", "", metric_table(summary_, "mrr"),
            "", "### Classification accuracy by depth of part B", "", metric_table(summary_, "accuracy"),
            "", "### Paired differences, recall@1 (95% bootstrap interval; * = above 0)", "",
            difference_table(rows, "recall@1"), "", "### Paired differences, MRR", "", difference_table(rows, "mrr"),
            "", "### Paired differences, classification accuracy", "", difference_table(rows, "accuracy"), ""]
    (out / "results.md").write_text("\n".join(text))
    plot(summary_, out / "quality_by_depth.png", title)
    print(header)
    print(difference_table(rows, "recall@1", (PAST_512, "all")))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=30, help="held-out documents (each gives 2-4 queries)")
    parser.add_argument("--quick", action="store_true", help="random tiny model, 6 documents, 3 LSG variants")
    parser.add_argument("--out", type=Path, default=OUT / "zero_shot")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    variants = E.LSG_VARIANTS
    if args.quick:
        args.docs = 6
        variants = {n: E.LSG_VARIANTS[n] for n in ("lsg-norm", "lsg-lsh", "lsg-norm-block64")}
    start = time.perf_counter()
    base, tokenizer = E.load_base(args.quick)
    documents = held_out_documents(tokenizer, args.docs, args.quick)
    query_texts = [q.text for d in documents for q in d.queries]
    doc_ids = E.token_ids(tokenizer, [d.text for d in documents])
    print(f"{len(documents)} held-out documents ({sum(map(len, doc_ids)):,} tokens), {len(query_texts)} queries; "
          f"corpus built in {time.perf_counter() - start:.0f} s", flush=True)
    results: dict[str, Scored] = {}
    queries = E.query_embeddings(base, tokenizer, query_texts)
    for size in E.CHUNK_SIZES:
        results.update(chunk_methods(base, tokenizer, documents, doc_ids, queries, size))
        print(f"[{time.perf_counter() - start:5.0f} s] chunks of {size}: " + ", ".join(
            f"{n} R@1 {results[n].recall.mean():.3f}" for n in results if n.endswith(f"-{size}")), flush=True)
    for name, options in variants.items():
        model = E.to_lsg_copy(base, tokenizer, options)
        results[name] = whole_document_method(model, tokenizer, documents, doc_ids, query_texts)
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: R@1 {results[name].recall.mean():.3f} "
              f"({results[name].seconds:.0f} s to embed the documents)", flush=True)
    summary_ = summary(results, documents)
    rows = differences(results, documents, reference_pairs(results))
    command = "python -m benchmarks.quality.run" + (" --quick" if args.quick else f" --docs {args.docs}")
    header = (f"Zero-shot, {'random tiny model (--quick)' if args.quick else 'all-MiniLM-L6-v2'}, "
              f"{len(documents)} held-out documents, {len(query_texts)} queries. Command: `{command}`. "
              f"Machine: {machine()}. Total {time.perf_counter() - start:.0f} s.")
    report = {"header": header, "documents": [d.name for d in documents], "summary": summary_,
              "differences": rows}
    write_report(args.out, report, "Zero-shot quality by evidence depth")
    return report


if __name__ == "__main__":
    main()
