"""Per-item scores grouped into buckets (a distance range), paired differences with bootstrap intervals, markdown
tables and a line plot: shared by the split-binding and late-chunking benchmarks, whose items are binned by the
distance between two pieces of text rather than by passage depth (report.py does that one)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .metrics import paired_bootstrap_ci

ALL = "all"
Scores = dict[str, dict[str, np.ndarray]]  # method -> metric -> one value per item


def bucket_masks(labels: np.ndarray, order: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks of the items in each bucket, in `order`, then all items."""
    return {**{name: labels == name for name in order}, ALL: np.ones(len(labels), dtype=bool)}


def summarize(scores: Scores, labels: np.ndarray, order: list[str]) -> dict[str, dict[str, dict]]:
    """method -> metric -> bucket -> {"n", "mean"}."""
    masks = bucket_masks(labels, order)
    return {method: {metric: {name: {"n": int(mask.sum()),
                                     "mean": float(values[mask].mean()) if mask.any() else float("nan")}
                              for name, mask in masks.items()}
                     for metric, values in metrics.items()}
            for method, metrics in scores.items()}


def paired_differences(scores: Scores, labels: np.ndarray, order: list[str],
                       pairs: list[tuple[str, str]]) -> list[dict]:
    """a - b per metric and bucket, with its 95% paired bootstrap interval (the items are the pairs)."""
    rows = []
    for name, mask in bucket_masks(labels, order).items():
        for a, b in pairs:
            for metric in scores[a]:
                mean, low, high = paired_bootstrap_ci(scores[a][metric][mask], scores[b][metric][mask])
                rows.append({"a": a, "b": b, "metric": metric, "bucket": name, "n": int(mask.sum()),
                             "difference": mean, "low": low, "high": high})
    return rows


def summary_table(summary: dict, metric: str, order: list[str]) -> str:
    """Markdown: one row per method, one column per bucket (with its item count)."""
    first = next(iter(summary.values()))[metric]
    buckets = order + [ALL]
    lines = ["| method | " + " | ".join(f"{b} (n={first[b]['n']})" for b in buckets) + " |",
             "|---" * (len(buckets) + 1) + "|"]
    lines += [f"| {method} | " + " | ".join(f"{entry[metric][b]['mean']:.3f}" for b in buckets) + " |"
              for method, entry in summary.items()]
    return "\n".join(lines)


def difference_table(rows: list[dict], metric: str, order: list[str]) -> str:
    """Markdown: a - b with its 95% interval per bucket; * marks an interval above zero."""
    buckets = order + [ALL]
    lines = ["| a - b | " + " | ".join(buckets) + " |", "|---" * (len(buckets) + 1) + "|"]
    for a, b in dict.fromkeys((r["a"], r["b"]) for r in rows if r["metric"] == metric):
        cells = []
        for name in buckets:
            r = next(r for r in rows if (r["a"], r["b"], r["metric"], r["bucket"]) == (a, b, metric, name))
            cells.append("n/a" if r["n"] == 0 else
                         f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]{'*' if r['low'] > 0 else ''}")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def line_plot(summary: dict, metrics: list[tuple[str, str]], order: list[str], xlabel: str, path: Path,
              title: str) -> None:
    """Quality by bucket, one line per method, one panel per (metric, axis label); LSG methods drawn solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(summary)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5.5), squeeze=False)
    for axis, (metric, ylabel) in zip(axes[0], metrics):
        for name, entry in summary.items():
            lsg = "lsg" in name
            axis.plot(order, [entry[metric][b]["mean"] for b in order], "-" if lsg else "--", color=colours[name],
                      marker="o" if lsg else "s", linewidth=1.8 if lsg else 1.2, markersize=4, label=name)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, report: dict, metrics: list[tuple[str, str]], order: list[str], xlabel: str, title: str) -> str:
    """results.json (the whole report), results.md (header, tables, differences) and quality_by_distance.png;
    returns the markdown. report holds "header", "summary" and "differences"."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    text = [report["header"], ""]
    for metric, label in metrics:
        text += [f"### {label} by {xlabel}", "", summary_table(report["summary"], metric, order), ""]
    for metric, label in metrics:
        text += [f"### Paired differences, {label} (95% bootstrap interval; * = above 0)", "",
                 difference_table(report["differences"], metric, order), ""]
    markdown = "\n".join(text)
    (out / "results.md").write_text(markdown)
    line_plot(report["summary"], metrics, order, xlabel, out / "quality_by_distance.png", title)
    return markdown
