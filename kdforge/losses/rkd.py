"""Relational KD (Park et al., CVPR 2019): match pairwise distances and triplet angles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.losses._common import check_batch, flat, paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def _normalised_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix with a zero diagonal, divided by the mean off-zero distance.

    The distance is sqrt(clamp(|a|^2 + |b|^2 - 2ab, eps)) as in RepDistiller; dividing by the
    count of positive entries (at least 1) and clamping the mean avoid NaN for a batch of one.
    """
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    d = d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))
    mean = d.sum() / (d > 0).sum().clamp(min=1)
    return d / mean.clamp(min=eps)


def _angles(e: Tensor) -> Tensor:
    """cos of the angle at vertex i between e_j - e_i and e_k - e_i, for all (i, j, k), flattened."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(student_feat: Tensor, teacher_feat: Tensor, w_d: float = 25.0, w_a: float = 50.0) -> Tensor:
    """w_d * smoothL1(distance) + w_a * smoothL1(angle) on flattened (N, D) vectors.

    Memory grows as N^2 * D for the angle term. The teacher is detached.
    """
    check_batch(student_feat, teacher_feat, "rkd")
    s = flat(student_feat)
    t = flat(teacher_feat.detach())
    loss = s.new_zeros(())
    if w_d:
        loss = loss + w_d * F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))
    if w_a:
        loss = loss + w_a * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


class RKDLoss(DistillLoss):
    """RKD on pooled penultimate vectors, summed over tap pairs; defaults w_d=25, w_a=50."""

    def __init__(self, w_d: float = 25.0, w_a: float = 50.0) -> None:
        super().__init__()
        self.w_d = float(w_d)
        self.w_a = float(w_a)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "rkd")
        losses = [rkd_loss(s, t, self.w_d, self.w_a) for s, t in pairs]
        return sum(losses[1:], losses[0])

    def extra_repr(self) -> str:
        return f"w_d={self.w_d}, w_a={self.w_a}"


LOSSES.register("rkd", RKDLoss, family="relation",
                paper="Park et al. 2019, Relational Knowledge Distillation (CVPR)",
                group="distill", inputs="pooled")
