"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match the batch's pairwise similarity pattern."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.losses._common import check_batch, flat, paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def similarity_matrix(feat: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix G = f f^T of the flattened (N, D) features."""
    f = flat(feat)
    return F.normalize(f @ f.t(), dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """||G_s - G_t||_F^2 / N^2; feature widths may differ since only N x N matrices are compared."""
    check_batch(student_feat, teacher_feat, "sp")
    n = student_feat.shape[0]
    diff = similarity_matrix(student_feat) - similarity_matrix(teacher_feat.detach())
    return diff.pow(2).sum() / (n * n)


class SPLoss(DistillLoss):
    """SP summed over the term's layer pairs (RepDistiller weights it by beta=3000)."""

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "sp")
        return sum((sp_loss(s, t) for s, t in pairs[1:]), sp_loss(*pairs[0]))


LOSSES.register("sp", SPLoss, family="relation",
                paper="Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (ICCV)",
                group="distill", inputs="features")
