"""Dense prediction (one or several tasks) as a Task on the one Trainer, distilled through the Distiller.

The training module is `DenseDistiller`, the core `Distiller` for models whose forward returns a
dict of per-task outputs: its terms read task outputs and encoder/decoder features by tap name
(`semseg`, `depth`, `normals`, `boundary`, `enc1`.., `dec`; see `models.MultiTaskNet`), so one
term may read several task outputs at once, and it adds each task's supervised loss (group
`task`, weighted by `task_weights`): cross-entropy (unlabelled pixels ignored), L1 depth on
measured pixels, 1 - cosine for normals, binary cross-entropy for boundaries (`pos_weight`).

Batches are `stream_batch` positions with a seeded horizontal flip per sample (the normals' x
component changes sign). Evaluation of a split: every task's metrics (`metrics`), and the
multi-task score when single-task baselines are given. `draw` writes test images with each task's
ground truth beside the prediction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.distill.terms import Term
from kdforge.errors import KdforgeError
from kdforge.tasks.base import SampledTask, seeded_generator
from kdforge.tasks.dense.metrics import depth_errors, miou, mtl_score, normal_angle_error, ods_f
from kdforge.tasks.dense.scenes import IGNORE, DenseData
from kdforge.train.distributed import DistEnv

__all__ = ["DenseDistiller", "DenseTask", "dense_metrics", "normalise", "predict_dense", "task_losses"]

MEAN, STD = 0.5, 0.25


def normalise(images: Tensor) -> Tensor:
    """uint8 images -> the networks' float input."""
    return (images.float() / 255 - MEAN) / STD


def task_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], weights: Mapping[str, float],
                pos_weight: float = 2.0) -> dict[str, Tensor]:
    """Each task's weighted supervised loss ({task: loss}); pixels without ground truth are skipped."""
    out: dict[str, Tensor] = {}
    for task, pred in outputs.items():
        target, w = targets[task], float(weights.get(task, 1.0))
        if task == "semseg":
            loss = F.cross_entropy(pred.float(), target, ignore_index=IGNORE)
        elif task == "depth":
            valid = target > 0
            loss = (pred[:, 0].float() - target).abs()[valid].sum() / valid.sum().clamp_min(1)
        elif task == "normals":
            valid = target.norm(dim=1) > 0.5
            cos = F.cosine_similarity(pred.float(), target, dim=1, eps=1e-8)
            loss = (1 - cos)[valid].sum() / valid.sum().clamp_min(1)
        elif task == "boundary":
            loss = F.binary_cross_entropy_with_logits(pred[:, 0].float(), target.float(),
                                                      pos_weight=pred.new_tensor(pos_weight))
        else:
            raise KdforgeError(f"no supervised loss for dense task '{task}'")
        out[task] = w * loss
    return out


class DenseDistiller(Distiller):
    """The core Distiller for multi-task dense models: dict outputs, taps by task name, task losses added."""

    # forward only adds the task losses to the core step: the teacher is fixed, so its outputs may
    # be computed ahead (teacher pipeline) and through a frozen graph (trainer.teacher_freeze)
    teacher_outputs_ahead = True

    def __init__(self, student: nn.Module, teachers: nn.Module | dict[str, nn.Module] | None, terms: list[Term],
                 task_weights: Mapping[str, float] | None = None, pos_weight: float = 2.0) -> None:
        super().__init__(student, teachers, terms)
        self.task_weights = dict(task_weights or {})
        self.pos_weight = pos_weight

    def _check_classes(self, s_logits: Any, t_results: dict[str, tuple[Any, dict]]) -> None:
        for tid, (t_out, _) in t_results.items():
            for task, s in s_logits.items():
                if task in t_out and t_out[task].shape[1] != s.shape[1]:
                    raise KdforgeError(f"teacher '{tid}' predicts {t_out[task].shape[1]} {task} channels but the "
                                       f"student predicts {s.shape[1]}; they must share the label space")

    def forward(self, batch: Batch) -> Step:
        step = super().forward(batch)
        losses = task_losses(step.outputs, batch.target, self.task_weights, self.pos_weight)
        step.losses = {**losses, **step.losses}
        step.groups = {**{k: "task" for k in losses}, **step.groups}
        return step


@torch.no_grad()
def predict_dense(model: nn.Module, images: Tensor, device: torch.device, batch_size: int = 64) -> dict[str, Tensor]:
    """{task: output} of `model` on uint8 `images`, in eval mode (restoring the mode), on the CPU."""
    was = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(images), batch_size):
        for k, v in model(normalise(images[start:start + batch_size]).to(device)).items():
            parts.setdefault(k, []).append(v.float().cpu())
    model.train(was)
    return {k: torch.cat(v) for k, v in parts.items()}


def dense_metrics(outputs: Mapping[str, Tensor], data: DenseData, tolerance: int = 0) -> dict[str, float]:
    """Every task's metrics of `outputs` on `data` (see `kdforge.tasks.dense.metrics`); `tolerance`: the
    boundary F-score's in pixels (0: exact pixels, as the procedural boundaries are already 2 px wide)."""
    out: dict[str, float] = {}
    for task, pred in outputs.items():
        target = data.targets[task]
        if task == "semseg":
            out["semseg_miou"] = miou(pred.argmax(1), target, data.num_classes)
        elif task == "depth":
            errors = depth_errors(pred[:, 0], target)
            out["depth_rmse"], out["depth_absrel"] = errors["rmse"], errors["absrel"]
        elif task == "normals":
            out["normals_mean_angle"] = normal_angle_error(pred, target)
        elif task == "boundary":
            out["boundary_odsf"] = ods_f(torch.sigmoid(pred[:, 0]), target, tolerance)
    return out


