"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): match cosine-kernel densities."""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.losses._common import check_batch, flat, paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def _conditional_probs(feat: Tensor, eps: float) -> Tensor:
    """Row-normalised cosine kernel (cos + 1) / 2: p(j | i) over the batch."""
    f = flat(feat)
    f = torch.nan_to_num(f / (f.norm(dim=1, keepdim=True) + eps), nan=0.0)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_loss(student_feat: Tensor, teacher_feat: Tensor, eps: float = 1e-7) -> Tensor:
    """mean_ij p_t log((p_t + eps) / (p_s + eps)); RepDistiller's eps placement and mean over N^2.

    The teacher is detached.
    """
    check_batch(student_feat, teacher_feat, "pkt")
    p_s = _conditional_probs(student_feat, eps)
    p_t = _conditional_probs(teacher_feat.detach(), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


class PKTLoss(DistillLoss):
    """PKT on pooled vectors, summed over tap pairs (RepDistiller weights it by beta=30000)."""

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "pkt")
        losses = [pkt_loss(s, t, self.eps) for s, t in pairs]
        return sum(losses[1:], losses[0])

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


LOSSES.register("pkt", PKTLoss, family="relation",
                paper="Passalis & Tefas 2018, Learning Deep Representations with Probabilistic "
                      "Knowledge Transfer (ECCV)",
                group="distill", inputs="pooled")
