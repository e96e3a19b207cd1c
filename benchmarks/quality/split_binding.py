"""Split binding (after LongEmbed's passkey): can the embedding bind two facts that lie `d` tokens apart?

Into a real 3-3.5k-token held-out document of this machine's text we insert "Module X is maintained by team
T1. Module Y is maintained by team T2." at token p and "Team T1's release key is K1. Team T2's release key is
K2." d tokens later (both pairs in a random order). Its negative twin swaps the team names in the maintainer
sentences only, so there X's key is K2. The query "The release key of module X is K1." must score the document
above its twin (twin accuracy; a tie counts 1/2), and K1 must rank first among 100 candidate keys for the
document (K1, the distractor K2 and 98 keys it does not contain; MRR). Once the maintainer sentences and the key
sentences lie in different chunks, a method that scores chunks embedded alone sees the same key chunk in the
document and its twin and a maintainer chunk that names no key: it cannot beat chance on the twins. d = 64 is
the control (both pairs usually in one chunk).

    python -m benchmarks.quality.split_binding            # all-MiniLM-L6-v2, 16 documents x 4 distances x 2 twins
    python -m benchmarks.quality.split_binding --quick    # random tiny model, 1 short document: checks the pipeline
"""
from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lsg_patch

from . import encoders as E
from .buckets import paired_differences, summarize, write
from .corpus import machine_sources, split_of, token_offsets
from .report import machine

OUT = Path(__file__).resolve().parent / "results" / "split_binding"
DISTANCES = (64, 256, 1024, 3072)
LENGTHS = (3072, 3584)
QUICK_DISTANCES, QUICK_LENGTHS = (64, 1024), (1100, 1200)  # --quick: short documents, so it runs in seconds
CHUNK_SIZES = (128, 256)
CANDIDATES = 100
WINDOW, WINDOW_OVERLAP, LSG_LENGTH = 512, 128, 4096
MODULES = ("quartz_loader", "ember_sync", "tidal_cache", "copper_gate", "maple_queue", "onyx_router", "velvet_store",
           "cobalt_index", "amber_parser", "granite_auth", "willow_stream", "falcon_batch", "saffron_codec",
           "iris_monitor", "basalt_vault", "juniper_relay")
TEAMS = ("Heron", "Otter", "Lynx", "Badger", "Marten", "Osprey", "Puffin", "Wren", "Bison", "Ibex", "Kestrel", "Plover")


@dataclass(frozen=True)
class Pair:
    """A document with the two fact pairs inserted, its negative twin, and the candidate statements."""

    distance: int
    document: str
    twin: str
    candidates: list[str]  # candidates[0] is the true statement, candidates[1] names the distractor's key


def base_documents(tokenizer, count: int, quick: bool, lengths: tuple[int, int],
                   seed: int = 0) -> list[tuple[str, list[tuple[int, int]]]]:
    """`count` held-out sources of at least lengths[1] tokens, cut to a length uniform in `lengths`: text and token
    character offsets."""
    rng = random.Random(seed)
    sources = [s for s in machine_sources(not quick) if split_of(s.name) == "held_out"]
    rng.shuffle(sources)
    offsets_of = token_offsets(tokenizer)
    documents = []
    for source in sources:
        offsets = offsets_of(source.text)
        if len(offsets) >= lengths[1]:
            length = rng.randint(*lengths)
            text = source.text[: offsets[length - 1][1]]
            documents.append((text, offsets[:length]))
            if len(documents) == count:
                return documents
    raise ValueError(f"only {len(documents)} held-out sources of {lengths[1]} tokens; {count} asked")


def word_start(text: str, offsets: list[tuple[int, int]], token: int) -> int:
    """Character where the first whole word at or after `token` starts (an insertion never splits a word)."""
    for start, _ in offsets[token:]:
        if start == 0 or text[start - 1].isspace():
            return start
    return len(text)


def make_pair(text: str, offsets: list[tuple[int, int]], distance: int, rng: random.Random) -> Pair:
    x, y = rng.sample(MODULES, 2)
    t1, t2 = rng.sample(TEAMS, 2)
    keys = rng.sample(range(10000, 100000), CANDIDATES)
    k1, k2 = keys[0], keys[1]
    maintained = [(x, t1), (y, t2)]
    rng.shuffle(maintained)
    key_lines = [f"Team {t1}'s release key is {k1}.", f"Team {t2}'s release key is {k2}."]
    rng.shuffle(key_lines)
    swap = {t1: t2, t2: t1}
    first = rng.randrange(0, len(offsets) - distance)
    at_a, at_b = word_start(text, offsets, first), word_start(text, offsets, first + distance)

    def insert(facts: list[tuple[str, str]]) -> str:
        block_a = " ".join(f"Module {m} is maintained by team {t}." for m, t in facts)
        return f"{text[:at_a]}{block_a}\n{text[at_a:at_b]}{' '.join(key_lines)}\n{text[at_b:]}"

    return Pair(distance, insert(maintained), insert([(m, swap[t]) for m, t in maintained]),
                [f"The release key of module {x} is {k}." for k in keys])


