"""L2D multi-label distillation (Yang et al., ICCV 2023): one-vs-all logit KD and label-wise embedding KD.

* **MLD** treats every label as its own binary problem: the KL between the teacher's and the
  student's Bernoulli distributions (sigmoid probabilities, clamped to [eps, 1 - eps]), summed
  over labels and divided by the batch size. A softmax over labels would mix labels that are
  present together ("knowledge counteraction").
* **LED** transfers the *structure* of the label-wise embeddings E (N, C, D) with RKD-style
  distance matrices, using only positive (image, class) pairs of the ground truth:
  - CD (class-aware): for each class c with |P_c| > 1 positive images, the distances between
    E[P_c, c]; - ID (instance-aware): for each image n with |Q_n| > 1 positive labels, the
    distances between E[n, Q_n]. Each distance matrix (zero diagonal) is divided by the mean of
    its off-diagonal entries (teacher and student separately), compared with a summed smooth-L1
    (beta 1) and divided by the group size; groups are summed.
  LED = w_cd * CD + w_id * ID (official defaults 100 and 1000). The official code loops over
  classes and images and finds positive rows by testing for all-zero rows; here both are one
  batched computation with explicit index masks, so an exactly-zero embedding cannot break it.

Teacher tensors are detached. Student and teacher embedding widths may differ (only distances
are compared).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import logit_pair, single
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.losses.kd import check_logits
from kdforge.registry import LOSSES

__all__ = [
    "L2DLEDLoss",
    "L2DMLDLoss",
    "l2d_cd_loss",
    "l2d_id_loss",
    "l2d_led_loss",
    "l2d_mld_loss",
    "masked_normalised_distances",
]


def l2d_mld_loss(student_logits: Tensor, teacher_logits: Tensor, eps: float = 1e-8) -> Tensor:
    """sum_{n,c} KL(Bern(sigmoid t) || Bern(sigmoid s)) / N for (N, C) logits; teacher detached.

    Probabilities are computed in float64, where the clamp to [eps, 1 - eps] is representable
    (in float32, 1 - 1e-8 rounds to 1 and a saturated logit would give log(0)).
    """
    check_logits(student_logits, teacher_logits, "l2d_mld")
    p_s = torch.sigmoid(student_logits.double()).clamp(eps, 1 - eps)
    p_t = torch.sigmoid(teacher_logits.detach().double()).clamp(eps, 1 - eps)
    kl = p_t * (p_t.log() - p_s.log()) + (1 - p_t) * ((1 - p_t).log() - (1 - p_s).log())
    return (kl.sum() / student_logits.shape[0]).to(student_logits.dtype)


def masked_normalised_distances(x: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Per group g: pairwise distances of the rows of x[g] (G, M, D) among the rows with mask[g] (G, M).

    Returns (G, M, M): entries outside the group's valid pairs and the diagonal are 0; the
    valid off-diagonal ones are divided by their mean (so the mean is 1). The distance is
    sqrt(clamp(|a|^2 + |b|^2 - 2ab, eps)) as in the official code (finite gradients).
    """
    sq = x.pow(2).sum(-1)
    d = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * x @ x.transpose(-1, -2)).clamp(min=eps).sqrt()
    m = mask.to(d.dtype)
    pair = m.unsqueeze(-1) * m.unsqueeze(-2) * (1 - torch.eye(x.shape[-2], dtype=d.dtype, device=d.device))
    d = d * pair
    mean = d.sum((-1, -2)) / pair.sum((-1, -2)).clamp(min=1)
    return d / mean.clamp(min=eps)[:, None, None]


