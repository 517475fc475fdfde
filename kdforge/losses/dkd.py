"""Decoupled KD (Zhao et al., CVPR 2022): split KD into target-class and non-target-class parts.

mdistiller ramps the DKD term linearly over its first 20 epochs (``warmup=20``); here that
ramp is the Distiller's generic term schedule, so this module holds no epoch counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import logit_pair
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.losses.kd import check_logits
from kdforge.registry import LOSSES

# Subtracted from the target logit (after /T) to drop it from the non-target softmax,
# exactly as mdistiller does (a finite mask keeps the KL free of 0 * inf).
_MASK = 1000.0


def _binary_log_probs(z: Tensor, gt_mask: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] of softmax(z), computed in log space so neither underflows."""
    lse_all = torch.logsumexp(z, dim=1, keepdim=True)
    log_p_gt = (z * gt_mask).sum(1, keepdim=True) - lse_all
    log_p_other = torch.logsumexp(z.masked_fill(gt_mask.bool(), float("-inf")), dim=1,
                                  keepdim=True) - lse_all
    return torch.cat([log_p_gt, log_p_other], dim=1)


def _kl(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    """KL(p_t || p_s) summed over the last dim, mean over the batch."""
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean()


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each already multiplied by T^2 and averaged over the batch."""
    check_logits(student_logits, teacher_logits, "dkd")
    n, c = student_logits.shape
    if c < 2:
        raise KdforgeError(f"dkd: needs at least 2 classes, got logits {tuple(student_logits.shape)}")
    if target.shape != (n,):
        raise KdforgeError(f"dkd: target shape {tuple(target.shape)} does not match logits "
                           f"{tuple(student_logits.shape)}")
    z_s = student_logits / temperature
    z_t = teacher_logits.detach() / temperature
    gt_mask = torch.zeros_like(z_s).scatter_(1, target.long().reshape(-1, 1), 1.0)
    tckd = _kl(_binary_log_probs(z_s, gt_mask), _binary_log_probs(z_t, gt_mask))
    nckd = _kl(F.log_softmax(z_s - _MASK * gt_mask, dim=1), F.log_softmax(z_t - _MASK * gt_mask, dim=1))
    scale = temperature**2
    return tckd * scale, nckd * scale


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """alpha * TCKD + beta * NCKD as in mdistiller's `dkd_loss`; the teacher is detached."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


class DKDLoss(DistillLoss):
    """Module form of `dkd_loss`; reads logits and `ctx.target`.

    mdistiller's CIFAR-100 recipe: alpha=1, beta=8 (beta depends on the teacher), T=4,
    warm-up 20 epochs (configure it on the term's schedule).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdforgeError(f"dkd: temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        if ctx.target is None:
            raise KdforgeError("dkd: needs class labels (ctx.target) but the batch has none")
        s, t = logit_pair(student, teacher, ctx, "dkd")
        return dkd_loss(s, t, ctx.target, self.alpha, self.beta, self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


LOSSES.register("dkd", DKDLoss, family="logit",
                paper="Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)",
                group="distill", inputs="logits")
