"""The data-free setting as Tasks of the one Trainer: a split streamed in seeded batches.

Batch k of epoch e of a split is `stream_batch(n, batch_size, e * steps + k, seed, stream)` and a
sample's crop/flip view is a pure function of (view_seed, epoch, index), so every stage of the
setting stops and resumes bitwise exactly. Under DDP each rank takes its contiguous share of
every global batch (`rank_share`). TinyCNN has BatchNorm, so a rank's batch statistics come from
its share (SyncBatchNorm is CUDA-only; `trainer.sync_bn=true` converts `module.student` on GPU);
`tiny_cnn(..., norm="group")` swaps it for per-sample GroupNorm, so per-sample losses are then
exact under DDP.

* `DataFreeTask`: the shared data part (batches of the original or the web split, accuracy).
* `SupervisedTask`: the teacher stage, cross-entropy on the original labelled split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Autocast, Task, TaskModule, rank_share, stream_batch, top1_counts, top1_rate
from kdforge.tasks.common import augment_images, predict, prepare_images
from kdforge.tasks.datafree.data import DataFreeData
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.train.distributed import DistEnv

__all__ = ["NORMS", "DataFreeTask", "SupervisedNet", "SupervisedTask", "WebBatch", "tiny_cnn"]

SPLITS = {"orig": 1, "web": 2}   # split -> stream id of its batch order
NORMS = ("batch", "group")


def tiny_cnn(num_classes: int, width: int, norm: str = "batch") -> TinyCNN:
    """A TinyCNN with BatchNorm (`batch`) or GroupNorm of up to 8 groups (`group`: no batch coupling)."""
    if norm not in NORMS:
        raise KdforgeError(f"datafree: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    net = TinyCNN(num_classes, width)
    if norm == "group":
        for parent in list(net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.GroupNorm(min(8, child.num_features), child.num_features))
    return net


@dataclass
class WebBatch:
    """A training batch: normalised views on the device, true labels (-1: off-topic) and positions.

    `truth` of the web split is for selection diagnostics only; no web-pool loss reads it.
    """

    images: Tensor
    truth: Tensor
    index: Tensor
    epoch: int
    step: int
    extras: dict[str, Tensor] = field(default_factory=dict)


class DataFreeTask(Task):
    """Seeded, index-addressable batches of one split of a `DataFreeData` (nothing evaluated per epoch)."""

    name = "datafree"

    def __init__(self, data: DataFreeData, split: str, batch_size: int, seed: int, view_seed: int) -> None:
        if split not in SPLITS:
            raise KdforgeError(f"datafree task: split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.data, self.split, self.batch_size = data, split, batch_size
        self.seed, self.view_seed = seed, view_seed
        self.images = data.orig_images if split == "orig" else data.web_images
        self.truth = data.orig_labels if split == "orig" else data.web_labels

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device, self.env = device, env
        return self.make_module().to(device)

    def make_module(self) -> nn.Module:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        return max(1, len(self.images) // self.batch_size)

    def global_index(self, epoch: int, step: int) -> Tensor:
        """Positions of the whole global batch `step` of `epoch` (every rank's share)."""
        k = epoch * self.steps_per_epoch() + step
        return stream_batch(len(self.images), self.batch_size, k, self.seed, SPLITS[self.split])

    def batch(self, epoch: int, step: int, env: DistEnv) -> WebBatch:
        idx = rank_share(self.global_index(epoch, step), env)
        views = augment_images(self.images[idx].to(self.device), idx.to(self.device), epoch, self.view_seed,
                               self.data.mean, self.data.std)
        return WebBatch(views, self.truth[idx].to(self.device), idx, epoch, step)

    def predictions(self, net: nn.Module, images: Tensor) -> Tensor:
        """Predicted classes (CPU) of `net` on uint8 `images` (eval mode, no augmentation)."""
        logits = predict(net, images, 500, lambda v: prepare_images(v.to(self.device), self.data.mean, self.data.std))
        return logits.argmax(1).cpu()

    def accuracy(self, net: nn.Module, images: Tensor, labels: Tensor) -> float:
        """Top-1 (%) of `net` on uint8 `images` (eval mode, no augmentation)."""
        if len(images) == 0:
            return float("nan")
        return 100.0 * float((self.predictions(net, images) == labels).float().mean())

    def class_report(self, net: nn.Module, images: Tensor, labels: Tensor) -> dict[str, float]:
        """Class collapse diagnostics: the worst class's top-1 (%) and how many classes `net` predicts at all."""
        pred = self.predictions(net, images)
        per_class = [float((pred[labels == c] == c).float().mean()) * 100.0
                     for c in range(self.data.num_classes) if bool((labels == c).any())]
        return {"worst_class_top1": min(per_class), "classes_predicted": float(len(pred.unique()))}

    def split_data(self, split: str) -> tuple[Tensor, Tensor]:
        """(uint8 images, labels) of `test` / `val` (original distribution) or `web_in_class` (re-styled)."""
        d = self.data
        if split == "test":
            return d.test_images, d.test_labels
        if split == "val":
            return d.val_images, d.val_labels
        if split == "web_in_class":
            keep = d.web_kind == 0
            return d.web_images[keep], d.web_labels[keep]
        raise KdforgeError(f"datafree task: no split {split!r} (test, val, web_in_class)")

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        """top1 of the trained network on `test` / `val` (original) or `web_in_class` (re-styled, same classes)."""
        return {"top1": self.accuracy(module.eval_model(), *self.split_data(split))}


class SupervisedNet(TaskModule):
    """The network a stage trains with cross-entropy (`student`: the name `trainer.sync_bn` converts)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.student = net

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: WebBatch) -> Step:
        logits = self.student(batch.images)
        ce = F.cross_entropy(logits, batch.truth)
        return Step(outputs=logits, losses={"ce": ce}, groups={"ce": "task"})


class SupervisedTask(DataFreeTask):
    """The teacher stage: a TinyCNN trained on the original labelled split, which the student never sees."""

    def __init__(self, data: DataFreeData, width: int, batch_size: int, seed: int, norm: str = "batch") -> None:
        super().__init__(data, "orig", batch_size, seed, view_seed=seed * 16)
        self.width, self.norm = width, norm

    def make_module(self) -> nn.Module:
        return SupervisedNet(tiny_cnn(self.data.num_classes, self.width, self.norm))

    def train_counts(self, out: Step, batch: WebBatch) -> dict[str, Tensor]:
        return top1_counts(out.outputs, batch.truth)

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return top1_rate(counts, "train_top1")

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        out = {"test_top1": self.evaluate(module, "test", env)["top1"]}
        if len(self.data.val_images):
            out["val_top1"] = self.evaluate(module, "val", env)["top1"]
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "stage": "teacher", "model": f"tinycnn_w{self.width}", "norm": self.norm,
                "train_split": f"original ({len(self.images)} labelled images)"}