def _group_loss(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """sum over groups with > 1 member of smoothL1_sum(psi(s), psi(t)) / group size; groups on dim 0."""
    size = mask.sum(-1)
    keep = size > 1
    if not bool(keep.any()):
        return s.new_zeros(())
    s, t, mask, size = s[keep], t[keep], mask[keep], size[keep]
    d_s = masked_normalised_distances(s.float(), mask)
    with torch.no_grad():
        d_t = masked_normalised_distances(t.float(), mask)
    per_group = F.smooth_l1_loss(d_s, d_t, reduction="none", beta=1.0).sum((-1, -2))
    return (per_group / size.to(per_group.dtype)).sum()


def _check_led(student: Tensor, teacher: Tensor, targets: Tensor) -> Tensor:
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise KdforgeError(
            f"l2d_led: label-wise embeddings must be (N, C, D) with the same N and C, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if targets is None or tuple(targets.shape) != tuple(student.shape[:2]):
        got = None if targets is None else tuple(targets.shape)
        raise KdforgeError(
            f"l2d_led: needs the multi-hot targets (N, C) = {tuple(student.shape[:2])}, got {got}"
        )
    return targets.detach() > 0.5


def l2d_cd_loss(student_embed: Tensor, teacher_embed: Tensor, targets: Tensor) -> Tensor:
    """Class-aware part: for each class, the structure of its embeddings over its positive images."""
    pos = _check_led(student_embed, teacher_embed, targets)
    return _group_loss(student_embed.transpose(0, 1), teacher_embed.detach().transpose(0, 1), pos.t())


def l2d_id_loss(student_embed: Tensor, teacher_embed: Tensor, targets: Tensor) -> Tensor:
    """Instance-aware part: for each image, the structure of the embeddings of its positive labels."""
    pos = _check_led(student_embed, teacher_embed, targets)
    return _group_loss(student_embed, teacher_embed.detach(), pos)


def l2d_led_loss(
    student_embed: Tensor, teacher_embed: Tensor, targets: Tensor, w_cd: float = 100.0, w_id: float = 1000.0
) -> Tensor:
    """LED = w_cd * CD + w_id * ID on (N, C, D) label-wise embeddings and (N, C) multi-hot targets."""
    loss = student_embed.new_zeros(())
    if w_cd:
        loss = loss + w_cd * l2d_cd_loss(student_embed, teacher_embed, targets)
    if w_id:
        loss = loss + w_id * l2d_id_loss(student_embed, teacher_embed, targets)
    return loss


class L2DMLDLoss(DistillLoss):
    """Module form of `l2d_mld_loss`; reads student and teacher logits (N, C)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0 < eps < 0.5:
            raise KdforgeError(f"l2d_mld: eps must be in (0, 0.5), got {eps}")
        self.eps = float(eps)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        s, t = logit_pair(student, teacher, ctx, "l2d_mld")
        return l2d_mld_loss(s, t, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class L2DLEDLoss(DistillLoss):
    """Module form of `l2d_led_loss`: label-wise embeddings (tap `label_embed`) and ctx.target (N, C)."""

    def __init__(self, w_cd: float = 100.0, w_id: float = 1000.0) -> None:
        super().__init__()
        if w_cd < 0 or w_id < 0:
            raise KdforgeError(f"l2d_led: w_cd and w_id must be >= 0, got {w_cd}, {w_id}")
        self.w_cd, self.w_id = float(w_cd), float(w_id)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        s = single(student, "l2d_led", "student")
        t = single(teacher, "l2d_led", "teacher")
        return l2d_led_loss(s, t, ctx.target, self.w_cd, self.w_id)

    def extra_repr(self) -> str:
        return f"w_cd={self.w_cd}, w_id={self.w_id}"


LOSSES.register(
    "l2d_mld",
    L2DMLDLoss,
    family="logit",
    paper="Yang et al. 2023, Multi-Label Knowledge Distillation (ICCV)",
    group="distill",
    inputs="logits (multi-label)",
)
LOSSES.register(
    "l2d_led",
    L2DLEDLoss,
    family="relation",
    paper="Yang et al. 2023, Multi-Label Knowledge Distillation (ICCV)",
    group="distill",
    inputs="label-wise embeddings (N, C, D) + multi-hot targets",
)
