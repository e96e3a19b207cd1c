"""Does a small Llama trained at 512 tokens read further once converted to LSG? Trained from scratch here on this
machine's Python sources, then measured on held-out files against a 512-token sliding window (stride 64, every
token scored with at least 448 tokens of context: the fair short-context baseline).

    python -m benchmarks.quality.decoder_long_range --threads 1   # full run: 15 minutes on 2 heavily shared cores
    python -m benchmarks.quality.decoder_long_range --replot      # results.md and plot again from results.json
    python -m benchmarks.quality.decoder_long_range --quick       # tiny model, a few files: checks the pipeline

Steps: a BPE on the train split; a Llama pretrained on 512-token crops; two continuations of it with the same
number of tokens, the unconverted model on 512-token crops (the window baseline's) and the LSG conversion on
`train_long_length`-token crops; then per held-out file (its first `long_length` tokens): the loss by position, the
loss on identifiers last seen more than 512 tokens back (and, as controls, on new names and names seen within
512 tokens), and the code passkey (`_KEY_A = 48213` near the top, `assert _KEY_A == ` d tokens later; the
model's teacher-forced digits). The training text holds key/assert pairs too (one every ~`tokens_per_pair`
tokens, log-uniform distances up to `max_pair_distance`), the same text for every model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lsg_patch

from . import code_corpus as C
from .metrics import paired_bootstrap_ci
from .report import machine

RESULTS = Path(__file__).resolve().parent / "results" / "decoder_long_range"
OUT = Path(__file__).resolve().parents[1] / "out"  # git-ignored: checkpoints and --quick results
CHECKPOINTS = OUT / "decoder_long_range"


@dataclass(frozen=True)
class Settings:
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    short_length: int = 512              # pretraining length and the window baseline's window
    stride: int = 64
    long_length: int = 4096              # LSG max_length and evaluated file length
    train_long_length: int = 2048        # LSG training crops
    batch: int = 4                       # 512-token crops per step; an LSG step takes the same tokens
    pretrain_steps: int = 350
    pretrain_lr: float = 1e-2
    continue_steps: int = 80
    continue_lr: float = 5e-4
    tokens_per_pair: int = 150
    max_pair_distance: int = 3500
    lsg: dict = field(default_factory=lambda: {"block_size": 128, "sparse_block_size": 384, "sparsity_factor": 8,
                                               "sparsity_type": "norm"})
    lsg_default: dict = field(default_factory=lambda: {"block_size": 128, "sparse_block_size": 128,
                                                       "sparsity_factor": 2, "sparsity_type": "norm"})
    eval_files: int = 12
    distances: tuple[int, ...] = (256, 1000, 3000)
    buckets: tuple[tuple[int, int], ...] = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096))
    train_files: int = 10_000            # at most this many train files (all of them in the full run)
    seed: int = 0


QUICK = Settings(vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64, short_length=128,
                 stride=32, long_length=512, train_long_length=256, batch=2, pretrain_steps=3, continue_steps=2,
                 tokens_per_pair=100,
                 max_pair_distance=400, lsg={"block_size": 32, "sparse_block_size": 32, "sparsity_factor": 4,
                                             "sparsity_type": "norm"},
                 lsg_default={"block_size": 32, "sparse_block_size": 32, "sparsity_factor": 2,
                              "sparsity_type": "norm"},
                 eval_files=2, distances=(64, 300), buckets=((0, 128), (128, 512)), train_files=12)


# ---------------------------------------------------------------- data


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: list[list[int]]          # BOS + ids of each augmented train file
    held_out: list[C.CodeFile]      # files of at least long_length tokens, the first eval_files of them


def build_corpus(settings: Settings) -> Corpus:
    train_files = C.python_files("train")[: settings.train_files]
    tokenizer = C.train_tokenizer((f.text for f in train_files), settings.vocab_size)
    rng = random.Random(settings.seed)
    train = [C.encode(tokenizer, C.with_key_pairs(tokenizer, f.text, rng, tokens_per_pair=settings.tokens_per_pair,
                                                  max_distance=settings.max_pair_distance))[0]
             for f in tqdm(train_files, desc="train files", leave=False)]
    held_out = []
    for file in C.python_files("held_out"):
        if len(held_out) < settings.eval_files and len(C.encode(tokenizer, file.text)[0]) >= settings.long_length:
            held_out.append(file)
    return Corpus(tokenizer, train, held_out)


def crops(files: list[list[int]], length: int, count: int, rng: random.Random) -> torch.Tensor:
    """`count` random crops of `length` tokens, from files at least that long, weighted by their crop count."""
    eligible = [f for f in files if len(f) >= length]
    weights = [len(f) - length + 1 for f in eligible]
    out = []
    for file in rng.choices(eligible, weights, k=count):
        start = rng.randrange(len(file) - length + 1)
        out.append(file[start: start + length])
    return torch.tensor(out)


# ---------------------------------------------------------------- models and training


def new_model(settings: Settings) -> LlamaForCausalLM:
    torch.manual_seed(settings.seed)
    config = LlamaConfig(vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
                         num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                         num_key_value_heads=settings.heads, intermediate_size=settings.intermediate_size,
                         max_position_embeddings=settings.short_length, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def to_lsg(model: LlamaForCausalLM, settings: Settings, options: dict) -> LlamaForCausalLM:
    """A converted copy (the model given stays as it is)."""
    return lsg_patch.to_lsg(copy.deepcopy(model), max_length=settings.long_length, bos_token_id=0, **options)


def train(model, batches: int, make_batch, lr: float, warmup: int, decay: bool, desc: str) -> list[float]:
    """AdamW with linear warm-up then cosine decay to 10% (or constant); returns the per-step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, batches - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)) if decay else 1.0

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    bar = tqdm(range(batches), desc=desc)
    for _ in bar:
        ids = make_batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def whole_scores(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted token (ids[1:]): NLL and whether the argmax was right, from one forward over all of ids."""
    tokens = torch.tensor(ids)
    logits = model(input_ids=tokens[None]).logits[0, :-1].float()
    return (F.cross_entropy(logits, tokens[1:], reduction="none").numpy(),
            (logits.argmax(-1) == tokens[1:]).numpy())


def window_ends(length: int, window: int, stride: int) -> list[int]:
    """Ends of the sliding windows over `length` tokens: the first covers [0, window), each next one moves by
    `stride` (the last may move less), so a token predicted in a window has at least window - stride tokens
    of context there (fewer only inside the first window)."""
    if not 0 < stride < window:
        raise ValueError(f"stride must be in [1, window - 1] = [1, {window - 1}] so that every scored token has "
                         f"context in its window; got {stride}")
    ends = list(range(min(window, length), length, stride))
    return ends + [length]


@torch.no_grad()
def window_scores(model, ids: list[int], window: int, stride: int, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Like whole_scores, but each token scored in the window whose newly covered tokens include it."""
    tokens = torch.tensor(ids)
    ends = window_ends(len(ids), window, stride)
    nll, correct = np.zeros(len(ids) - 1), np.zeros(len(ids) - 1, dtype=bool)
    for first in range(0, len(ends), batch):
        group = ends[first: first + batch]
        starts = [max(0, end - window) for end in group]
        logits = model(input_ids=torch.stack([tokens[s:e] for s, e in zip(starts, group)])).logits.float()
        for row, (start, end) in enumerate(zip(starts, group)):
            index = ends.index(end)
            new_from = 1 if index == 0 else ends[index - 1]  # first token this window scores
            predicted = tokens[new_from:end]
            row_logits = logits[row, new_from - 1 - start: end - 1 - start]
            nll[new_from - 1: end - 1] = F.cross_entropy(row_logits, predicted, reduction="none").numpy()
            correct[new_from - 1: end - 1] = (row_logits.argmax(-1) == predicted).numpy()
    return nll, correct


@dataclass
class Method:
    """How one model reads a sequence: whole (dense or LSG) or through the sliding window."""

    name: str
    model: object
    window: int | None = None
    stride: int | None = None

    def scores(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if self.window is None:
            return whole_scores(self.model, ids)
        return window_scores(self.model, ids, self.window, self.stride)

    def digit_scores(self, key: C.Passkey) -> tuple[float, float, bool]:
        """NLL summed over the assert's digits, the share of digits right and all right (teacher-forced); the
        window reads the `window` tokens ending at the last digit."""
        ids = key.ids if self.window is None else key.ids[-self.window:]
        offset = len(key.ids) - len(ids)
        nll, correct = whole_scores(self.model, ids)
        picked = [d - offset - 1 for d in key.digits]
        return float(nll[picked].sum()), float(correct[picked].mean()), bool(correct[picked].all())


def evaluate(methods: list[Method], corpus: Corpus, settings: Settings) -> dict:
    """Per method and per file (or per passkey): the numbers every table and interval is built from."""
    per_file = {m.name: {"bucket": [], "identifier": []} for m in methods}
    passkeys = {m.name: [] for m in methods}
    files = []
    for file in tqdm(corpus.held_out, desc="held-out files"):
        ids, offsets = C.encode(corpus.tokenizer, file.text)
        ids, offsets = ids[: settings.long_length], offsets[: settings.long_length]
        classes = C.identifier_classes(C.identifier_spans(file.text), offsets, settings.short_length)
        positions = np.arange(1, len(ids))  # position of each predicted token
        files.append(file.name)
        for method in methods:
            nll, _ = method.scores(ids)
            per_file[method.name]["bucket"].append(
                [float(nll[(positions >= lo) & (positions < hi)].mean()) for lo, hi in settings.buckets])
            per_file[method.name]["identifier"].append(
                {kind: _mean([float(nll[[t - 1 for t in tokens]].mean()) for k, tokens in classes if k == kind])
                 for kind in ("new", "near", "far")})
    rng = random.Random(settings.seed + 1)
    keys = [k for file in corpus.held_out for d in settings.distances
            if (k := C.passkey(corpus.tokenizer, file, d, C.random_key_value(rng))) is not None
            and len(k.ids) <= settings.long_length]
    for key in tqdm(keys, desc="passkeys"):
        for method in methods:
            nll, share, exact = method.digit_scores(key)
            passkeys[method.name].append({"distance": key.target, "tokens": key.distance, "nll": nll,
                                          "digit_accuracy": share, "exact": exact})
    return {"files": files, "per_file": per_file, "passkeys": passkeys}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------- summaries


def summarise(raw: dict, settings: Settings, pairs: list[tuple[str, str]]) -> dict:
    """Means per method, and paired bootstrap intervals of a - b (per file for losses, per passkey)."""
    buckets = [f"{lo}-{hi}" for lo, hi in settings.buckets]
    means, differences = {}, []
    for name, data in raw["per_file"].items():
        bucket = np.array(data["bucket"])
        identifier = {k: np.array([f[k] for f in data["identifier"]]) for k in ("new", "near", "far")}
        keys = raw["passkeys"][name]
        means[name] = {
            "loss_by_position": dict(zip(buckets, np.nanmean(bucket, 0).tolist())),
            "identifier_loss": {k: float(np.nanmean(v)) for k, v in identifier.items()},
            "passkey_exact": {str(d): _mean([k["exact"] for k in keys if k["distance"] == d])
                              for d in settings.distances},
            "passkey_digit_accuracy": {str(d): _mean([k["digit_accuracy"] for k in keys if k["distance"] == d])
                                       for d in settings.distances},
            "passkey_nll": {str(d): _mean([k["nll"] for k in keys if k["distance"] == d]) for d in settings.distances},
            "passkey_n": {str(d): sum(k["distance"] == d for k in keys) for d in settings.distances}}
    for a, b in pairs:
        A, B = raw["per_file"][a], raw["per_file"][b]
        for i, bucket in enumerate(buckets):
            x, y = np.array(A["bucket"])[:, i], np.array(B["bucket"])[:, i]
            differences.append(_difference(a, b, "loss", bucket, x, y))
        for kind in ("new", "near", "far"):
            x, y = np.array([f[kind] for f in A["identifier"]]), np.array([f[kind] for f in B["identifier"]])
            differences.append(_difference(a, b, "identifier loss", kind, x, y))
        for d in settings.distances:
            x = [k for k in raw["passkeys"][a] if k["distance"] == d]
            y = [k for k in raw["passkeys"][b] if k["distance"] == d]
            for metric in ("exact", "nll"):
                differences.append(_difference(a, b, f"passkey {metric}", f"d={d}",
                                               np.array([k[metric] for k in x], float),
                                               np.array([k[metric] for k in y], float)))
    return {"means": means, "differences": differences}


def _difference(a: str, b: str, metric: str, where: str, x: np.ndarray, y: np.ndarray) -> dict:
    kept = ~(np.isnan(x) | np.isnan(y))
    mean, low, high = paired_bootstrap_ci(x[kept], y[kept])
    return {"a": a, "b": b, "metric": metric, "where": where, "n": int(kept.sum()),
            "difference": mean, "low": low, "high": high}


def markdown(summary: dict, settings: Settings) -> str:
    means = summary["means"]
    buckets = [f"{lo}-{hi}" for lo, hi in settings.buckets]
    lines = ["Mean loss (nats/token) by position of the predicted token, identifier loss by when the name last "
             "occurred, passkey by distance: exact-match (all 5 digits right) / NLL of the 5 digits (chance: 5 ln 10 = "
             f"{KEY_DIGITS_CHANCE:.1f} nats); lower loss / higher exact-match is better.",
             "",
             "| method | " + " | ".join(f"loss {b}" for b in buckets) + " | ident. new | ident. near | ident. far | "
             + " | ".join(f"passkey d={d}" for d in settings.distances) + " |",
             "|---" * (1 + len(buckets) + 3 + len(settings.distances)) + "|"]
    for name, m in means.items():
        cells = [f"{m['loss_by_position'][b]:.3f}" for b in buckets]
        cells += [f"{m['identifier_loss'][k]:.3f}" for k in ("new", "near", "far")]
        cells += [f"{m['passkey_exact'][str(d)]:.2f} / {m['passkey_nll'][str(d)]:.1f}" for d in settings.distances]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences a - b, mean and 95% bootstrap interval (losses: over files; passkey: over "
              "passkeys). Loss: negative = a better; passkey exact: positive = a better; * = interval excludes 0.",
              "", "| a - b | metric | where | n | difference [95% CI] |", "|---|---|---|---|---|"]
    for r in summary["differences"]:
        star = "*" if r["low"] > 0 or r["high"] < 0 else ""
        lines.append(f"| {r['a']} - {r['b']} | {r['metric']} | {r['where']} | {r['n']} | "
                     f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]{star} |")
    return "\n".join(lines)


KEY_DIGITS_CHANCE = C.KEY_DIGITS * math.log(10)  # NLL of a key's digits guessed uniformly


def plot(summary: dict, settings: Settings, path: Path) -> None:
    """Quality by distance, one line per method: loss by position, identifier loss by class, passkey by d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = summary["means"]
    buckets = [f"{lo}-{hi}" for lo, hi in settings.buckets]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    panels = ((axes[0], "loss_by_position", buckets, "position of the predicted token", "loss (nats/token)"),
              (axes[1], "identifier_loss", ["new", "near", "far"],
               "identifier last seen: never / within 512 tokens / further back", "identifier loss (nats/token)"),
              (axes[2], "passkey_nll", [str(d) for d in settings.distances], "key-to-assert distance d (tokens)",
               "passkey: NLL of the 5 digits (nats)"))
    for i, name in enumerate(means):
        lsg = name.startswith("lsg")
        style = dict(color=plt.cm.tab10(i), marker="o" if lsg else "s", linestyle="-" if lsg else "--", label=name)
        for axis, metric, xs, _, _ in panels:
            axis.plot(xs, [means[name][metric][x] for x in xs], **style)
    axes[2].axhline(KEY_DIGITS_CHANCE, color="grey", linestyle=":", label="chance (5 ln 10)")
    for axis, _, _, xlabel, ylabel in panels:
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    fig.legend(*axes[2].get_legend_handles_labels(), loc="lower center", ncol=len(means) + 1, fontsize=9)
    fig.suptitle("Small Llama trained at 512 tokens on Python sources: LSG whole file vs 512-token sliding window")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the run


def run(settings: Settings, out: Path, checkpoints: Path) -> dict:
    started = time.time()
    machine_line = machine()
    corpus = build_corpus(settings)
    rng = random.Random(settings.seed + 2)
    short = lambda: crops(corpus.train, settings.short_length, settings.batch, rng)  # noqa: E731
    long_batch = max(1, settings.batch * settings.short_length // settings.train_long_length)
    long = lambda: crops(corpus.train, settings.train_long_length, long_batch, rng)  # noqa: E731

    base = new_model(settings)
    timings, losses = {}, {}
    t = time.time()
    losses["pretrain"] = train(base, settings.pretrain_steps, short, settings.pretrain_lr,
                               max(1, settings.pretrain_steps // 10), True, "pretrain 512")
    timings["pretrain"] = time.time() - t
    zero_shot = [Method("window-512", base, settings.short_length, settings.stride),
                 Method("full-4k", base), Method("lsg-4k", to_lsg(base, settings, settings.lsg)),
                 Method("lsg-4k default", to_lsg(base, settings, settings.lsg_default))]

    window_trained = copy.deepcopy(base)
    t = time.time()
    losses["continue 512"] = train(window_trained, settings.continue_steps, short, settings.continue_lr,
                                   max(1, settings.continue_steps // 10), False, "continue 512")
    timings["continue 512"] = time.time() - t
    lsg_trained = to_lsg(base, settings, settings.lsg)
    t = time.time()
    losses["continue lsg"] = train(lsg_trained, settings.continue_steps, long, settings.continue_lr,
                                   max(1, settings.continue_steps // 10), False,
                                   f"continue lsg {settings.train_long_length}")
    timings["continue lsg"] = time.time() - t
    trained = [Method("window-512 +train", window_trained, settings.short_length, settings.stride),
               Method("lsg-4k +train", lsg_trained)]

    checkpoints.mkdir(parents=True, exist_ok=True)
    corpus.tokenizer.save(str(checkpoints / "tokenizer.json"))
    base.save_pretrained(checkpoints / "base")
    lsg_trained.save_pretrained(checkpoints / "lsg_trained")

    t = time.time()
    raw = evaluate(zero_shot + trained, corpus, settings)
    timings["evaluate"] = time.time() - t
    pairs = [("lsg-4k", "window-512"), ("lsg-4k default", "window-512"), ("full-4k", "window-512"),
             ("lsg-4k +train", "window-512 +train"), ("lsg-4k +train", "lsg-4k")]
    summary = summarise(raw, settings, pairs)
    timings["total"] = time.time() - started
    result = {"settings": asdict(settings), "machine": machine_line, "seconds": timings,
              "train_files": len(corpus.train), "train_tokens": sum(map(len, corpus.train)),
              "final_train_loss": {k: float(np.mean(v[-20:])) for k, v in losses.items()},
              "summary": summary, "raw": raw}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(summary, settings) + "\n")
    plot(summary, settings, out / "quality_by_distance.png")
    return result


def settings_from_json(values: dict) -> Settings:
    values = dict(values, distances=tuple(values["distances"]), buckets=tuple(map(tuple, values["buckets"])))
    return Settings(**values)


def replot(out: Path) -> dict:
    result = json.loads((out / "results.json").read_text())
    settings = settings_from_json(result["settings"])
    (out / "results.md").write_text(markdown(result["summary"], settings) + "\n")
    plot(result["summary"], settings, out / "quality_by_distance.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and a few files: seconds")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    parser.add_argument("--replot", action="store_true",
                        help="rewrite results.md and the plot from the results.json in --out, without running")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 runs better on a machine other jobs load")
    parser.add_argument("--checkpoints", type=Path, default=None, help=f"model folder (default {CHECKPOINTS})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    out = args.out or (OUT / "decoder_long_range_quick" if args.quick else RESULTS)
    if args.replot:
        return replot(out)
    result = run(settings, out, args.checkpoints or (out / "checkpoints" if args.quick else CHECKPOINTS))
    print(markdown(result["summary"], settings))
    print(f"{result['seconds']['total']:.0f} s; results in {out}")
    return result


if __name__ == "__main__":
    main()