class DenseTask(SampledTask):
    """A (multi-task) dense student trained on `train`, optionally distilled from a frozen teacher by `terms`."""

    name = "dense"

    def __init__(self, student: nn.Module, train: DenseData, test: DenseData, batch_size: int, seed: int = 0,
                 teacher: nn.Module | None = None, terms: Sequence[Term] = (),
                 task_weights: Mapping[str, float] | None = None, pos_weight: float = 2.0, flip: bool = True,
                 val: DenseData | None = None, baselines: Mapping[str, float] | None = None,
                 extra_result: dict[str, Any] | None = None, boundary_tolerance: int = 0) -> None:
        if batch_size < 1:
            raise KdforgeError(f"dense: batch_size must be >= 1, got {batch_size}")
        self.student, self.teacher, self.terms = student, teacher, list(terms)
        self.train, self.test, self.val = train, test, val
        self.batch_size, self.seed, self.flip = batch_size, seed, flip
        self.task_weights, self.pos_weight = dict(task_weights or {}), pos_weight
        self.baselines = dict(baselines or {})
        self.boundary_tolerance = boundary_tolerance
        self.extra_result = dict(extra_result or {})
        self.tasks = list(getattr(student, "tasks", train.tasks))
        missing = [t for t in self.tasks if t not in train.targets]
        if missing:
            raise KdforgeError(f"dense: the model predicts {missing} but the data has no such targets")
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        module = DenseDistiller(self.student, self.teacher, self.terms, self.task_weights, self.pos_weight)
        module.setup(normalise(self.train.images[:2]), len(self.train))
        return module.to(device)

    def batch(self, epoch: int, step: int, env: DistEnv) -> Batch:
        k = epoch * self.steps_per_epoch() + step
        idx = self.batch_index(epoch, step, env)
        images = self.train.images[idx]
        targets = {t: self.train.targets[t][idx] for t in self.tasks}
        if self.flip:
            flip = torch.rand(len(idx), generator=seeded_generator(self.seed, 29, k)) < 0.5
            images, targets = _hflip(images, targets, flip)
        target = {t: v.to(self.device) for t, v in targets.items()}
        return Batch(images=normalise(images).to(self.device), target=target, index=idx.to(self.device), epoch=epoch,
                     step=k)

    def split(self, split: str) -> DenseData:
        data = {"train": self.train, "test": self.test, "val": self.val}.get(split)
        if data is None:
            raise KdforgeError(f"dense: no '{split}' split (data.num_val sets a validation split)")
        return data

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = self.split(split)
        with autocast() if autocast is not None else contextlib.nullcontext():
            outputs = predict_dense(module.eval_model(), data.images, self.device)
        metrics = dense_metrics(outputs, data, self.boundary_tolerance)
        if self.baselines:
            metrics["mtl_score"] = mtl_score(metrics, self.baselines)
        return metrics

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        if self.val is not None:
            out.update({f"val_{k}": v for k, v in self.evaluate(module, "val", env).items()})
        return {**out, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.student.parameters())
        return {"task": self.name, "tasks": self.tasks, "train_images": len(self.train), "test_images": len(self.test),
                "student_parameters": params, "terms": [t.name for t in self.terms],
                "baselines": self.baselines}

    def draw(self, module: nn.Module, path: Path, count: int = 4) -> bool:
        """`count` test images; per task a row of ground truth and a row of the prediction."""
        from kdforge.plotting import pyplot, save_png

        pick = list(range(min(count, len(self.test))))
        outputs = predict_dense(module.eval_model(), self.test.images[pick], self.device)
        rows = [("image", None, None)]
        for t in self.tasks:
            rows += [(f"{t} (truth)", t, False), (f"{t} (pred)", t, True)]
        plt = pyplot()
        fig, axes = plt.subplots(len(rows), len(pick), figsize=(1.5 * len(pick), 1.35 * len(rows)), squeeze=False)
        for j, i in enumerate(pick):
            for r, (label, task, predicted) in enumerate(rows):
                ax = axes[r, j]
                if task is None:
                    ax.imshow(self.test.images[i].permute(1, 2, 0).numpy())
                else:
                    value = outputs[task][j] if predicted else self.test.targets[task][i]
                    _show(ax, task, value, predicted, self.test)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=7)
        fig.suptitle("test scenes: ground truth beside the prediction, per task", fontsize=8)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True


def _show(ax: Any, task: str, value: Tensor, predicted: bool, data: DenseData) -> None:
    if task == "semseg":
        labels = value.argmax(0) if predicted else value
        ax.imshow(labels.numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    elif task == "depth":
        target = data.targets["depth"]
        d = value[0] if predicted else value
        ax.imshow(d.numpy(), cmap="viridis_r", vmin=float(target[target > 0].min()), vmax=float(target.max()))
    elif task == "normals":
        n = F.normalize(value, dim=0) if predicted else value
        ax.imshow(((n.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
    else:
        b = torch.sigmoid(value[0]) if predicted else value.float()
        ax.imshow(b.numpy(), cmap="gray", vmin=0, vmax=1)


def _hflip(images: Tensor, targets: dict[str, Tensor], flip: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror the samples where `flip` is set; a mirrored normal's x component changes sign."""
    if not flip.any():
        return images, targets
    images = images.clone()
    images[flip] = images[flip].flip(-1)
    out = {}
    for t, v in targets.items():
        v = v.clone()
        v[flip] = v[flip].flip(-1)
        if t == "normals":
            v[flip, 0] = -v[flip, 0]
        out[t] = v
    return images, out
