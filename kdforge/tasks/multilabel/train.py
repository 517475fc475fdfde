"""Multi-label task loss, the multi-label Task (trained by the one Trainer) and evaluation.

The task reuses the core `Distiller`: its terms read logits or taps (e.g. `label_embed`) and
receive the multi-hot targets (N, C) as `ctx.target`, so any registered loss plugs in. The
task loss is `multilabel_bce` (BCE with logits; `reduction: sum` as in the ASL/L2D code family,
or `mean`). Training never touches the test split; it is evaluated after training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch, Distiller
from kdforge.distill.terms import Term
from kdforge.errors import KdforgeError
from kdforge.losses._common import single
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.registry import LOSSES
from kdforge.tasks.base import SampledTask
from kdforge.tasks.common import augment_images, predict, prepare_images
from kdforge.tasks.multilabel.data import MultiLabelData
from kdforge.tasks.multilabel.metrics import per_class_average_precision
from kdforge.train.distributed import DistEnv

__all__ = [
    "AugmentSpec",
    "MultiLabelBCELoss",
    "MultiLabelTask",
    "evaluate",
    "multilabel_bce_loss",
    "teacher_outputs",
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


class MultiLabelTask(SampledTask):
    """Multi-label training of a student (with optional frozen teacher) on a `MultiLabelData` split.

    Batch k of epoch e is `stream_batch(n, batch_size, e * steps + k, seed, 17)`; the crop/flip
    view of a sample is a pure function of (augment_seed, epoch, index). With a fixed
    `augment_seed` a sample's view at an epoch is the same in every run, so the teacher's outputs
    can be shared: pass one `teacher_cache` dict to several runs and each epoch's teacher outputs
    (logits and the taps the terms read) are computed once for the whole split, then sliced per
    batch. Under DDP every rank takes its share of each global batch; BCE/MLD/KD are per-sample
    terms, while LED's relations and `bce_reduction: sum` are per-rank (as in multi-GPU code).
    """

    name = "multilabel"

    def __init__(self, student: nn.Module, train: MultiLabelData, test: MultiLabelData, terms: Sequence[Term],
                 batch_size: int, seed: int = 0, teacher: nn.Module | None = None,
                 augment: AugmentSpec | None = None, augment_seed: int | None = None,
                 teacher_cache: dict[int, dict[str, Tensor]] | None = None,
                 val: MultiLabelData | None = None) -> None:
        if batch_size < 1:
            raise KdforgeError(f"multilabel: batch_size must be >= 1, got {batch_size}")
        self.student, self.teacher, self.terms = student, teacher, list(terms)
        self.train, self.test, self.val, self.batch_size, self.seed = train, test, val, batch_size, seed
        self.augment = augment or AugmentSpec()
        self.aug_seed = seed if augment_seed is None else augment_seed
        self.taps = sorted({n for t in self.terms if t.needs_teacher for n in t.teacher_taps if n != "logits"})
        self.cache = teacher_cache if teacher is not None and teacher_cache is not None else None

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        self.distiller = Distiller(self.student, self.teacher, self.terms)
        self.distiller.setup(prepare_images(self.train.images[:2], self.train.mean, self.train.std),
                             len(self.train))
        return self.distiller.to(device)

    def view(self, idx: Tensor, epoch: int) -> Tensor:
        a = self.augment
        return augment_images(self.train.images[idx], idx, epoch, self.aug_seed, self.train.mean, self.train.std,
                              a.crop_padding, a.flip)

    def on_epoch_start(self, module: nn.Module, epoch: int) -> None:
        cache = self.cache
        if cache is not None and not all(k in cache.get(epoch, {}) for k in ["logits", *self.taps]):
            # through the distiller, so the cached outputs are the ones its online step would compute
            # (same teacher execution: eager or the frozen graph, trainer.teacher_freeze)
            cache[epoch] = {**cache.get(epoch, {}),
                            **teacher_outputs(lambda x: module.teacher_outputs(x.to(self.device))["teacher"],
                                              len(self.train), epoch, self.view, ["logits", *self.taps])}

    def batch(self, epoch: int, step: int, env: DistEnv) -> Batch:
        idx = self.batch_index(epoch, step, env)
        cached = None
        if self.cache is not None:
            cached = {"teacher": {k: v[idx].to(self.device) for k, v in self.cache[epoch].items()}}
        return Batch(images=self.view(idx, epoch).to(self.device), target=self.train.targets[idx].to(self.device),
                     index=idx.to(self.device), epoch=epoch, step=epoch * self.steps_per_epoch() + step,
                     teacher_outputs=cached)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = {"train": self.train, "test": self.test, "val": self.val}.get(split)
        if data is None:
            raise KdforgeError(f"multilabel: no '{split}' split (data.num_val sets a validation split)")
        return evaluate(module.eval_model(), data)

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        """Test metrics after the last epoch (`test_*`), the validation split's (`val_*`) when there is
        one (for choosing settings without the test split), and the teacher's test mAP."""
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        if self.val is not None:
            out.update({f"val_{k}": v for k, v in self.evaluate(module, "val", env).items()})
        if self.teacher is not None:
            out["teacher_test_mAP"] = evaluate(self.teacher, self.test)["mAP"]
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "terms": [t.name for t in self.terms]}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Test images with their true labels and the student's predicted labels (p > 0.5)."""
        from kdforge.tasks.multilabel.plot import draw_predictions

        return draw_predictions(module.eval_model(), self.test, path)


@torch.no_grad()
def teacher_outputs(
    run: Callable[[Tensor], dict[str, Tensor]],
    num_samples: int,
    epoch: int,
    view: Callable[[Tensor, int], Tensor],
    keys: Sequence[str],
    batch_size: int = 500,
) -> dict[str, Tensor]:
    """`keys` of a teacher's outputs (`run`: images -> {"logits": ..., tap: ...}, e.g. a Distiller's
    `teacher_outputs` of one teacher) on every sample's view at `epoch`, on the CPU."""
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    for start in range(0, num_samples, batch_size):
        outs = run(view(torch.arange(start, min(num_samples, start + batch_size)), epoch))
        for key in parts:
            parts[key].append(outs[key].cpu())
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
