"""Anomaly maps and AUROC: per-position cosine distance between teacher and student features, summed
over scales at image resolution and Gaussian-smoothed (sigma 4, as RD and MemKD score); the image
score is the map's maximum. AUROC comes from scikit-learn (the maintained implementation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.extras import require

__all__ = ["anomaly_map", "auroc", "cosine_distance", "gaussian_blur", "require_sklearn", "region_errors"]


def require_sklearn() -> Any:
    return require("sklearn.metrics", "small-data", "anomaly AUROC needs scikit-learn").roc_auc_score


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """(B, H, W) map of 1 - cos between the channel vectors of two (B, C, H, W) feature maps."""
    if student.shape != teacher.shape:
        raise KdforgeError(f"student features {tuple(student.shape)} do not match the teacher's {tuple(teacher.shape)}")
    return 1 - F.cosine_similarity(student, teacher, dim=1)


def anomaly_map(students: Sequence[Tensor], teachers: Sequence[Tensor], size: int | tuple[int, int]) -> Tensor:
    """(B, H, W): the sum over scales of each scale's cosine distance, bilinearly upsampled to `size`."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    total = None
    for s, t in zip(students, teachers, strict=True):
        d = F.interpolate(cosine_distance(s, t).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    if total is None:
        raise KdforgeError("anomaly_map needs at least one scale")
    return total.squeeze(1)


def gaussian_blur(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """(B, H, W) maps smoothed by a Gaussian of `sigma` px, truncated at 4 sigma, mirror-padded at the borders
    (scipy.ndimage.gaussian_filter's mode='mirror'); sigma 0 returns the maps unchanged."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = maps.unsqueeze(1)
    for dim in (2, 3):
        n = out.shape[dim]
        pad = min(radius, n - 1)
        if pad < radius:     # a map smaller than the kernel: pad mirrors as far as it can, then repeats the edge
            out = F.pad(out, (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad), mode="reflect")
            out = F.pad(out, (radius - pad,) * 2 + (0, 0) if dim == 3 else (0, 0) + (radius - pad,) * 2,
                        mode="replicate")
        else:
            out = F.pad(out, (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius), mode="reflect")
        weight = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
        out = F.conv2d(out, weight)
    return out.squeeze(1)


def auroc(labels: Tensor, scores: Tensor) -> float:
    """Area under the ROC curve in % (scikit-learn), NaN when `labels` hold a single class."""
    roc_auc_score = require_sklearn()
    y = labels.reshape(-1).cpu().numpy()
    if y.min() == y.max():
        return math.nan
    return 100.0 * float(roc_auc_score(y, scores.reshape(-1).double().cpu().numpy()))


def region_errors(raw_maps: Tensor, masks: Tensor) -> dict[str, float]:
    """Mean raw (unsmoothed) map inside defects and on defect-free pixels: the card's check that the
    student stops reproducing anomalies (inside up) while staying faithful on normal regions (outside down)."""
    inside = masks.bool()
    out = {"defect_error": float(raw_maps[inside].mean()) if inside.any() else math.nan,
           "normal_error": float(raw_maps[~inside].mean())}
    out["error_ratio"] = out["defect_error"] / max(out["normal_error"], 1e-12)
    return out
