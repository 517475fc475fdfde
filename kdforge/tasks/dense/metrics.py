"""Dense-prediction metrics, each over a whole split (pixels pooled across images).

* `miou`: mean intersection over union of the classes (%, torchmetrics' multiclass Jaccard index,
  macro average, unlabelled pixels (255) ignored);
* `depth_errors`: RMSE (torchmetrics' mean squared error, root) and absolute relative error
  mean |d - d*| / d* (torchmetrics' mean absolute percentage error, as a fraction) over pixels
  with a measurement (d* > 0);
* `normal_angle_error`: mean angle in degrees between predicted (normalised) and true normals over
  pixels with a true normal (torchmetrics has no such metric);
* `boundary_f`: F-score of thresholded boundary probabilities with a pixel `tolerance` (a predicted
  pixel is correct within `tolerance` px (Chebyshev) of a true one, and vice versa for recall);
  tolerance 0 is torchmetrics' binary F1. `ods_f`: the best F over fixed thresholds for the whole
  split (optimal dataset scale), in %;
* `mtl_score`: the multi-task score, the mean relative change in % of each task's primary metric
  against its single-task baseline, signed so that better is positive (Maninis et al. 2019).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.extras import require

__all__ = ["PRIMARY", "boundary_f", "depth_errors", "miou", "mtl_score", "normal_angle_error", "ods_f",
           "require_torchmetrics"]

IGNORE = 255
# task -> (its primary metric, higher is better)
PRIMARY = {"semseg": ("semseg_miou", True), "depth": ("depth_rmse", False), "normals": ("normals_mean_angle", False),
           "boundary": ("boundary_odsf", True)}
ODS_THRESHOLDS = tuple(i / 10 for i in range(1, 10))


def require_torchmetrics():
    return require("torchmetrics.functional", "dense", "dense-prediction metrics need torchmetrics")


def miou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean IoU (%) of predicted labels `pred` against `target` (same shape; 255 = ignored).

    Classes that appear in neither the predictions nor the targets are left out of the mean."""
    tmf = require_torchmetrics()
    if pred.shape != target.shape:
        raise KdforgeError(f"miou: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    keep = target != IGNORE
    p, t = pred[keep].long(), target[keep].long()
    per_class = tmf.classification.multiclass_jaccard_index(p, t, num_classes=num_classes, average="none")
    present = torch.bincount(p, minlength=num_classes)[:num_classes] + torch.bincount(t, minlength=num_classes)
    present = present[:num_classes] > 0
    return 100.0 * float(per_class[present].mean()) if present.any() else 0.0


def depth_errors(pred: Tensor, target: Tensor) -> dict[str, float]:
    """{'rmse', 'absrel'} over pixels with a measurement (target > 0)."""
    tmf = require_torchmetrics()
    pred, target = pred.reshape(target.shape).float(), target.float()
    valid = target > 0
    if not valid.any():
        raise KdforgeError("depth_errors: no pixel has a depth measurement (all targets are 0)")
    p, t = pred[valid], target[valid]
    return {"rmse": float(tmf.mean_squared_error(p, t, squared=False)),
            "absrel": float(tmf.mean_absolute_percentage_error(p, t))}


def normal_angle_error(pred: Tensor, target: Tensor) -> float:
    """Mean angle (degrees) between pred (N, 3, H, W), normalised, and unit targets; zero targets skipped."""
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
        raise KdforgeError(f"normal_angle_error: need (N, 3, H, W) predictions and targets, got {tuple(pred.shape)} "
                           f"and {tuple(target.shape)}")
    valid = target.norm(dim=1) > 0.5
    cos = F.cosine_similarity(pred.float(), target.float(), dim=1, eps=1e-8).clamp(-1.0, 1.0)
    if not valid.any():
        raise KdforgeError("normal_angle_error: no pixel has a true normal")
    return float(torch.rad2deg(torch.acos(cos[valid])).mean())


def _dilate(mask: Tensor, tolerance: int) -> Tensor:
    if tolerance <= 0:
        return mask
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return (F.max_pool2d(m, 2 * tolerance + 1, stride=1, padding=tolerance) > 0).reshape(mask.shape)


def _f_counts(pred: Tensor, target: Tensor, tolerance: int) -> tuple[float, float, float, float]:
    """(matched predicted, predicted, matched true, true) pixel counts."""
    return (float((pred & _dilate(target, tolerance)).sum()), float(pred.sum()),
            float((target & _dilate(pred, tolerance)).sum()), float(target.sum()))


def _f_from(counts: tuple[float, float, float, float]) -> float:
    tp_p, n_p, tp_r, n_t = counts
    precision = tp_p / n_p if n_p else 0.0
    recall = tp_r / n_t if n_t else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def boundary_f(prob: Tensor, target: Tensor, threshold: float = 0.5, tolerance: int = 1) -> float:
    """F-score in [0, 1] of `prob >= threshold` against boundary `target` ((N,) H, W), with a pixel tolerance."""
    if prob.shape != target.shape:
        raise KdforgeError(f"boundary_f: probabilities {tuple(prob.shape)} and targets {tuple(target.shape)} differ")
    return _f_from(_f_counts(prob >= threshold, target.bool(), tolerance))


def ods_f(prob: Tensor, target: Tensor, tolerance: int = 1, thresholds: tuple[float, ...] = ODS_THRESHOLDS) -> float:
    """Optimal-dataset-scale F (%): the best split-wide F over `thresholds`."""
    return 100.0 * max(boundary_f(prob, target, t, tolerance) for t in thresholds)


def mtl_score(metrics: Mapping[str, float], baselines: Mapping[str, float],
              higher_is_better: Mapping[str, bool] | None = None) -> float:
    """Mean over the baselines' keys of +-(M - B) / B in %, + when higher is better (default: PRIMARY's signs)."""
    if not baselines:
        raise KdforgeError("mtl_score: no single-task baseline given")
    signs = higher_is_better or {name: up for name, up in PRIMARY.values()}
    total = 0.0
    for key, base in baselines.items():
        if key not in metrics or key not in signs:
            raise KdforgeError(f"mtl_score: metric '{key}' is missing from the model's metrics or has no direction")
        if base == 0:
            raise KdforgeError(f"mtl_score: the single-task baseline of '{key}' is 0; no relative change exists")
        change = (metrics[key] - base) / abs(base)
        total += change if signs[key] else -change
    return 100.0 * total / len(baselines)


# Image harmonization (iHarmony4 practice: per-image scores on 0..255 images, then the mean over images).


def _harmony_inputs(name: str, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape or pred.dim() != 4:
        raise KdforgeError(f"{name}: need (N, C, H, W) predictions and targets of one shape, got "
                           f"{tuple(pred.shape)} and {tuple(target.shape)}")
    return pred.double(), target.double()


def harmony_mse(pred: Tensor, target: Tensor) -> float:
    """MSE on 0..255 images: the mean squared error of each image (over C, H, W), averaged over images."""
    p, t = _harmony_inputs("harmony_mse", pred, target)
    return float(((p - t) ** 2).mean(dim=(1, 2, 3)).mean())


def harmony_psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR (dB) on 0..255 images: 10 log10(255^2 / MSE) of each image, averaged over images (inf if one
    image is exact). torchmetrics' PSNR with dim=(1, 2, 3); without dim it would pool the whole batch."""
    tmf = require_torchmetrics()
    p, t = _harmony_inputs("harmony_psnr", pred, target)
    return float(tmf.image.peak_signal_noise_ratio(p, t, data_range=255.0, reduction="elementwise_mean", dim=(1, 2, 3)))


def harmony_fmse(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """Foreground MSE: per image, the squared error summed over the mask's pixels (channel mean per pixel)
    divided by the mask's pixel count; averaged over images (DoveNet / iSSAM's fMSE)."""
    p, t = _harmony_inputs("harmony_fmse", pred, target)
    m = mask.reshape(p.shape[0], 1, *p.shape[2:]) if mask.numel() == p.shape[0] * p.shape[2] * p.shape[3] else None
    if m is None or not bool(((m == 0) | (m == 1)).all()):
        raise KdforgeError(f"harmony_fmse: need a 0/1 mask of {p.shape[0]} x {p.shape[2]} x {p.shape[3]} pixels, "
                           f"got shape {tuple(mask.shape)}" + ("" if m is None else " with other values"))
    m = m.double()
    area = m.sum(dim=(1, 2, 3))
    if bool((area == 0).any()):
        raise KdforgeError(f"harmony_fmse: image {int((area == 0).nonzero()[0])} has an empty foreground mask")
    per_image = (((p - t) ** 2).mean(dim=1, keepdim=True) * m).sum(dim=(1, 2, 3)) / area
    return float(per_image.mean())


def harmony_metrics(pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, float]:
    """{'mse', 'fmse', 'psnr'} of harmonized images against the real ones (see the functions above)."""
    return {"mse": harmony_mse(pred, target), "fmse": harmony_fmse(pred, target, mask),
            "psnr": harmony_psnr(pred, target)}


__all__ += ["harmony_fmse", "harmony_metrics", "harmony_mse", "harmony_psnr"]
