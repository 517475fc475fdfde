"""Helpers shared by the loss modules: tap lists, flattening and shape checks."""

from __future__ import annotations

from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses.base import Features, LossContext


def as_list(features: Features | None, name: str, role: str) -> list[Tensor]:
    """A single tensor is a list of one tap, so every feature loss handles both forms."""
    if features is None:
        raise KdforgeError(f"{name}: no {role} features were given")
    if isinstance(features, Tensor):
        return [features]
    items = list(features)
    if not items or not all(isinstance(f, Tensor) for f in items):
        raise KdforgeError(f"{name}: {role} features must be a tensor or a non-empty list of tensors")
    return items


def paired(student: Features | None, teacher: Features | None, name: str) -> list[tuple[Tensor, Tensor]]:
    """Pair student and teacher taps one to one (teacher detached), failing clearly on a count mismatch."""
    s_list = as_list(student, name, "student")
    t_list = as_list(teacher, name, "teacher")
    if len(s_list) != len(t_list):
        raise KdforgeError(f"{name}: {len(s_list)} student taps but {len(t_list)} teacher taps; "
                           "the term must read the same number of layers from both models")
    return [(s, t.detach()) for s, t in zip(s_list, t_list)]


def single(features: Features | None, name: str, role: str) -> Tensor:
    """The one tensor of a term that reads exactly one tap (logits, pooled vector)."""
    items = as_list(features, name, role)
    if len(items) != 1:
        raise KdforgeError(f"{name}: expects one {role} tap, got {len(items)}")
    return items[0]


def logit_pair(student: Features | None, teacher: Features | None, ctx: LossContext, name: str
               ) -> tuple[Tensor, Tensor]:
    """The (student, teacher) logits a logit loss compares; falls back to the context's logits."""
    s = single(student if student is not None else ctx.student_logits, name, "student")
    t = single(teacher if teacher is not None else ctx.teacher_logits, name, "teacher")
    return s, t


def flat(x: Tensor) -> Tensor:
    """(N, ...) -> (N, D): pooled-vector losses compare whole per-sample vectors."""
    return x.reshape(x.shape[0], -1)


def check_batch(s: Tensor, t: Tensor, name: str) -> None:
    if s.dim() == 0 or t.dim() == 0 or s.shape[0] != t.shape[0]:
        raise KdforgeError(f"{name}: student batch shape {tuple(s.shape)} and teacher "
                           f"{tuple(t.shape)} must share the batch size (dim 0)")


def shape_str(x: Tensor) -> str:
    return str(tuple(x.shape))
