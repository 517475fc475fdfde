"""Multimodal clip classification as a Task on the one Trainer.

The task trains one model (a modality's teacher, the fusion teacher, or the RGB student) on chosen
positions of the training split (`train_index`: the teachers' part, or all of it). Batch k is a
pure function of (seed, k) (`stream_batch`); the clip augmentation, a random spatial shift of up
to `shift` px, is a pure function of (seed, epoch, index) and is the *same* for every visual
modality of a clip, so teachers and student see one aligned, identically augmented clip
("consistent teaching"). The module's forward returns the label loss (`ce`, weight `a_gt`) plus
whatever a method adds (`extra_losses`, e.g. distillation from a teacher ensemble).

Evaluation (eval mode, no augmentation): top-1 (%), ECE (%, 15 bins, torchmetrics) and NLL on
`val` after every epoch (curves and the `best` checkpoint) and, once, on `val` and `test` with
the final weights for result.json. `draw` writes a reliability diagram of the test split and one
test clip's modalities with the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Task, TaskModule, rank_share, seeded_generator, stream_batch, top1_counts, top1_rate
from kdforge.tasks.video.data import ClipData
from kdforge.tasks.video.metrics import calibration_error, reliability, top1
from kdforge.train.distributed import DistEnv

__all__ = ["ClipBatch", "ClipModule", "ClipTask", "clip_logits", "shift_clips"]


@dataclass
class ClipBatch:
    inputs: dict[str, Tensor]        # modality -> (B, ...) float clips, aligned and identically augmented
    target: Tensor                   # the training labels (annotation noise included)
    index: Tensor                    # positions in the training split


def shift_clips(inputs: dict[str, Tensor], index: Tensor, epoch: int, seed: int, shift: int) -> dict[str, Tensor]:
    """Every visual modality (B, C, T, H, W) of clip i rolled by the same (dy, dx) in [-shift, shift],
    a pure function of (seed, epoch, index[i]); spectrograms stay as they are."""
    if shift <= 0:
        return inputs
    offsets = torch.stack([torch.randint(-shift, shift + 1, (2,), generator=seeded_generator(seed, 41, epoch, int(i)))
                           for i in index.tolist()])
    out = {}
    for name, x in inputs.items():
        if x.dim() != 5:
            out[name] = x
            continue
        out[name] = torch.stack([torch.roll(x[j], (int(offsets[j, 0]), int(offsets[j, 1])), (2, 3))
                                 for j in range(len(x))])
    return out


@torch.no_grad()
def clip_logits(model: nn.Module, data: ClipData, device: torch.device, index: Tensor | None = None,
                batch_size: int = 256) -> Tensor:
    """`model`'s logits (CPU) on `data` (or its positions `index`), in eval mode, no augmentation."""
    was = model.training
    model.eval()
    positions = torch.arange(len(data)) if index is None else index
    out = []
    try:
        for start in range(0, len(positions), batch_size):
            pick = positions[start:start + batch_size]
            out.append(model({k: v[pick].to(device) for k, v in data.modalities.items()}).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


class ClipModule(TaskModule):
    """A trainable clip model (`student`) with the label loss; methods add terms in `extra_losses`."""

    def __init__(self, student: nn.Module, a_gt: float = 1.0) -> None:
        super().__init__()
        self.student = student
        self.a_gt = a_gt

    def eval_model(self) -> nn.Module:
        return self.student

    def extra_losses(self, batch: ClipBatch, logits: Tensor) -> dict[str, Tensor]:
        """Method-specific terms (name -> weighted loss), all in the `distill` group."""
        return {}

    def forward(self, batch: ClipBatch) -> Step:
        logits = self.student(batch.inputs)
        losses, groups = {}, {}
        if self.a_gt:
            losses["ce"], groups["ce"] = self.a_gt * F.cross_entropy(logits, batch.target), "task"
        for name, value in self.extra_losses(batch, logits).items():
            losses[name], groups[name] = value, "distill"
        if not losses:
            raise KdforgeError("the clip model has no loss: set a_gt > 0 or add a distillation term")
        return Step(outputs=logits, losses=losses, groups=groups)


class ClipTask(Task):
    """Train a `ClipModule` on `train[train_index]`; evaluate on `val` (every epoch) and `test` (once)."""

    name = "video"
    eval_split = "val"
    selection_metric = "top1"

    def __init__(self, module: ClipModule, train: ClipData, val: ClipData, test: ClipData, batch_size: int,
                 seed: int = 0, train_index: Tensor | None = None, shift: int = 2, bins: int = 15,
                 extra_result: dict[str, Any] | None = None, describe: dict[str, Any] | None = None) -> None:
        self.module, self.train, self.val, self.test = module, train, val, test
        self.train_index = torch.arange(len(train)) if train_index is None else train_index
        if len(self.train_index) < 1:
            raise KdforgeError("the clip task has no training clips")
        self.batch_size, self.seed, self.shift, self.bins = batch_size, seed, shift, bins
        self.extra_result = dict(extra_result or {})
        self._describe = dict(describe or {})
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return self.module.to(device)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_index) // self.batch_size)

    def batch(self, epoch: int, step: int, env: DistEnv) -> ClipBatch:
        k = epoch * self.steps_per_epoch() + step
        pos = rank_share(stream_batch(len(self.train_index), self.batch_size, k, self.seed, 43), env)
        index = self.train_index[pos]
        inputs = shift_clips({m: v[index] for m, v in self.train.modalities.items()}, index, epoch, self.seed,
                             self.shift)
        return ClipBatch({m: v.to(self.device) for m, v in inputs.items()}, self.train.labels[index].to(self.device),
                         index.to(self.device))

    def train_counts(self, out: Step, batch: ClipBatch) -> dict[str, Tensor]:
        return top1_counts(out.outputs, batch.target)

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return top1_rate(counts)

    def split(self, name: str) -> ClipData:
        if name not in ("train", "val", "test"):
            raise KdforgeError(f"unknown clip split {name!r} (train, val or test)")
        return getattr(self, name)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = self.split(split)
        logits = clip_logits(module.eval_model(), data, self.device)
        target = data.true_labels
        return {"top1": top1(logits, target), "ece": calibration_error(logits, target, self.bins),
                "nll": float(F.cross_entropy(logits, target))}

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split in ("test", "val"):
            out.update({f"{split}_{k}": v for k, v in self.evaluate(module, split, env).items()})
        return {**out, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "train_clips": len(self.train_index), "val_clips": len(self.val),
                "test_clips": len(self.test), "classes": self.train.num_classes, **self._describe}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Reliability diagram of the test split, and one test clip's modalities with its prediction."""
        from kdforge.plotting import pyplot, save_png

        model = module.eval_model()
        logits = clip_logits(model, self.test, self.device)
        target = self.test.true_labels
        rel = reliability(logits, target, self.bins)
        plt = pyplot()
        fig = plt.figure(figsize=(9.0, 3.6))
        ax = fig.add_axes((0.07, 0.13, 0.33, 0.72))
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins
        filled = rel["count"] > 0
        ax.bar(centres[filled].numpy(), rel["accuracy"][filled].numpy(), width=1 / self.bins, edgecolor="k",
               alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(rel["confidence"][filled].numpy(), rel["accuracy"][filled].numpy(), "r.", label="(confidence, acc)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ece = calibration_error(logits, target, self.bins)
        ax.set_title(f"test: top-1 {top1(logits, target):.1f}%, ECE {ece:.1f}%", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        i = 0
        pred = int(logits[i].argmax())
        names = self.test.names or [str(c) for c in range(self.test.num_classes)]
        strips = []         # one image row per modality: its frames side by side (one imshow each: fast)
        mods = self.test.modalities
        if "rgb" in mods:
            rgb = (mods["rgb"][i] * 0.3 + 0.5).clamp(0, 1)                       # (3, T, H, W)
            strips.append(("rgb frames", torch.cat(list(rgb.permute(1, 2, 3, 0)), 1).numpy(), None))
        if "flow" in mods:
            flow = mods["flow"][i].norm(dim=0)                                     # (T, H, W)
            strips.append(("|flow|", torch.cat(list(flow), 1).numpy(), "magma"))
        if "audio" in mods:
            strips.append(("audio", mods["audio"][i, 0].numpy(), "viridis"))
        for row, (label, image, cmap) in enumerate(strips):
            a = fig.add_axes((0.46, 0.62 - 0.27 * row, 0.52, 0.22))
            a.imshow(image, cmap=cmap, aspect="auto", origin="lower" if label == "audio" else "upper")
            a.set_xticks([])
            a.set_yticks([])
            a.set_ylabel(label, fontsize=7)
        fig.suptitle(f"test clip 0: true {names[int(target[i])]}, predicted {names[pred]} (the model sees "
                     f"{', '.join(getattr(model, 'modalities', ('?',)))})", fontsize=9)
        save_png(fig, path, dpi=80)
        return True
