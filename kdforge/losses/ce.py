"""Cross-entropy task loss, registered like any other term so configs can weight it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import single
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def ce_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy between student logits (N, C) and integer labels (N,)."""
    if logits.dim() != 2:
        raise KdforgeError(f"ce: expects logits of shape (N, C), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise KdforgeError(f"ce: target shape {tuple(target.shape)} does not match logits "
                           f"{tuple(logits.shape)}")
    return F.cross_entropy(logits, target.long(), label_smoothing=label_smoothing)


def soft_ce_loss(logits: Tensor, soft_target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against a label distribution (N, C), as mixup/cutmix produce."""
    if soft_target.shape != logits.shape:
        raise KdforgeError(f"ce: soft target shape {tuple(soft_target.shape)} does not match logits "
                           f"{tuple(logits.shape)}")
    if label_smoothing:
        soft_target = soft_target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    return -(soft_target * F.log_softmax(logits, dim=1)).sum(1).mean()


class CELoss(DistillLoss):
    """Task loss on the student's own logits; the teacher is not run for it."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise KdforgeError(f"ce: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        if student is None:
            student = ctx.student_logits
        if ctx.target is None:
            raise KdforgeError("ce: needs class labels (ctx.target) but the batch has none")
        logits = single(student, "ce", "student")
        if ctx.soft_target is not None:   # mixup / cutmix: cross-entropy against the mixed labels
            return soft_ce_loss(logits, ctx.soft_target, self.label_smoothing)
        return ce_loss(logits, ctx.target, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


LOSSES.register("ce", CELoss, family="task", paper="cross-entropy on ground-truth labels",
                group="task", inputs="logits")
