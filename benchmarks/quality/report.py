"""Scores by evidence depth, paired differences with bootstrap intervals, markdown tables and the plot:
shared by the zero-shot benchmark and the fine-tuning example so both report the same way."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import CATEGORIES, DEPTH_BINS, Document, depth_bin
from .metrics import multilabel_probe_correct, paired_bootstrap_ci, ranks, recall_at_1, reciprocal_rank

PAST_512 = "past 512"
BINS = [f"{low}-{high}" for low, high in DEPTH_BINS] + [PAST_512, "all"]


@dataclass
class Scored:
    """One method's per-item results: per query (retrieval) and per document (classification)."""

    recall: np.ndarray
    reciprocal: np.ndarray
    correct: np.ndarray | None
    seconds: float


def query_depths(documents: list[Document]) -> np.ndarray:
    return np.array([q.depth for d in documents for q in d.queries])


def label_matrix(documents: list[Document]) -> np.ndarray:
    return np.array([[c in d.label for c in CATEGORIES] for d in documents], dtype=float)


def score(scores: torch.Tensor, documents: list[Document], doc_embeddings: torch.Tensor | None,
          seconds: float) -> Scored:
    """Per-query retrieval results from a queries x documents score matrix, and per-document probe results
    when the method gives one vector per document."""
    targets = [q.document for d in documents for q in d.queries]
    rank = ranks(scores, targets)
    correct = None
    if doc_embeddings is not None:
        correct = multilabel_probe_correct(doc_embeddings.numpy(), label_matrix(documents))
    return Scored(recall_at_1(rank), reciprocal_rank(rank), correct, seconds)


def bin_masks(depths: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the items in each depth bin, past 512 tokens, and all."""
    labels = np.array([depth_bin(int(d)) for d in depths])
    masks = {name: labels == name for name in BINS[:-2]}
    masks[PAST_512] = depths >= 512
    masks["all"] = np.ones(len(depths), dtype=bool)
    return masks


def by_depth(values: np.ndarray, depths: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean and count of per-item values in each bin."""
    return {name: {"n": int(mask.sum()), "mean": float(values[mask].mean()) if mask.any() else float("nan")}
            for name, mask in bin_masks(depths).items()}


def summary(results: dict[str, Scored], documents: list[Document]) -> dict[str, dict]:
    """Per method: recall@1, MRR and (where defined) classification accuracy by depth, and seconds."""
    q_depths, split_depths = query_depths(documents), np.array([d.split_token for d in documents])
    out = {}
    for name, scored in results.items():
        out[name] = {"seconds": scored.seconds, "recall@1": by_depth(scored.recall, q_depths),
                     "mrr": by_depth(scored.reciprocal, q_depths)}
        if scored.correct is not None:
            out[name]["accuracy"] = by_depth(scored.correct, split_depths)
    return out


def differences(results: dict[str, Scored], documents: list[Document], pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired difference a - b with its 95% bootstrap interval, per bin, for recall@1, MRR and accuracy."""
    q_masks = bin_masks(query_depths(documents))
    d_masks = bin_masks(np.array([d.split_token for d in documents]))
    rows = []
    for a, b in pairs:
        for metric, field, masks in (("recall@1", "recall", q_masks), ("mrr", "reciprocal", q_masks),
                                     ("accuracy", "correct", d_masks)):
            x, y = getattr(results[a], field), getattr(results[b], field)
            if x is None or y is None:
                continue
            for name, mask in masks.items():
                mean, low, high = paired_bootstrap_ci(x[mask], y[mask])
                rows.append({"a": a, "b": b, "metric": metric, "bin": name, "n": int(mask.sum()),
                             "difference": mean, "low": low, "high": high})
    return rows


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), no GPU used; 1-min load average at start {load:.1f}")


def metric_table(summary_: dict[str, dict], metric: str) -> str:
    """Markdown: one row per method, one column per bin (mean, with the item count in the header)."""
    names = [n for n in summary_ if metric in summary_[n]]
    if not names:
        return ""
    counts = summary_[names[0]][metric]
    header = "| method | " + " | ".join(f"{b} (n={counts[b]['n']})" for b in BINS) + " | seconds |"
    lines = [header, "|---" * (len(BINS) + 2) + "|"]
    for name in names:
        cells = " | ".join(f"{summary_[name][metric][b]['mean']:.3f}" for b in BINS)
        lines.append(f"| {name} | {cells} | {summary_[name]['seconds']:.0f} |")
    return "\n".join(lines)


def difference_table(rows: list[dict], metric: str, bins: tuple[str, ...] = (PAST_512, "all")) -> str:
    """Markdown: the paired differences of one metric with their 95% intervals; * marks an interval above 0."""
    lines = ["| a - b | " + " | ".join(bins) + " |", "|---" * (len(bins) + 1) + "|"]
    pairs = list(dict.fromkeys((r["a"], r["b"]) for r in rows if r["metric"] == metric))
    for a, b in pairs:
        cells = []
        for name in bins:
            r = next(r for r in rows if (r["a"], r["b"], r["metric"], r["bin"]) == (a, b, metric, name))
            star = "*" if r["low"] > 0 else ""
            cells.append(f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]{star}")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary_: dict[str, dict], path: Path, title: str) -> None:
    """Quality by evidence depth, one line per method: retrieval recall@1 and classification accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = BINS[:-2]
    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(summary_)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for axis, metric, ylabel in ((axes[0], "recall@1", "retrieval recall@1 (passage -> document)"),
                                 (axes[1], "accuracy", "classification accuracy (label set, probe)")):
        for name, entry in summary_.items():
            if metric in entry:
                lsg = "lsg" in name
                axis.plot(bins, [entry[metric][b]["mean"] for b in bins], "-" if lsg else "--", color=colours[name],
                          marker="o" if lsg else "s", linewidth=1.8 if lsg else 1.2, markersize=4, label=name)
        axis.axvline(0.5, color="grey", linewidth=0.8)
        axis.set_xlabel("evidence depth in tokens (query passage start / part B start)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
