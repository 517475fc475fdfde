"""Hinton KD: match temperature-softened class distributions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import logit_pair
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES


def check_logits(s: Tensor, t: Tensor, name: str) -> None:
    """Logit losses need identical (N, C) shapes: same batch, same label space."""
    if s.dim() != 2 or s.shape != t.shape:
        raise KdforgeError(f"{name}: student logits {tuple(s.shape)} and teacher logits "
                           f"{tuple(t.shape)} must both be (N, C) with the same shape")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, batch mean, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    The teacher is detached.
    """
    check_logits(student_logits, teacher_logits, "kd")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean()
    return kl * temperature**2


class KDLoss(DistillLoss):
    """Module form of `kd_loss`; reads student and teacher logits."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdforgeError(f"kd: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        s, t = logit_pair(student, teacher, ctx, "kd")
        return kd_loss(s, t, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


LOSSES.register("kd", KDLoss, family="logit",
                paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network",
                group="distill", inputs="logits")
