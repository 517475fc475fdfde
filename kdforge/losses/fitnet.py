"""FitNets hint loss: regress the teacher's intermediate feature from the student's."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error between a (connector-projected) student feature and the teacher's.

    The learnable connector (regressor) belongs to the Distiller's term, so the student
    feature must already have the teacher's shape. The teacher is detached.
    """
    if student_feat.shape != teacher_feat.shape:
        raise KdforgeError(f"fitnet: student feature shape {tuple(student_feat.shape)} != teacher feature "
                           f"shape {tuple(teacher_feat.shape)}; add a connector on the term to project "
                           "the student feature to the teacher's shape")
    return F.mse_loss(student_feat, teacher_feat.detach())


class FitNetLoss(DistillLoss):
    """Hint loss summed over the term's tap pairs."""

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "fitnet")
        return sum((fitnet_loss(s, t) for s, t in pairs[1:]), fitnet_loss(*pairs[0]))


LOSSES.register("fitnet", FitNetLoss, family="feature",
                paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR)",
                group="distill", inputs="features")
