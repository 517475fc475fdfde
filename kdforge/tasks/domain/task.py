"""Taxonomy-adaptive domain adaptation as a Task of the one Trainer.

Every step sees a labelled source batch and a few-shot labelled target batch and, from epoch
`mix_from` on, an unlabelled target batch and its class-mix with the few-shot batch (a region of
few-shot image i pasted into unlabelled image i, as in the official code's ClassMix; the module
pseudo-labels the unlabelled images with the current model). Batch k of epoch e is a pure
function of (seed, e, k): source, few-shot and unlabelled positions come from `stream_batch`
(streams 1, 2, 3), pasted regions from a generator seeded by (seed, e, k), and crop/flip views
from `augment_images`. The source and few-shot batches therefore do not depend on whether a run
mixes: arms of one seed that differ only in the method see the same batches, and every mixing
arm the same unlabelled images and regions. A run stopped anywhere resumes bitwise. The
training module (e.g. OTD's) turns a `DomainBatch` into a `Step`; any state it keeps outside its
parameters and buffers (EMA statistics, subspace banks) travels through `task_state()` /
`load_task_state(state, device)` into the checkpoints, and its `ddp_note` (if any) refuses
torchrun.

Evaluation: the target `test` split after training (`target_*` in result.json), the optional
labelled target `val` split after every epoch (metrics.csv `val_*`, the `best` checkpoint, and
`val_*` in result.json; choose settings on it, never on test) and `source` (the unshifted test
draws of the old classes: `source_old_top1`, the domain gap against `target_old_top1`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Autocast, Task, stream_batch
from kdforge.tasks.common import augment_images, predict, prepare_images
from kdforge.tasks.domain.data import DomainData, class_mix, mix_regions
from kdforge.train.distributed import DistEnv

__all__ = ["DomainBatch", "DomainTask", "evaluate_target"]


@dataclass
class DomainBatch:
    """One step's inputs on the training device (images normalised; the mixing fields None before `mix_from`).

    `unl`: the unlabelled target views; `mixed`: few-shot view i pasted into `unl[i]` on a region
    covering `mix_area[i]` of the image; `mix_labels`: the few-shot labels of the pasted images;
    `unl_labels`: the true labels of `unl`, for diagnostics only (pseudo-label accuracy), never a loss.
    """

    src: Tensor
    src_labels: Tensor
    few: Tensor
    few_labels: Tensor
    epoch: int
    step: int
    unl: Tensor | None = None
    mixed: Tensor | None = None
    mix_labels: Tensor | None = None
    mix_area: Tensor | None = None
    unl_labels: Tensor | None = None


class DomainTask(Task):
    """Source + few-shot target (+ unlabelled and class-mixed) batches for a domain-adaptation module."""

    name = "domain"
    selection_metric = "target_top1"

    def __init__(self, module: nn.Module, data: DomainData, batch_size: int, seed: int,
                 mix_from: int | None = None, mix_area: float = 0.5) -> None:
        if batch_size < 1:
            raise KdforgeError(f"domain: batch_size must be >= 1, got {batch_size}")
        if not 0 < mix_area <= 1:
            raise KdforgeError(f"domain: mix_area must be in (0, 1], got {mix_area}")
        self.module, self.data, self.batch_size, self.seed, self.mix_from = module, data, batch_size, seed, mix_from
        self.mix_area = mix_area
        self.few_bs = min(len(data.few_images), batch_size)
        self.eval_split = "val" if data.val_images is not None else None
        self.device = torch.device("cpu")
        self.ddp_note = getattr(module, "ddp_note", None)   # the module knows whether its losses split over ranks

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        self.module.to(device)
        return self.module

    def steps_per_epoch(self) -> int:
        return max(len(self.data.src_images) // self.batch_size, 1)

    def batch(self, epoch: int, step: int, env: DistEnv) -> DomainBatch:
        d, seed, dev = self.data, self.seed, self.device
        k = epoch * self.steps_per_epoch() + step
        idx = stream_batch(len(d.src_images), self.batch_size, k, seed, 1)
        fidx = stream_batch(len(d.few_images), self.few_bs, k, seed, 2)
        few = augment_images(d.few_images[fidx], fidx, epoch, seed * 16 + 1, d.mean, d.std)
        out = DomainBatch(
            src=augment_images(d.src_images[idx], idx, epoch, seed * 16, d.mean, d.std).to(dev),
            src_labels=d.src_labels[idx].to(dev), few=few.to(dev), few_labels=d.few_labels[fidx].to(dev),
            epoch=epoch, step=step,
        )
        if self.mix_from is not None and epoch >= self.mix_from:
            uidx = stream_batch(len(d.unl_images), len(fidx), k, seed, 3)
            if len(uidx) < len(fidx):           # fewer unlabelled images than few-shot ones: repeat them
                uidx = uidx.repeat(-(-len(fidx) // len(uidx)))[: len(fidx)]
            unl = augment_images(d.unl_images[uidx], uidx, epoch, seed * 16 + 2, d.mean, d.std)
            mask, area = mix_regions(len(fidx), *unl.shape[2:], self.mix_area, seed, epoch, step)
            out.unl, out.mixed = unl.to(dev), class_mix(few, unl, mask).to(dev)
            out.mix_labels, out.mix_area = out.few_labels, area.to(dev)
            if d.unl_labels is not None:
                out.unl_labels = d.unl_labels[uidx].to(dev)
        return out

    def train_counts(self, out: Step, batch: DomainBatch) -> dict[str, Tensor]:
        n = len(batch.src_labels)
        return {"src_correct": (out.outputs.detach()[:n].argmax(1) == batch.src_labels).sum(),
                "src_samples": torch.tensor(n, device=batch.src_labels.device)}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return {"train_src_top1": 100.0 * counts.get("src_correct", 0.0) / max(1.0, counts.get("src_samples", 0.0))}

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        d = self.data
        splits = {"test": (d.test_images, d.test_labels), "val": (d.val_images, d.val_labels),
                  "source": (d.src_test_images, d.src_test_labels)}
        if split not in splits or splits[split][0] is None:
            have = [k for k, v in splits.items() if v[0] is not None]
            raise KdforgeError(f"domain: cannot evaluate split {split!r} (this run has {', '.join(have)})")
        with autocast() if autocast is not None else contextlib.nullcontext():
            return evaluate_target(module.eval_model(), d, self.device, *splits[split])

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.evaluate(module, "test", env, autocast))
        if self.data.val_images is not None:
            out.update({f"val_{k}": v for k, v in self.evaluate(module, "val", env, autocast).items()})
        if self.data.src_test_images is not None and len(self.data.src_test_images):
            out["source_old_top1"] = self.evaluate(module, "source", env, autocast)["target_top1"]
        diagnostics = getattr(module, "diagnostics", None)
        if callable(diagnostics):
            out.update(diagnostics())
        return out

    def describe(self) -> dict[str, Any]:
        d = self.data
        return {"task": self.name, "num_old": d.num_old, "num_new": d.num_new, "mix_from_epoch": self.mix_from}

    def state_dict(self) -> dict[str, Any]:
        getter = getattr(self.module, "task_state", None)
        return getter() if callable(getter) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        setter = getattr(self.module, "load_task_state", None)
        if callable(setter):
            setter(state, self.device)
        else:
            super().load_state_dict(state)


def evaluate_target(model: nn.Module, data: DomainData, device: torch.device | None = None,
                    images: Tensor | None = None, labels: Tensor | None = None) -> dict[str, float]:
    """Accuracy (%) on a split (default: the target test split): all, old classes, new classes, mean per-class F1.

    The F1 mean runs over the classes present in the split (the source split has old classes only).
    """
    dev = device or torch.device("cpu")
    images = data.test_images if images is None else images
    y = data.test_labels if labels is None else labels
    logits = predict(model, images, 500, lambda v: prepare_images(v.to(dev), data.mean, data.std))
    pred = logits.argmax(1).cpu()
    old = y < data.num_old
    f1 = []
    for c in sorted(set(y.tolist())):
        tp = float(((pred == c) & (y == c)).sum())
        prec, rec = tp / max(float((pred == c).sum()), 1.0), tp / max(float((y == c).sum()), 1.0)
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return {
        "target_top1": 100.0 * float((pred == y).float().mean()),
        "target_old_top1": 100.0 * float((pred[old] == y[old]).float().mean()) if bool(old.any()) else 0.0,
        "target_new_top1": 100.0 * float((pred[~old] == y[~old]).float().mean()) if bool((~old).any()) else 0.0,
        "target_macro_f1": 100.0 * sum(f1) / max(len(f1), 1),
    }
