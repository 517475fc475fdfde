"""Clip classification metrics: top-1 accuracy, expected calibration error and the reliability diagram's bins.

ECE (15 equal-width confidence bins, L1: sum over bins of |accuracy - mean confidence| weighted by
the bin's share of clips, as the paper's `_ECELoss`) comes from torchmetrics'
`MulticlassCalibrationError` (the maintained implementation; its bins are [lo, hi) where the
paper's are (lo, hi], which differs only for a confidence exactly on a bin edge).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.extras import require

__all__ = ["calibration_error", "reliability", "top1"]


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise KdforgeError(f"metrics need logits (N, C) and targets (N,), got {tuple(logits.shape)} "
                           f"and {tuple(target.shape)}")


def top1(logits: Tensor, target: Tensor) -> float:
    """Top-1 accuracy in %."""
    _check(logits, target)
    return 100.0 * float((logits.argmax(1) == target).float().mean())


def calibration_error(logits: Tensor, target: Tensor, bins: int = 15) -> float:
    """Expected calibration error (L1, `bins` equal-width confidence bins) of softmax(logits), in %."""
    _check(logits, target)
    tm = require("torchmetrics.classification", "video", "expected calibration error (torchmetrics)")
    metric = tm.MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=bins, norm="l1")
    return 100.0 * float(metric(logits.double().softmax(1).cpu(), target.cpu()))


def reliability(logits: Tensor, target: Tensor, bins: int = 15) -> dict[str, Tensor]:
    """Per confidence bin: the clip count, mean confidence and accuracy (empty bins: 0), for the diagram."""
    _check(logits, target)
    conf, pred = logits.double().softmax(1).max(1)
    correct = (pred == target).double()
    index = (conf * bins).long().clamp(max=bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    mean_conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf) / count.clamp(min=1)
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct) / count.clamp(min=1)
    return {"count": count, "confidence": mean_conf, "accuracy": acc}
