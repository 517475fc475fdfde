"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match normalised spatial attention maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import check_batch, paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """(N, C, *spatial) -> (N, prod(spatial)): channel mean of |f|^p, L2-normalised per sample.

    As in RepDistiller this is `f.pow(p)`, i.e. use an even `p` for a sign-free map.
    """
    return F.normalize(feat.pow(p).mean(1).reshape(feat.shape[0], -1), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the two attention maps; channel counts may differ.

    Spatial sizes must match (RepDistiller silently pools the larger map; we ask the user to
    pick matching taps or a connector instead). The teacher is detached.
    """
    check_batch(student_feat, teacher_feat, "at")
    if student_feat.dim() < 3 or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise KdforgeError(f"at: student feature {tuple(student_feat.shape)} and teacher feature "
                           f"{tuple(teacher_feat.shape)} must be (N, C, H, W) maps with the same "
                           "spatial size; pick taps at the same resolution")
    return (attention_map(student_feat, p) - attention_map(teacher_feat.detach(), p)).pow(2).mean()


class ATLoss(DistillLoss):
    """AT summed over the term's layer pairs (RepDistiller/mdistiller weight it by beta=1000)."""

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "at")
        return sum((at_loss(s, t, self.p) for s, t in pairs[1:]), at_loss(*pairs[0], self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


LOSSES.register("at", ATLoss, family="feature",
                paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention (ICLR)",
                group="distill", inputs="features")
