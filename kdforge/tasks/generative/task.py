"""The three Tasks of SDD on the one Trainer: the DDPM, the attribute classifier, the guided manipulator.

Every batch is a pure function of (run seed, step): the images' order (`stream_batch`) and the
DDPM / SDS noise, timesteps and label dropout (`seeded_generator(seed, stream, k)`), so runs
resume exactly. Nothing is selected on the test split (no per-epoch evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.tasks.base import Task, TaskModule, seeded_generator, stream_batch, top1_counts, top1_rate
from kdforge.tasks.common import predict
from kdforge.tasks.generative.data import ORIENTATIONS, BarData
from kdforge.tasks.generative.diffusion import sample
from kdforge.tasks.generative.metrics import attribute_scores, edit_metrics
from kdforge.tasks.generative.models import Manipulator
from kdforge.tasks.generative.sds import sample_timesteps, sds_gradient, sds_loss
from kdforge.train.distributed import DistEnv

__all__ = ["ClassifierTask", "DDPMModule", "DDPMTask", "ManipulatorModule", "ManipulatorTask"]

_ONE_PROCESS = "its recipes are sized for one process (the demo trains on CPU)"


def _to(device: torch.device, *xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.to(device) for x in xs)


# --------------------------------------------------------------------------------------- DDPM


class _BarTask(Task):
    """What the three stages share: one process, the training bars, seeded batches of `batch_size`."""

    ddp_note = _ONE_PROCESS

    def __init__(self, module: nn.Module, train: BarData, batch_size: int, seed: int) -> None:
        self.module, self.train, self.batch_size, self.seed = module, train, batch_size, seed
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return self.module.to(device)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def step_index(self, epoch: int, step: int, stream: int) -> tuple[int, Tensor]:
        """(global step k, the training indices of batch k in this stage's `stream`)."""
        k = epoch * self.steps_per_epoch() + step
        return k, stream_batch(len(self.train), self.batch_size, k, self.seed, stream)


class DDPMModule(TaskModule):
    """A class-conditional UNet trained to predict the noise of x_t (epsilon objective)."""

    def __init__(self, unet: nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def eval_model(self) -> nn.Module:
        return self.unet

    def noise_loss(self, x0: Tensor, labels: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = self.unet(x_t, t, class_labels=labels).sample
        return F.mse_loss(pred, noise), pred

    def forward(self, batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> Step:
        loss, pred = self.noise_loss(*batch)
        return Step(outputs=pred.detach(), losses={"ddpm": loss}, groups={"ddpm": "task"})


class DDPMTask(_BarTask):
    """Train the UNet on all bars; labels dropped to the null class with `label_dropout` (classifier-free guidance).

    Result: the noise-prediction MSE on the test images (seeded t and noise) and, when a `judge`
    classifier is given, the share of guided samples it assigns to their conditioning class.
    """

    name = "ddpm"

    def __init__(self, module: DDPMModule, train: BarData, test: BarData, batch_size: int, seed: int,
                 classes: int, label_dropout: float, judge: nn.Module | None = None, sample_scale: float = 3.0,
                 sample_steps: int = 50, num_samples: int = 64) -> None:
        super().__init__(module, train, batch_size, seed)
        self.test, self.classes, self.label_dropout = test, classes, label_dropout
        self.judge, self.sample_scale = judge, sample_scale
        self.sample_steps, self.num_samples = sample_steps, num_samples

    def batch(self, epoch: int, step: int, env: DistEnv) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k, idx = self.step_index(epoch, step, 31)
        g = seeded_generator(self.seed, 32, k)
        steps = self.module.scheduler.config.num_train_timesteps
        t = torch.randint(steps, (len(idx),), generator=g)
        noise = torch.randn(self.train.images[idx].shape, generator=g)
        drop = torch.rand(len(idx), generator=g) < self.label_dropout
        labels = torch.where(drop, torch.full_like(self.train.labels[idx], self.classes), self.train.labels[idx])
        return _to(self.device, self.train.images[idx], labels, t, noise)

    @torch.no_grad()
    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = {"train": self.train, "test": self.test}[split]
        g = seeded_generator(self.seed, 33)
        steps = module.scheduler.config.num_train_timesteps
        t = torch.randint(steps, (len(data),), generator=g)
        noise = torch.randn(data.images.shape, generator=g)
        was = module.training
        module.eval()
        total = 0.0
        for s in range(0, len(data), 256):
            loss, _ = module.noise_loss(*_to(self.device, data.images[s:s + 256], data.labels[s:s + 256],
                                             t[s:s + 256], noise[s:s + 256]))
            total += float(loss) * len(t[s:s + 256])
        module.train(was)
        return {"ddpm_mse": total / len(data)}

    def samples(self, module: nn.Module, scale: float, per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(self.classes).repeat_interleave(per_class)
        imgs = sample(module.unet, module.scheduler, labels, self.classes, scale, self.train.images.shape[-1],
                      self.seed, steps=self.sample_steps)
        return imgs.cpu(), labels

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        if self.judge is not None:
            per = max(1, self.num_samples // self.classes)
            for name, scale in (("sample_success", self.sample_scale), ("sample_success_unguided", 1.0)):
                imgs, labels = self.samples(module, scale, per)
                hits = [attribute_scores(self.judge, imgs[labels == c], c)[0] for c in range(self.classes)]
                out[name] = 100.0 * float(torch.cat(hits).float().mean())
            out["sample_scale"] = self.sample_scale
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "train_images": len(self.train), "test_images": len(self.test),
                "unet_params": sum(p.numel() for p in self.module.unet.parameters()),
                "timesteps": int(self.module.scheduler.config.num_train_timesteps)}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Guided samples of each class (one row per class)."""
        from kdforge.plotting import pyplot, save_png

        per = 8
        imgs, _ = self.samples(module, self.sample_scale, per)
        plt = pyplot()
        fig, axes = plt.subplots(self.classes, per, figsize=(1.1 * per, 1.2 * self.classes), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.imshow(imgs[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        for c in range(self.classes):
            axes[c, 0].set_ylabel(ORIENTATIONS[c] if c < len(ORIENTATIONS) else str(c), fontsize=8)
        fig.suptitle(f"DDPM samples, classifier-free guidance scale {self.sample_scale:g}", fontsize=9)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True


# --------------------------------------------------------------------------------- classifier


class ClassifierModule(TaskModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def eval_model(self) -> nn.Module:
        return self.net

    def forward(self, batch: tuple[Tensor, Tensor]) -> Step:
        x, y = batch
        logits = self.net(x)
        return Step(outputs=logits, losses={"ce": F.cross_entropy(logits, y)}, groups={"ce": "task"})


class ClassifierTask(_BarTask):
    """The attribute classifier (cross-entropy on the bars, Gaussian pixel noise `noise` as augmentation)."""

    name = "attribute_classifier"

    def __init__(self, net: nn.Module, train: BarData, test: BarData, batch_size: int, seed: int,
                 noise: float = 0.1) -> None:
        super().__init__(ClassifierModule(net), train, batch_size, seed)
        self.test, self.noise = test, noise

    def batch(self, epoch: int, step: int, env: DistEnv) -> tuple[Tensor, Tensor]:
        k, idx = self.step_index(epoch, step, 51)
        x = self.train.images[idx]
        x = x + self.noise * torch.randn(x.shape, generator=seeded_generator(self.seed, 52, k))
        return _to(self.device, x, self.train.labels[idx])

    def train_counts(self, out: Step, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        return top1_counts(out.outputs, batch[1])

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return top1_rate(counts)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = {"train": self.train, "test": self.test}[split]
        logits = predict(module.net, data.images.to(self.device), batch_size=256).cpu()
        return {"top1": 100.0 * float((logits.argmax(1) == data.labels).float().mean())}


# -------------------------------------------------------------------------------- manipulator


class ManipulatorModule(TaskModule):
    """Trainable manipulator (`student`); frozen UNet and classifier (`teachers`).

    Losses per batch of B images: `sds` = sum_i 0.5 ||y_i - sg(y_i - g_i)||^2 / B (gradient g_i / B
    on each edited image y_i) and `reg` = reg_weight * sum_i ||delta(x_i)||^2 / B.
    """

    def __init__(self, manipulator: Manipulator, unet: nn.Module, classifier: nn.Module, alphas_cumprod: Tensor,
                 target: int, null: int, guidance_scale: float, reg_weight: float, topk: int = 0) -> None:
        super().__init__()
        self.student = manipulator
        self.teachers = nn.ModuleDict({"unet": unet.requires_grad_(False),
                                       "classifier": classifier.requires_grad_(False)})
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone().float(), persistent=False)
        self.target, self.null, self.guidance_scale = target, null, guidance_scale
        self.reg_weight, self.topk = reg_weight, topk

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: tuple[Tensor, Tensor, Tensor]) -> Step:
        x, t, noise = batch
        delta = self.student.delta(x)
        y = x + delta
        target = torch.full((len(x),), self.target, dtype=torch.long, device=x.device)
        g = sds_gradient(self.teachers["unet"], self.alphas_cumprod, y.detach(), t, noise, target, self.null,
                         self.guidance_scale, self.topk)
        losses = {"sds": sds_loss(y, g) / len(x), "reg": self.reg_weight * delta.pow(2).sum() / len(x)}
        return Step(outputs=y.detach(), losses=losses, groups={"sds": "distill", "reg": "task"})


class ManipulatorTask(_BarTask):
    """Train the manipulator on source-attribute images under SDS at timesteps drawn from `candidates`."""

    name = "sdd_manipulator"

    def __init__(self, module: ManipulatorModule, train: BarData, splits: dict[str, BarData], candidates: list[int],
                 batch_size: int, seed: int, extra_result: dict[str, Any] | None = None) -> None:
        super().__init__(module, train, batch_size, seed)
        self.splits, self.candidates = splits, candidates
        self.extra_result = dict(extra_result or {})

    def batch(self, epoch: int, step: int, env: DistEnv) -> tuple[Tensor, Tensor, Tensor]:
        k, idx = self.step_index(epoch, step, 41)
        g = seeded_generator(self.seed, 42, k)
        t = sample_timesteps(self.candidates, len(idx), g)
        noise = torch.randn(self.train.images[idx].shape, generator=g)
        return _to(self.device, self.train.images[idx], t, noise)

    @torch.no_grad()
    def edit(self, module: nn.Module, images: Tensor) -> Tensor:
        """The manipulator's edits of `images`, clamped to the image range."""
        was = module.training
        module.eval()
        out = torch.cat([module.student(x.to(self.device)).cpu() for x in images.split(256)])
        module.train(was)
        return out.clamp(-1, 1)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = self.splits[split]
        return edit_metrics(module.teachers["classifier"], data.images, self.edit(module, data.images),
                            module.target)

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        if "val" in self.splits:
            out.update({f"val_{k}": v for k, v in self.evaluate(module, "val", env).items()})
        return {**out, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "train_images": len(self.train), "timesteps": self.candidates,
                "manipulator_params": sum(p.numel() for p in self.module.student.parameters())}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Eight test inputs (top) and their edits (bottom) with the classifier's target probability."""
        from kdforge.plotting import pyplot, save_png

        x = self.splits["test"].images[:8]
        y = self.edit(module, x)
        _, prob = attribute_scores(module.teachers["classifier"], y, module.target)
        plt = pyplot()
        fig, axes = plt.subplots(2, len(x), figsize=(1.1 * len(x), 2.6), squeeze=False)
        for j in range(len(x)):
            axes[0, j].imshow(x[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[1, j].imshow(y[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[1, j].set_xlabel(f"p={float(prob[j]):.2f}", fontsize=7)
            for ax in axes[:, j]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_ylabel("input", fontsize=8)
        axes[1, 0].set_ylabel("edit", fontsize=8)
        fig.suptitle("manipulator edits (p = classifier's probability of the target attribute)", fontsize=8)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True
