"""The interface every registered loss module follows, so the Distiller can call any of them.

Losses are pure functions (tensors in, scalar out). The thin `DistillLoss` modules wrap them
with their hyperparameters and, where a method needs state (CRD's memory bank, embedding
heads), own that state explicitly so `state_dict` saves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

Features = Tensor | list[Tensor]
Shape = tuple[int, ...]


@dataclass
class LossContext:
    """What a loss may need besides the two feature inputs."""

    target: Tensor | None = None          # class labels (N,)
    soft_target: Tensor | None = None     # (N, C) label distribution after mixup/cutmix, if any
    index: Tensor | None = None           # data set indices of the batch's samples (N,)
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    epoch: int = 0                        # 0-based epoch
    step: int = 0                         # global optimizer step


class DistillLoss(nn.Module):
    """Base class: `forward(student, teacher, ctx)` returns a scalar loss.

    `student`/`teacher` are the tensors of the taps the term reads (a list when the term
    reads several layers). `setup` runs once before training with the probed shapes so a
    loss can build its own heads or memory (CRD) before the optimizer is created.
    """

    needs_teacher: bool = True

    def setup(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
              num_samples: int) -> None:
        """Build shape-dependent state; default: nothing to build."""

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        raise NotImplementedError