def build_pairs(tokenizer, count: int, quick: bool, seed: int = 0) -> list[Pair]:
    """One pair per base document and distance (both shorter with --quick)."""
    rng = random.Random(seed)
    lengths, distances = (QUICK_LENGTHS, QUICK_DISTANCES) if quick else (LENGTHS, DISTANCES)
    return [make_pair(text, offsets, d, rng) for text, offsets in base_documents(tokenizer, count, quick, lengths, seed)
            for d in distances]


def chunk_spans(offsets: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(offsets[s][0], offsets[min(s + size, len(offsets)) - 1][1]) for s in range(0, len(offsets), size)]


def representations(model, tokenizer, texts: list[str], max_length: int, overlap: int) -> list[dict[str, torch.Tensor]]:
    """Per text, from one late-chunking pass: "whole" (the whole text's embedding when it fits one window) and
    the late-chunked chunks of each size."""
    offsets = [token_offsets(tokenizer)(t) for t in texts]
    spans = [[(0, len(t))] + [s for size in CHUNK_SIZES for s in chunk_spans(o, size)] for t, o in zip(texts, offsets)]
    chunked = lsg_patch.encode_chunks(model, texts, chunk_by="spans", spans=spans, tokenizer=tokenizer, pooling="mean",
                                      normalize=True, max_length=max_length, window_overlap=overlap,
                                      batch_size=4 if max_length <= WINDOW else 1)
    out = []
    for o, document in zip(offsets, chunked):
        counts = [1] + [len(range(0, len(o), size)) for size in CHUNK_SIZES]
        whole, *chunks = torch.split(document.embeddings, counts)
        out.append({"whole": whole[0], **{f"chunks-{size}": c for size, c in zip(CHUNK_SIZES, chunks)}})
    return out


