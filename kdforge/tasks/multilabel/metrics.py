"""Multi-label metrics: per-class average precision and its macro mean (mAP).

AP follows the non-interpolated definition of scikit-learn's `average_precision_score`:
AP = sum_k (R_k - R_{k-1}) * P_k over the distinct score thresholds in decreasing order, so
tied scores enter together (one precision/recall point per threshold). mAP averages the APs
of the classes that have at least one positive; a class without positives has no AP (NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["average_precision", "mean_average_precision", "per_class_average_precision"]


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """AP of one label: `scores` (N,) any real values, `targets` (N,) in {0, 1}; NaN without positives."""
    if scores.dim() != 1 or scores.shape != targets.shape:
        raise KdforgeError(
            f"average_precision: scores {tuple(scores.shape)} and targets {tuple(targets.shape)} "
            "must both be (N,)"
        )
    y = targets.detach().double().cpu()
    if not bool(((y == 0) | (y == 1)).all()):
        raise KdforgeError("average_precision: targets must be 0/1")
    positives = float(y.sum())
    if positives == 0:
        return math.nan
    s = scores.detach().double().cpu()
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    tp = torch.cumsum(y, 0)
    seen = torch.arange(1, len(y) + 1, dtype=torch.float64)
    # the last position of every group of tied scores is one threshold
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    precision = tp / seen
    recall = tp / positives
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def per_class_average_precision(scores: Tensor, targets: Tensor) -> list[float]:
    """AP of every column of (N, C) scores and multi-hot targets."""
    if scores.dim() != 2 or scores.shape != targets.shape:
        raise KdforgeError(
            f"mAP: scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, C)"
        )
    return [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mAP (in [0, 1]) over the classes with at least one positive; NaN if there are none."""
    aps = [a for a in per_class_average_precision(scores, targets) if not math.isnan(a)]
    return sum(aps) / len(aps) if aps else math.nan
