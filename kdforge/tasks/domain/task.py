"""Taxonomy-adaptive domain adaptation as a Task of the one Trainer.

Every step sees a labelled source batch, a few-shot labelled target batch and, from epoch
`mix_from` on, a batch of mixed images (target patches pasted into the source batch's images).
Batch k of epoch e is a pure function of (seed, e, k): source and few-shot positions come from
`stream_batch`, the unlabelled images and patch positions from generators seeded by (seed, e,
k), and crop/flip views from `augment_images`, so a run stopped anywhere resumes bitwise. The
training module (e.g. OTD's) turns a `DomainBatch` into a `Step`; any state it keeps outside
its parameters and buffers (EMA statistics, subspace banks) travels through `task_state()` /
`load_task_state(state, device)` into the checkpoints, and its `ddp_note` (if any) refuses
torchrun. The target test split is evaluated only after
training (there is no validation split, so nothing is selected on it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Autocast, Task, seeded_generator, stream_batch
from kdforge.tasks.common import augment_images, predict, prepare_images
from kdforge.tasks.domain.data import DomainData, mix_domains
from kdforge.train.distributed import DistEnv

__all__ = ["DomainBatch", "DomainTask", "evaluate_target"]


@dataclass
class DomainBatch:
    """One step's inputs on the training device (images normalised; `mixed` None before `mix_from`)."""

    src: Tensor
    src_labels: Tensor
    few: Tensor
    few_labels: Tensor
    mixed: Tensor | None
    epoch: int
    step: int


class DomainTask(Task):
    """Source + few-shot target (+ mixed) batches for a domain-adaptation module; target-test metrics."""

    name = "domain"

    def __init__(self, module: nn.Module, data: DomainData, batch_size: int, seed: int,
                 mix_from: int | None = None) -> None:
        if batch_size < 1:
            raise KdforgeError(f"domain: batch_size must be >= 1, got {batch_size}")
        self.module, self.data, self.batch_size, self.seed, self.mix_from = module, data, batch_size, seed, mix_from
        self.few_bs = min(len(data.few_images), batch_size)
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
        mixed = None
        if self.mix_from is not None and epoch >= self.mix_from:
            uidx = torch.randint(0, len(d.unl_images), (len(idx),), generator=seeded_generator(seed, 3, epoch, step))
            mixed = prepare_images(mix_domains(d.src_images[idx], d.unl_images[uidx], seed, epoch, step),
                                   d.mean, d.std).to(dev)
        return DomainBatch(
            src=augment_images(d.src_images[idx], idx, epoch, seed * 16, d.mean, d.std).to(dev),
            src_labels=d.src_labels[idx].to(dev),
            few=augment_images(d.few_images[fidx], fidx, epoch, seed * 16 + 1, d.mean, d.std).to(dev),
            few_labels=d.few_labels[fidx].to(dev),
            mixed=mixed, epoch=epoch, step=step,
        )

    def train_counts(self, out: Step, batch: DomainBatch) -> dict[str, Tensor]:
        return {"src_correct": (out.outputs.detach().argmax(1) == batch.src_labels).sum(),
                "src_samples": torch.tensor(len(batch.src_labels), device=batch.src_labels.device)}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return {"train_src_top1": 100.0 * counts.get("src_correct", 0.0) / max(1.0, counts.get("src_samples", 0.0))}

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        if split != "test":
            raise KdforgeError(f"domain: only the target 'test' split can be evaluated, not {split!r}")
        with autocast() if autocast is not None else contextlib.nullcontext():
            return evaluate_target(module.eval_model(), self.data, self.device)

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.evaluate(module, "test", env, autocast))
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


def evaluate_target(model: nn.Module, data: DomainData, device: torch.device | None = None) -> dict[str, float]:
    """Target-domain test accuracy (%): all, old classes, new classes, and mean per-class F1."""
    dev = device or torch.device("cpu")
    logits = predict(model, data.test_images, 500, lambda v: prepare_images(v.to(dev), data.mean, data.std))
    pred, y = logits.argmax(1).cpu(), data.test_labels
    old = y < data.num_old
    f1 = []
    for c in range(data.num_classes):
        tp = float(((pred == c) & (y == c)).sum())
        prec, rec = tp / max(float((pred == c).sum()), 1.0), tp / max(float((y == c).sum()), 1.0)
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return {
        "target_top1": 100.0 * float((pred == y).float().mean()),
        "target_old_top1": 100.0 * float((pred[old] == y[old]).float().mean()),
        "target_new_top1": 100.0 * float((pred[~old] == y[~old]).float().mean()) if bool((~old).any()) else 0.0,
        "target_macro_f1": 100.0 * sum(f1) / len(f1),
    }