def naive_representations(model, tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per text: the first 512 tokens embedded ("truncate") and its chunks each embedded alone; a piece shared by
    several texts (a document and its twin share all chunks but one) is embedded once."""
    ids = E.token_ids(tokenizer, texts)
    pieces = {tuple(doc[: WINDOW - 2]) for doc in ids}
    pieces |= {tuple(piece) for doc in ids for size in CHUNK_SIZES for piece in E.chunk(doc, size + 2)}
    pieces = sorted(pieces, key=len)
    slices = [pieces[i: i + 256] for i in range(0, len(pieces), 256)]
    embedded = torch.cat([E.embed_sequences(model, [E.with_specials(tokenizer, list(p)) for p in piece_slice],
                                            tokenizer.pad_token_id)
                          for piece_slice in tqdm(slices, desc="chunks embedded alone", unit="256 chunks")])
    row = {piece: i for i, piece in enumerate(pieces)}
    return [{"truncate": embedded[row[tuple(doc[: WINDOW - 2])]],
             **{f"chunks-{size}": embedded[[row[tuple(p)] for p in E.chunk(doc, size + 2)]] for size in CHUNK_SIZES}}
            for doc in ids]


def vector_scores(statements: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return statements @ vector


def best_chunk_scores(statements: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    return (statements @ chunks.T).max(1).values


def chunk_mean_scores(statements: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    return statements @ F.normalize(chunks.mean(0), dim=-1)


def method_scores(statements: list[torch.Tensor], documents: list[dict], twins: list[dict], key: str,
                  scorer) -> dict[str, np.ndarray]:
    """Twin accuracy (1 / 0.5 / 0 as the true statement scores the document above / equal to / below its twin)
    and the reciprocal rank of the true key among the candidates, per pair."""
    twin, reciprocal = [], []
    for s, document, negative in zip(statements, documents, twins):
        scores = scorer(s, document[key])
        twin.append(0.5 + 0.5 * float(torch.sign(scores[0] - scorer(s[:1], negative[key])[0])))
        reciprocal.append(1.0 / float((scores >= scores[0]).sum()))
    return {"twin accuracy": np.array(twin), "mrr": np.array(reciprocal)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=16, help="base documents (each gives one pair per distance)")
    parser.add_argument("--quick", action="store_true", help="random tiny model, 1 short document, 2 distances")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    count = 1 if args.quick else args.docs
    distances, lengths = (QUICK_DISTANCES, QUICK_LENGTHS) if args.quick else (DISTANCES, LENGTHS)
    base, tokenizer = E.load_base(args.quick)
    pairs = build_pairs(tokenizer, count, args.quick)
    texts = [p.document for p in pairs] + [p.twin for p in pairs]
    print(f"{len(pairs)} document/twin pairs ({count} documents x distances {distances}); "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)
    seconds = {}

    def timed(label: str, started: float) -> None:
        seconds[label] = time.perf_counter() - started
        print(f"[{time.perf_counter() - start:5.0f} s] {label} took {seconds[label]:.0f} s", flush=True)

    def statements_of(model) -> list[torch.Tensor]:
        flat = [c for p in pairs for c in p.candidates]
        embedded = E.embed_sequences(model, [E.with_specials(tokenizer, ids) for ids in E.token_ids(tokenizer, flat)],
                                     tokenizer.pad_token_id)
        return list(torch.split(embedded, CANDIDATES))

    started = time.perf_counter()
    base_statements = statements_of(base)
    naive = naive_representations(base, tokenizer, texts)
    timed("naive chunks and truncation", started)
    started = time.perf_counter()
    late512 = representations(base, tokenizer, texts, WINDOW, WINDOW_OVERLAP)
    timed("late512", started)
    lsg = lsg_patch.to_lsg(copy.deepcopy(base), max_length=LSG_LENGTH, tokenizer=copy.deepcopy(tokenizer))
    started = time.perf_counter()
    lsg_statements = statements_of(lsg)
    late_lsg = representations(lsg, tokenizer, texts, LSG_LENGTH, 512)
    timed("lsg", started)
    n = len(pairs)
    methods = {"truncate-512": (base_statements, naive, "truncate", vector_scores)}
    for size in CHUNK_SIZES:
        methods[f"chunk-mean-{size}"] = (base_statements, naive, f"chunks-{size}", chunk_mean_scores)
        methods[f"best-chunk-{size}"] = (base_statements, naive, f"chunks-{size}", best_chunk_scores)
    for size in CHUNK_SIZES:
        methods[f"late512-best-{size}"] = (base_statements, late512, f"chunks-{size}", best_chunk_scores)
    for size in CHUNK_SIZES:
        methods[f"late-lsg-best-{size}"] = (lsg_statements, late_lsg, f"chunks-{size}", best_chunk_scores)
    methods["lsg"] = (lsg_statements, late_lsg, "whole", vector_scores)
    scores = {name: method_scores(statements, reps[:n], reps[n:], key, scorer)
              for name, (statements, reps, key, scorer) in methods.items()}
    order = [str(d) for d in distances]
    labels = np.array([str(p.distance) for p in pairs])
    compared = [("lsg", f"{kind}-{size}") for kind in ("chunk-mean", "best-chunk") for size in CHUNK_SIZES]
    compared += [("lsg", "truncate-512"), ("late-lsg-best-256", "best-chunk-256"),
                 ("late-lsg-best-256", "late512-best-256"), ("lsg", "late512-best-256")]
    command = "python -m benchmarks.quality.split_binding" + (" --quick" if args.quick else f" --docs {args.docs}")
    header = (f"Split binding, {'random tiny model (--quick)' if args.quick else 'all-MiniLM-L6-v2'}, zero-shot: "
              f"{count} held-out documents of {lengths[0]}-{lengths[1]} tokens x distances {distances} = {n} pairs "
              f"(document + negative twin), {CANDIDATES} candidate keys each. late512: windows of {WINDOW} tokens "
              f"overlapping by {WINDOW_OVERLAP}; lsg: to_lsg(max_length={LSG_LENGTH}) defaults, mean over the whole "
              f"document. Command: `{command}`. Machine: {machine()}. Total {time.perf_counter() - start:.0f} s.")
    report = {"header": header, "seconds": seconds, "summary": summarize(scores, labels, order),
              "differences": paired_differences(scores, labels, order, compared),
              "pairs": [{"distance": p.distance, "true": p.candidates[0], "distractor": p.candidates[1]}
                        for p in pairs]}
    markdown = write(args.out, report, [("twin accuracy", "Twin accuracy"), ("mrr", "MRR over 100 keys")], order,
                     "distance d in tokens", "Split binding by distance between the two facts")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
