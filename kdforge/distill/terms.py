"""Term: one named loss of a run — what it reads, its connector, weight, schedule and group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from kdforge.distill.connectors import build_connector
from kdforge.errors import KdforgeError
from kdforge.losses.base import DistillLoss, LossContext
from kdforge.registry import LOSSES, build

LOGITS = "logits"   # pseudo tap: the model's output


def _as_names(taps: str | Sequence[str] | None) -> list[str]:
    if taps is None:
        return []
    return [taps] if isinstance(taps, str) else list(taps)


class Term(nn.Module):
    """A loss plus the taps it reads, one connector per student tap, its weight and group.

    The weight ramps linearly over `warmup_epochs` as DKD's official code does:
    factor = min(1, (epoch + 1) / warmup_epochs) with 0-based epochs.
    """

    def __init__(self, loss: DistillLoss | str, student: str | Sequence[str] = LOGITS,
                 teacher: str | Sequence[str] | None = LOGITS, *, name: str | None = None,
                 weight: float = 1.0, warmup_epochs: float = 0.0, group: str = "distill",
                 teacher_id: str = "teacher", connector: str | None = None,
                 connector_args: dict[str, Any] | None = None, loss_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(loss, str):
            loss_name = loss
            loss = build(LOSSES, loss, **(loss_args or {}))
        else:
            loss_name = type(loss).__name__.lower()
        self.loss = loss
        self.name = name or loss_name
        self.student_taps = _as_names(student) or [LOGITS]
        self.teacher_taps = _as_names(teacher) if loss.needs_teacher else []
        if loss.needs_teacher and not self.teacher_taps:
            raise KdforgeError(f"term '{self.name}': loss needs teacher features but the term names no "
                               "teacher tap")
        if self.teacher_taps and len(self.teacher_taps) != len(self.student_taps) and connector:
            raise KdforgeError(f"term '{self.name}': a connector needs as many teacher taps as student "
                               f"taps ({len(self.student_taps)} vs {len(self.teacher_taps)})")
        self.teacher_id = teacher_id
        self.weight = float(weight)
        self.warmup_epochs = float(warmup_epochs)
        self.group = group
        self.connector_name = connector
        self.connector_args = dict(connector_args or {})
        self.connectors = nn.ModuleList()

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_taps)

    def setup(self, student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]],
              num_samples: int) -> None:
        """Build connectors (student -> teacher shape) and the loss's own state from probed shapes."""
        self.connectors = nn.ModuleList()
        out_shapes = list(student_shapes)
        if self.connector_name not in (None, "identity"):
            for i, s_shape in enumerate(student_shapes):
                conn = build_connector(self.connector_name, s_shape, teacher_shapes[i], **self.connector_args)
                self.connectors.append(conn)
                out_shapes[i] = tuple(teacher_shapes[i])
        self.loss.setup(out_shapes, teacher_shapes, num_samples)

    def factor(self, epoch: int) -> float:
        if self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, (epoch + 1) / self.warmup_epochs)

    def forward(self, student_feats: list[Tensor], teacher_feats: list[Tensor] | None,
                ctx: LossContext) -> Tensor:
        """Weighted loss value: weight * warm-up factor * loss(connector(student), teacher)."""
        if len(self.connectors):
            student_feats = [conn(f) for conn, f in zip(self.connectors, student_feats)]
        s: Tensor | list[Tensor] = student_feats[0] if len(student_feats) == 1 else student_feats
        t: Tensor | list[Tensor] | None = None
        if teacher_feats is not None:
            t = teacher_feats[0] if len(teacher_feats) == 1 else teacher_feats
        value = self.loss(s, t, ctx)
        return value * (self.weight * self.factor(ctx.epoch))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, student={self.student_taps}, teacher={self.teacher_taps}, "
                f"weight={self.weight}, warmup_epochs={self.warmup_epochs}, group={self.group!r}")


def term_from_config(cfg: Any) -> Term:
    """Build a Term from a `kdforge.config.TermConfig`."""
    return Term(cfg.loss, cfg.student, cfg.teacher, name=cfg.name, weight=cfg.weight,
                warmup_epochs=cfg.warmup_epochs, group=cfg.group, teacher_id=cfg.teacher_id,
                connector=cfg.connector, connector_args=cfg.connector_args, loss_args=cfg.args)
