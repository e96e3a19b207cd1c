"""Late-chunking retrieval on the Python standard library's sources: a chunk that needs its document.

Query "Class.method" plus the first line of the method's docstring; the target is the chunk (of 128 or 256
tokens) holding its `def`, among all chunks of the same file, where the same method name is defined in other
classes too. Only the chunk's context says which class it is in, so a chunk embedded alone (naive) has to guess,
late chunking inside 512-token windows knows when the `class` line is fewer than ~512 tokens back, and late
chunking over the whole file with LSG can know at any distance. Ceiling: each chunk embedded with the `class`
line it lies under prepended. Recall@1 and MRR by the distance (in tokens) from the `class` line to the `def`.

    python -m benchmarks.quality.late_chunking            # all-MiniLM-L6-v2, ~100k tokens of stdlib sources
    python -m benchmarks.quality.late_chunking --quick    # random tiny model, 3 files: checks the pipeline
"""
from __future__ import annotations

import argparse
import ast
import bisect
import copy
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lsg_patch

from . import encoders as E
from .buckets import paired_differences, summarize, write
from .metrics import ranks, recall_at_1, reciprocal_rank
from .report import machine

OUT = Path(__file__).resolve().parent / "results" / "late_chunking"
BUCKETS = ["<512", "512-2k", ">2k"]
CHUNK_SIZES = (128, 256)
WINDOW = 512
WINDOW_OVERLAP = 128
LSG_LENGTH = 16384  # every selected file is read whole
LSG_OVERLAP = 1024
SKIPPED_PARTS = {"site-packages", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class MethodQuery:
    """A method defined in several classes of its file: the query, where its `def` is, its class line."""

    text: str
    def_token: int
    distance: int


@dataclass
class SourceFile:
    name: str
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    classes: list[tuple[int, int, str]]  # first token, end token, `class` line of each top-level class
    queries: list[MethodQuery]


def distance_bucket(tokens: int) -> str:
    return "<512" if tokens < 512 else "512-2k" if tokens < 2048 else ">2k"


def read_source(name: str, text: str, tokenizer) -> SourceFile | None:
    """The file's top-level classes and a query per method whose name another class of the file defines too;
    None when it has no such method or does not parse."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    methods = [(c, m) for c in classes for m in c.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    defined = Counter(m.name for _, m in methods)
    if not any(defined[m.name] > 1 for _, m in methods):
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    line_starts = np.cumsum([0] + [len(line) for line in text.splitlines(keepends=True)]).tolist()
    token_starts = [start for start, _ in offsets]

    def token_at_line(line: int) -> int:
        return bisect.bisect_left(token_starts, line_starts[line - 1])

    spans = [(token_at_line(c.lineno), token_at_line(c.end_lineno + 1), text.splitlines()[c.lineno - 1].strip())
             for c in classes]
    queries = []
    for cls, method in methods:
        if defined[method.name] > 1:
            doc = (ast.get_docstring(method) or "").strip().splitlines()
            def_token = token_at_line(method.lineno)
            queries.append(MethodQuery(f"{cls.name}.{method.name}" + (f": {doc[0]}" if doc else ""), def_token,
                                       def_token - token_at_line(cls.lineno)))
    return SourceFile(name, text, ids, offsets, spans, queries)


def stdlib_files(tokenizer, token_budget: int, max_tokens: int, scan: int | None = None) -> list[SourceFile]:
    """Files of at most max_tokens with ambiguous methods, those with the most queries past 512 tokens per token
    first, until token_budget tokens: the distances past 512 are the rare ones. Deterministic. scan: read only
    the first `scan` files in path order (--quick; reading them all takes ~20 s)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py"))[:scan]:
        relative = path.relative_to(stdlib)
        if SKIPPED_PARTS & set(relative.parts):
            continue
        source = read_source(str(relative), path.read_text(encoding="utf-8", errors="replace"), tokenizer)
        if source is not None and len(source.ids) <= max_tokens:
            files.append(source)
    files.sort(key=lambda f: (-sum(q.distance >= 512 for q in f.queries) / len(f.ids), f.name))
    chosen, total = [], 0
    for source in files:
        if total + len(source.ids) <= token_budget:
            chosen.append(source)
            total += len(source.ids)
    return chosen


def token_chunks(count: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def class_line_of(source: SourceFile, token: int) -> str | None:
    """The `class` line of the top-level class whose body holds `token`."""
    return next((line for start, end, line in source.classes if start <= token < end), None)


def embed_texts(model, tokenizer, sequences: list[list[int]]) -> torch.Tensor:
    return E.embed_sequences(model, [E.with_specials(tokenizer, ids) for ids in sequences], tokenizer.pad_token_id)


def naive_chunks(model, tokenizer, source: SourceFile, size: int, with_class_line: bool) -> torch.Tensor:
    """Each chunk embedded alone; with_class_line: with the `class` line it lies under prepended (the ceiling)."""
    pieces = []
    for start, end in token_chunks(len(source.ids), size):
        line = class_line_of(source, start) if with_class_line else None
        prefix = E.token_ids(tokenizer, [line])[0] if line else []
        pieces.append(prefix + source.ids[start:end])
    return embed_texts(model, tokenizer, pieces)


def late_chunks(model, tokenizer, files: list[SourceFile], max_length: int,
                overlap: int) -> list[dict[int, torch.Tensor]]:
    """Per file, per chunk size, its chunks' late-chunked embeddings from one encode_chunks pass."""
    spans = [[(f.offsets[s][0], f.offsets[e - 1][1]) for size in CHUNK_SIZES for s, e in token_chunks(len(f.ids), size)]
             for f in files]
    chunked = lsg_patch.encode_chunks(model, [f.text for f in files], chunk_by="spans", spans=spans,
                                      tokenizer=tokenizer,
                                      pooling="mean", normalize=True, max_length=max_length, window_overlap=overlap,
                                      batch_size=4 if max_length <= WINDOW else 1)
    out = []
    for f, document in zip(files, chunked):
        counts = [len(token_chunks(len(f.ids), size)) for size in CHUNK_SIZES]
        out.append(dict(zip(CHUNK_SIZES, torch.split(document.embeddings, counts))))
    return out


def scores_of(files: list[SourceFile], queries: torch.Tensor, chunks: list[torch.Tensor], size: int) -> dict:
    """Per query: rank of the chunk holding its `def` among its file's chunks -> recall@1 and reciprocal rank."""
    rank, row = [], 0
    for source, file_chunks in zip(files, chunks):
        targets = [q.def_token // size for q in source.queries]
        rank.append(ranks(queries[row: row + len(targets)] @ file_chunks.T, targets))
        row += len(targets)
    rank = torch.cat(rank)
    return {"recall@1": recall_at_1(rank), "mrr": reciprocal_rank(rank)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens of stdlib sources to read")
    parser.add_argument("--quick", action="store_true", help="random tiny model, ~3 small files")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base, tokenizer = E.load_base(args.quick)
    lsg_length = 4096 if args.quick else LSG_LENGTH
    files = stdlib_files(tokenizer, 6000 if args.quick else args.tokens, 2048 if args.quick else lsg_length,
                         60 if args.quick else None)
    labels = np.array([distance_bucket(q.distance) for f in files for q in f.queries])
    print(f"{len(files)} files ({sum(len(f.ids) for f in files):,} tokens), {len(labels)} queries "
          f"({dict(Counter(labels))}); [{time.perf_counter() - start:.0f} s]", flush=True)
    query_ids = E.token_ids(tokenizer, [q.text for f in files for q in f.queries])
    scores, seconds = {}, {}

    def timed(label: str, started: float) -> None:
        seconds[label] = time.perf_counter() - started
        print(f"[{time.perf_counter() - start:5.0f} s] {label} took {seconds[label]:.0f} s", flush=True)

    base_queries = embed_texts(base, tokenizer, query_ids)
    for size in CHUNK_SIZES:
        for name, with_line in ((f"naive-{size}", False), (f"ceiling-{size}", True)):
            started = time.perf_counter()
            chunks = [naive_chunks(base, tokenizer, f, size, with_line) for f in files]
            scores[name] = scores_of(files, base_queries, chunks, size)
            timed(name, started)
    started = time.perf_counter()
    late = late_chunks(base, tokenizer, files, WINDOW, WINDOW_OVERLAP)
    for size in CHUNK_SIZES:
        scores[f"late512-{size}"] = scores_of(files, base_queries, [c[size] for c in late], size)
    timed("late512", started)
    lsg = lsg_patch.to_lsg(copy.deepcopy(base), max_length=lsg_length, tokenizer=copy.deepcopy(tokenizer))
    started = time.perf_counter()
    late = late_chunks(lsg, tokenizer, files, lsg_length, LSG_OVERLAP)
    lsg_queries = embed_texts(lsg, tokenizer, query_ids)
    for size in CHUNK_SIZES:
        scores[f"late-lsg-{size}"] = scores_of(files, lsg_queries, [c[size] for c in late], size)
    timed("late-lsg", started)
    order = [m for size in CHUNK_SIZES for m in (f"naive-{size}", f"late512-{size}", f"late-lsg-{size}",
                                                 f"ceiling-{size}")]
    scores = {m: scores[m] for m in order}
    pairs = [p for size in CHUNK_SIZES for p in ((f"late-lsg-{size}", f"naive-{size}"),
                                                 (f"late-lsg-{size}", f"late512-{size}"),
                                                 (f"late512-{size}", f"naive-{size}"),
                                                 (f"late-lsg-{size}", f"ceiling-{size}"))]
    command = "python -m benchmarks.quality.late_chunking" + (" --quick" if args.quick else f" --tokens {args.tokens}")
    header = (f"Late-chunking retrieval, {'random tiny model (--quick)' if args.quick else 'all-MiniLM-L6-v2'}: "
              f"{len(files)} stdlib files ({sum(len(f.ids) for f in files):,} tokens), {len(labels)} method queries, "
              f"candidates = all chunks of the query's file. late512: windows of {WINDOW} tokens overlapping by "
              f"{WINDOW_OVERLAP}; late-lsg: to_lsg(max_length={lsg_length}) defaults, whole files. Command: "
              f"`{command}`. Machine: {machine()}. Total {time.perf_counter() - start:.0f} s.")
    report = {"header": header, "files": [f.name for f in files], "seconds": seconds,
              "queries": [{"file": f.name, "query": q.text, "distance": q.distance} for f in files for q in f.queries],
              "summary": summarize(scores, labels, BUCKETS),
              "differences": paired_differences(scores, labels, BUCKETS, pairs)}
    markdown = write(args.out, report, [("recall@1", "Recall@1"), ("mrr", "MRR")], BUCKETS,
                     "tokens from the class line to the def", "Late-chunking retrieval by class-to-def distance")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
