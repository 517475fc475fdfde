"""BCKD losses (Yang et al., ICCV 2023): distillation in the dense detector's own binary protocol.

Dense detectors classify with C independent sigmoids; softmax KD only matches relative scores.
BCKD distils every (location, class) as a binary problem against the teacher's sigmoid, weighted
by the absolute gap, and distils localization as GIoU between decoded boxes at every location,
weighted by the largest class-score gap there (official `NovelKDLoss` / `ld_head.loss_single`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["bckd_cls_loss", "bckd_loc_loss", "bckd_location_weights"]


def _pair(s: Tensor, t: Tensor, name: str) -> None:
    if s.shape != t.shape or s.dim() != 2:
        raise KdforgeError(f"{name}: student and teacher must be (N, C) with the same shape, got "
                           f"{tuple(s.shape)} and {tuple(t.shape)}")


def bckd_cls_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0,
                  avg_factor: float = 1.0) -> Tensor:
    """sum_{n,c} BCE(s, sigmoid(t)) * |sigmoid(t) - sigmoid(s)|^beta / avg_factor (N, C logits)."""
    _pair(student_logits, teacher_logits, "bckd_cls_loss")
    p_t = torch.sigmoid(teacher_logits.detach().float())
    s = student_logits.float()
    gap = (p_t - torch.sigmoid(s)).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(s, p_t, reduction="none") * gap).sum() / max(avg_factor, 1e-12)


def bckd_location_weights(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """omega_n = max_c |sigmoid(t) - sigmoid(s)| (no gradient): where the localization KD acts."""
    _pair(student_logits, teacher_logits, "bckd_location_weights")
    with torch.no_grad():
        return (torch.sigmoid(teacher_logits.float()) - torch.sigmoid(student_logits.float())).abs().amax(dim=1)


def _giou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise GIoU of xyxy boxes (N, 4)."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    union = (area_a + area_b - inter).clamp_min(1e-9)
    elt, erb = torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])
    enclose = (erb - elt).clamp_min(0).prod(1).clamp_min(1e-9)
    return inter / union - (enclose - union) / enclose


def bckd_loc_loss(student_boxes: Tensor, teacher_boxes: Tensor, weights: Tensor, avg_factor: float = 1.0) -> Tensor:
    """sum_n omega_n (1 - GIoU(b_s, b_t)) / avg_factor over decoded xyxy boxes at every location."""
    if student_boxes.shape != teacher_boxes.shape or student_boxes.dim() != 2 or student_boxes.shape[1] != 4:
        raise KdforgeError(f"bckd_loc_loss: boxes must both be (N, 4), got {tuple(student_boxes.shape)} and "
                           f"{tuple(teacher_boxes.shape)}")
    if weights.shape != (student_boxes.shape[0],):
        raise KdforgeError(f"bckd_loc_loss: weights must be ({student_boxes.shape[0]},), got {tuple(weights.shape)}")
    loss = 1 - _giou(student_boxes.float(), teacher_boxes.detach().float())
    return (weights.detach().float() * loss).sum() / max(avg_factor, 1e-12)
