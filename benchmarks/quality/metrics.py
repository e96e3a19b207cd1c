"""Retrieval and classification scores per query or per document, and paired bootstrap intervals: every
comparison in the results is between two methods on the same queries, so the intervals are on differences."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BOOTSTRAP_SAMPLES = 2000


def ranks(scores: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """1-based rank of each query's target among all documents (scores: queries x documents).

    Ties count against the target (a method that scores everything equal gets the worst rank)."""
    target_scores = scores[torch.arange(len(targets)), torch.as_tensor(targets)]
    return (scores >= target_scores.unsqueeze(1)).sum(1)


def recall_at_1(rank: torch.Tensor) -> np.ndarray:
    """Per-query 1.0 where the target ranks first."""
    return (rank == 1).double().numpy()


def reciprocal_rank(rank: torch.Tensor) -> np.ndarray:
    """Per-query 1/rank; its mean is the MRR."""
    return (1.0 / rank.double()).numpy()


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, *, level: float = 0.95, seed: int = 0,
                        samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float, float]:
    """Mean of a - b and its percentile bootstrap interval, resampling the paired items (queries)."""
    difference = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if difference.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, difference.size, size=(samples, difference.size))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(difference.mean()), float(low), float(high)


def ridge_fit_predict(train: np.ndarray, targets: np.ndarray, test: np.ndarray, strength: float = 0.1) -> np.ndarray:
    """Ridge regression in its dual form (few documents, many dimensions), on centred features; the penalty is
    `strength` times the mean squared norm of the centred training rows, so it does not depend on the scale."""
    mean = train.mean(0)
    centred = train - mean
    gram = centred @ centred.T
    penalty = strength * np.trace(gram) / len(train)
    alpha = np.linalg.solve(gram + penalty * np.eye(len(train)), targets - targets.mean(0))
    return (test - mean) @ (centred.T @ alpha) + targets.mean(0)


def multilabel_probe_correct(features: np.ndarray, labels: np.ndarray, *, folds: int = 5,
                             seed: int = 0) -> np.ndarray:
    """Per-document 1.0 where a cross-validated linear probe predicts the whole label set right.

    labels: documents x categories (0/1). A frozen encoder needs a probe to classify: one ridge classifier
    per category on the embeddings, each document predicted by the probe of the fold it was held out of, so
    the probe never scores a document it was fitted on."""
    order = np.random.default_rng(seed).permutation(len(features))
    predicted = np.zeros_like(labels)
    for test in np.array_split(order, min(folds, len(features))):
        train = np.setdiff1d(order, test)
        scores = ridge_fit_predict(features[train], 2 * labels[train] - 1, features[test])
        predicted[test] = scores > 0
    return (predicted == labels).all(1).astype(float)
