"""Unsupervised anomaly detection as a Task on the one Trainer: teacher-student reverse distillation.

Training sees normal images only (seeded, index-addressable batches, no augmentation, as RD).
The module's forward returns the per-scale cosine distillation loss (`kd`, mean over positions
of 1 - cos, summed over scales) plus whatever a method adds (`extra_losses`). Evaluation after
training on the test split: the anomaly map (sum over scales of upsampled 1 - cos, Gaussian
sigma 4), image AUROC from its maximum, pixel AUROC over every test pixel (both scikit-learn),
and the raw map's mean inside defects and on defect-free pixels. Nothing is selected on the test
split (no per-epoch evaluation). `draw` writes test images, their masks and anomaly maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.tasks.anomaly.data import AnomalyData
from kdforge.tasks.anomaly.metrics import anomaly_map, auroc, cosine_distance, gaussian_blur, region_errors
from kdforge.tasks.base import SampledTask, TaskModule
from kdforge.train.distributed import DistEnv

__all__ = ["AnomalyBatch", "AnomalyTask", "RDModule", "normalise", "rd_loss"]

MEAN, STD = 0.5, 0.25


def normalise(images: Tensor) -> Tensor:
    """uint8 images -> the float input of the teacher."""
    return (images.float() / 255 - MEAN) / STD


def rd_loss(students: list[Tensor], teachers: list[Tensor]) -> Tensor:
    """RD's distillation loss: per scale the mean over positions of 1 - cos(student, teacher), summed."""
    return sum(cosine_distance(s, t).mean() for s, t in zip(students, teachers, strict=True))


@dataclass
class AnomalyBatch:
    images: Tensor
    index: Tensor


class RDModule(TaskModule):
    """Frozen teacher encoder (`teachers`), trainable one-class bottleneck + reverse decoder (`student`)."""

    def __init__(self, teacher: nn.Module, bottleneck: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.teachers = nn.ModuleDict({"teacher": teacher})
        self.student = nn.ModuleDict({"bottleneck": bottleneck, "decoder": decoder})

    def features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher features, student reconstructions), finest scale first."""
        t = self.teachers["teacher"](x)
        return t, self.student["decoder"](self.student["bottleneck"](t))

    def extra_losses(self, batch: AnomalyBatch, teacher: list[Tensor], student: list[Tensor]) -> dict[str, Tensor]:
        """Method-specific terms (name -> weighted loss), all in the `distill` group."""
        return {}

    def forward(self, batch: AnomalyBatch) -> Step:
        t, s = self.features(batch.images)
        losses = {"kd": rd_loss(s, t), **self.extra_losses(batch, t, s)}
        return Step(outputs=s[-1].detach(), losses=losses, groups={k: "distill" for k in losses})


class AnomalyTask(SampledTask):
    name = "anomaly"

    def __init__(self, module: RDModule, train: AnomalyData, test: AnomalyData, batch_size: int, seed: int = 0,
                 sigma: float = 4.0, extra_result: dict[str, Any] | None = None) -> None:
        self.module, self.train, self.test = module, train, test
        self.batch_size, self.seed, self.sigma = batch_size, seed, sigma
        self.extra_result = dict(extra_result or {})
        self.size = int(train.images.shape[-1])
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return self.module.to(device)

    def batch(self, epoch: int, step: int, env: DistEnv) -> AnomalyBatch:
        idx = self.batch_index(epoch, step, env)
        return AnomalyBatch(normalise(self.train.images[idx]).to(self.device), idx.to(self.device))

    @torch.no_grad()
    def maps(self, module: nn.Module, images: Tensor) -> Tensor:
        """Raw (unsmoothed) anomaly maps (N, H, W) of uint8 `images`, in eval mode."""
        was = module.training
        module.eval()
        out = []
        for start in range(0, len(images), 64):
            t, s = module.features(normalise(images[start:start + 64]).to(self.device))
            out.append(anomaly_map(s, t, images.shape[-2:]).cpu())
        module.train(was)
        return torch.cat(out)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = {"train": self.train, "test": self.test}[split]
        raw = self.maps(module, data.images)
        smooth = gaussian_blur(raw, self.sigma)
        scores = smooth.flatten(1).max(1).values
        return {"image_auroc": auroc(data.labels, scores), "pixel_auroc": auroc(data.masks, smooth),
                **region_errors(raw, data.masks)}

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        return {**{f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "train_images": len(self.train), "test_images": len(self.test),
                "test_defective": int(self.test.labels.sum()), "sigma": self.sigma}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Two normal and six defective test images: the image, its mask, the smoothed anomaly map."""
        from kdforge.plotting import pyplot, save_png

        normal = (self.test.labels == 0).nonzero().flatten()[:2].tolist()
        bad = (self.test.labels == 1).nonzero().flatten()[:6].tolist()
        pick = normal + bad
        smooth = gaussian_blur(self.maps(module, self.test.images[pick]), self.sigma)
        top = float(gaussian_blur(self.maps(module, self.test.images), self.sigma).max())
        plt = pyplot()
        fig, axes = plt.subplots(3, len(pick), figsize=(1.6 * len(pick), 5.2), squeeze=False)
        for j, i in enumerate(pick):
            axes[0, j].imshow(self.test.images[i].permute(1, 2, 0).numpy())
            axes[0, j].set_title(self.test.kinds[i] if self.test.kinds else str(int(self.test.labels[i])), fontsize=8)
            axes[1, j].imshow(self.test.masks[i].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[2, j].imshow(smooth[j].numpy(), cmap="jet", vmin=0, vmax=top)
            axes[2, j].set_xlabel(f"max {float(smooth[j].max()):.3f}", fontsize=7)
            for ax in axes[:, j]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_ylabel("image", fontsize=8)
        axes[1, 0].set_ylabel("mask", fontsize=8)
        axes[2, 0].set_ylabel("anomaly map", fontsize=8)
        fig.suptitle("test images, defect masks and anomaly maps (one colour scale)", fontsize=9)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True
