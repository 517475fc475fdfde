"""Cauchy-Schwarz (CS) divergence between distributions, and a registered `cs` distillation loss.

D_CS(p, q) = -log <p, q> + 1/2 log <p, p> + 1/2 log <q, q> = -log cos(p, q) for p, q >= 0. It is
symmetric, 0 iff p is proportional to q, and (a cosine of probability vectors) far less driven by
tiny probabilities than KL, which is why MTL-CSKD (ICCV 2023) prefers it for dense outputs.

Distributions are formed from logits along an axis (`dense_distribution`):

* `channel`: softmax over dim 1 (classes of a segmentation map, or (N, C) classifier logits);
* `binary`: a 1-channel logit z becomes the two-way distribution softmax([0, z]) (boundaries);
* `spatial`: per (sample, channel), softmax over the H * W positions (regression maps: depth,
  normals; channel-wise distillation's normalisation).

`cs_intra` compares teacher and student distributions of one output along its axis; `cs_inter`
concatenates several outputs' distributions along the channel axis at every position (each
spatial block rescaled by H * W / C so that every task's block sums to 1 on average, as the
channel blocks do) and compares the concatenated vectors, i.e. the match across tasks. A student
map of another size than the teacher's is resized (bilinear, logits) before the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES

__all__ = ["AXES", "CSLoss", "cs_divergence", "cs_inter", "cs_intra", "dense_distribution", "match_size"]

AXES = ("channel", "binary", "spatial")


def cs_divergence(p: Tensor, q: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """-log(<p,q> + eps) + 0.5 log(<p,p> + eps) + 0.5 log(<q,q> + eps) along `dim` (kept: the others), in fp32."""
    p, q = p.float(), q.float()
    return (-torch.log((p * q).sum(dim) + eps) + 0.5 * torch.log((p * p).sum(dim) + eps)
            + 0.5 * torch.log((q * q).sum(dim) + eps))


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise KdforgeError(f"cs: unknown axis '{axis}'; known: {', '.join(AXES)}")


def dense_distribution(logits: Tensor, axis: str, temperature: float = 1.0) -> Tensor:
    """Softmax of `logits / temperature` along `axis` (see the module doc); same shape except `binary` (2 channels)."""
    _check_axis(axis)
    z = logits.float() / temperature
    if axis == "channel":
        if z.dim() < 2 or z.shape[1] < 2:
            raise KdforgeError(f"cs: axis 'channel' needs >= 2 channels on dim 1, got shape {tuple(z.shape)}; "
                               "use 'binary' for a 1-channel logit")
        return F.softmax(z, dim=1)
    if axis == "binary":
        if z.dim() < 2 or z.shape[1] != 1:
            raise KdforgeError(f"cs: axis 'binary' needs one logit channel on dim 1, got shape {tuple(z.shape)}")
        return F.softmax(torch.cat([torch.zeros_like(z), z], 1), dim=1)
    if z.dim() < 3:
        raise KdforgeError(f"cs: axis 'spatial' needs (N, C, H, W) maps, got shape {tuple(z.shape)}")
    return F.softmax(z.flatten(2), dim=2).reshape(z.shape)


def match_size(student: Tensor, teacher: Tensor) -> Tensor:
    """The student's map resized (bilinear) to the teacher's spatial size when they differ."""
    if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return student


def cs_intra(student: Tensor, teacher: Tensor, axis: str = "channel", temperature: float = 1.0,
             eps: float = 1e-8) -> Tensor:
    """Mean D_CS between teacher and student distributions of one output along `axis` (teacher detached)."""
    student = match_size(student, teacher)
    if student.shape != teacher.shape:
        raise KdforgeError(f"cs: student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
                           "must have the same shape (after resizing)")
    p = dense_distribution(teacher.detach(), axis, temperature)
    q = dense_distribution(student, axis, temperature)
    if axis == "spatial":
        return cs_divergence(p.flatten(2), q.flatten(2), dim=2, eps=eps).mean()
    return cs_divergence(p, q, dim=1, eps=eps).mean()


def _task_block(logits: Tensor, axis: str, temperature: float) -> Tensor:
    p = dense_distribution(logits, axis, temperature)
    if axis == "spatial":
        p = p * (p.shape[-1] * p.shape[-2] / p.shape[1])
    return p


def cs_inter(students: Sequence[Tensor], teachers: Sequence[Tensor], axes: Sequence[str],
             temperature: float = 1.0, eps: float = 1e-8) -> Tensor:
    """Mean over positions of D_CS between the concatenated per-task distributions (teacher vs student)."""
    if not len(students) == len(teachers) == len(axes) or not students:
        raise KdforgeError(f"cs inter-task match: need as many student outputs, teacher outputs and axes, got "
                           f"{len(students)}, {len(teachers)}, {len(axes)}")
    size = teachers[0].shape[-2:]
    if any(t.dim() != 4 or t.shape[-2:] != size for t in teachers):
        raise KdforgeError("cs inter-task match: every output must be an (N, C, H, W) map of one size, got "
                           + ", ".join(str(tuple(t.shape)) for t in teachers))
    p = torch.cat([_task_block(t.detach(), a, temperature) for t, a in zip(teachers, axes)], 1)
    q = torch.cat([_task_block(match_size(s, t), a, temperature) for s, t, a in zip(students, teachers, axes)], 1)
    return cs_divergence(p, q, dim=1, eps=eps).mean()


class CSLoss(DistillLoss):
    """Registered `cs`: D_CS of softened distributions, per tap (`match: intra`, averaged over the taps) or
    across the taps (`match: inter`, their distributions concatenated per position), times T^2 when `t2`.

    `axis`: one of AXES, or a list with one axis per tap."""

    def __init__(self, temperature: float = 1.0, axis: str | list[str] = "channel", match: str = "intra",
                 t2: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdforgeError(f"cs: temperature must be > 0, got {temperature}")
        if match not in ("intra", "inter"):
            raise KdforgeError(f"cs: match must be 'intra' or 'inter', got {match!r}")
        for a in [axis] if isinstance(axis, str) else axis:
            _check_axis(a)
        self.temperature, self.axis, self.match, self.t2, self.eps = float(temperature), axis, match, t2, eps

    def axes(self, count: int) -> list[str]:
        if isinstance(self.axis, str):
            return [self.axis] * count
        if len(self.axis) != count:
            raise KdforgeError(f"cs: {len(self.axis)} axes given for {count} taps; give one axis per tap")
        return list(self.axis)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "cs")
        axes = self.axes(len(pairs))
        T = self.temperature
        if self.match == "inter":
            value = cs_inter([s for s, _ in pairs], [t for _, t in pairs], axes, T, self.eps)
        else:
            value = torch.stack([cs_intra(s, t, a, T, self.eps) for (s, t), a in zip(pairs, axes)]).mean()
        return value * (T * T if self.t2 else 1.0)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, axis={self.axis!r}, match={self.match!r}, t2={self.t2}"


LOSSES.register("cs", CSLoss, family="logit",
                paper="Cauchy-Schwarz divergence (MTL-CSKD, Multi-Task KD for Dense Prediction, ICCV 2023)",
                group="distill", inputs="logits or dense task outputs (one or several taps)")
