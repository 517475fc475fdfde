"""Multi-label task loss, training loop and evaluation.

The loop reuses the core `Distiller`: its terms read logits or taps (e.g. `label_embed`) and
receive the multi-hot targets (N, C) as `ctx.target`, so any registered loss plugs in. The
task loss is `multilabel_bce` (BCE with logits; `reduction: sum` as in the ASL/L2D code family,
or `mean`). Training never touches the test split; `evaluate` runs after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch, Distiller
from kdforge.distill.terms import Term
from kdforge.errors import KdforgeError
from kdforge.losses._common import single
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.models.taps import FeatureTap
from kdforge.registry import LOSSES
from kdforge.tasks.common import (
    LoopConfig,
    augment_images,
    epoch_batches,
    fit,
    predict,
    prepare_images,
    seeded_generator,
)
from kdforge.tasks.multilabel.data import MultiLabelData
from kdforge.tasks.multilabel.metrics import per_class_average_precision

__all__ = [
    "AugmentSpec",
    "MultiLabelBCELoss",
    "evaluate",
    "multilabel_bce_loss",
    "teacher_outputs",
    "train_multilabel",
]


def multilabel_bce_loss(logits: Tensor, targets: Tensor, reduction: str = "sum") -> Tensor:
    """Binary cross-entropy with logits over (N, C); `sum` (L2D/ASL) or `mean` over all entries."""
    if logits.dim() != 2 or targets is None or targets.shape != logits.shape:
        got = None if targets is None else tuple(targets.shape)
        raise KdforgeError(
            f"multilabel_bce: logits {tuple(logits.shape)} need multi-hot targets of the same "
            f"shape, got {got}"
        )
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction=reduction)


class MultiLabelBCELoss(DistillLoss):
    """Task loss of the multi-label setting: BCE between the student's logits and ctx.target (N, C)."""

    needs_teacher = False

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise KdforgeError(f"multilabel_bce: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        return multilabel_bce_loss(single(student, "multilabel_bce", "student"), ctx.target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


if "multilabel_bce" not in LOSSES:
    LOSSES.register(
        "multilabel_bce",
        MultiLabelBCELoss,
        family="task",
        paper="binary cross-entropy per label",
        group="task",
        inputs="logits (multi-label)",
    )


@dataclass
class AugmentSpec:
    """Seeded crop/flip of training images (flip keeps every label of the procedural set)."""

    crop_padding: int = 2
    flip: bool = True


def train_multilabel(
    student: nn.Module,
    data: MultiLabelData,
    terms: Sequence[Term],
    loop: LoopConfig,
    seed: int = 0,
    teacher: nn.Module | None = None,
    augment: AugmentSpec | None = None,
    augment_seed: int | None = None,
    teacher_cache: dict[int, dict[str, Tensor]] | None = None,
    desc: str = "multilabel",
) -> list[dict[str, float]]:
    """Train `student` in place on `data` with the given terms (task + distillation); returns epoch logs.

    `seed` sets the batch order (the caller seeds the initialisation); the crop/flip views use
    `augment_seed` (default: `seed`). With a fixed `augment_seed`, a sample's view at an epoch is
    the same in every run, so the teacher's outputs can be shared: pass one `teacher_cache`
    dict to several runs and each epoch's teacher outputs (logits and the taps the terms read)
    are computed once for the whole split, then sliced per batch.
    """
    loop.check(desc)
    augment = augment or AugmentSpec()
    aug_seed = seed if augment_seed is None else augment_seed
    distiller = Distiller(student, teacher, list(terms))
    sample = prepare_images(data.images[:2], data.mean, data.std)
    distiller.setup(sample, len(data))
    gen = seeded_generator(seed, 17)
    batches: list[Tensor] = []
    steps = max(1, len(data) // loop.batch_size)
    taps = sorted({n for t in terms if t.needs_teacher for n in t.teacher_taps if n != "logits"})
    cache = teacher_cache if teacher is not None and teacher_cache is not None else None

    def view(idx: Tensor, epoch: int) -> Tensor:
        return augment_images(
            data.images[idx], idx, epoch, aug_seed, data.mean, data.std, augment.crop_padding, augment.flip
        )

    def on_epoch(epoch: int) -> None:
        batches[:] = epoch_batches(len(data), loop.batch_size, gen)
        if cache is not None and not all(k in cache.get(epoch, {}) for k in ["logits", *taps]):
            cache[epoch] = {**cache.get(epoch, {}), **teacher_outputs(teacher, data, epoch, view, taps)}

    def step_fn(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        idx = batches[i % len(batches)]
        cached = None
        if cache is not None:
            cached = {"teacher": {k: v[idx] for k, v in cache[epoch].items()}}
        out = distiller(
            Batch(
                images=view(idx, epoch),
                target=data.targets[idx],
                index=idx,
                epoch=epoch,
                step=epoch * steps + i,
                teacher_outputs=cached,
            )
        )
        return out.total(), {k: float(v.detach()) for k, v in out.losses.items()}

    distiller.train()
    torch.manual_seed(seed)
    return fit(distiller.trainable_parameters(), step_fn, steps, loop, desc, on_epoch_start=on_epoch)


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module,
    data: MultiLabelData,
    epoch: int,
    view: Callable[[Tensor, int], Tensor],
    taps: Sequence[str],
    batch_size: int = 500,
) -> dict[str, Tensor]:
    """The teacher's logits and `taps` on every sample's view at `epoch` (eval mode, no grad)."""
    was = teacher.training
    teacher.eval()
    parts: dict[str, list[Tensor]] = {"logits": [], **{t: [] for t in taps}}
    with FeatureTap(teacher, taps, detach=True) as tap:
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(len(data), start + batch_size))
            tap.clear()
            parts["logits"].append(teacher(view(idx, epoch)))
            for t in taps:
                parts[t].append(tap.features[t])
    teacher.train(was)
    return {k: torch.cat(v) for k, v in parts.items()}


def evaluate(model: nn.Module, data: MultiLabelData, batch_size: int = 500) -> dict[str, float]:
    """mAP (%) over classes with positives, AP (%) of the rarest label and per-class APs."""
    logits = predict(model, data.images, batch_size, lambda x: prepare_images(x, data.mean, data.std))
    aps = per_class_average_precision(logits, data.targets)
    valid = [a for a in aps if not math.isnan(a)]
    rarest = int(torch.argmin(data.targets.sum(0)))
    out = {"mAP": 100 * sum(valid) / len(valid) if valid else math.nan, "rare_AP": 100 * aps[rarest]}
    out.update({f"AP_{name}": 100 * a for name, a in zip(data.class_names or range(len(aps)), aps)})
    return out
