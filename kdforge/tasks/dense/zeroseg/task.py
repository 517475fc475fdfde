"""Zero-shot segmentation by CLIP vision-encoder distillation (ZeroSeg) as a Task on the one Trainer.

Training reads unlabelled canvases only: batch k is `stream_batch` positions of the training
canvases (a pure function of seed and step), their normalised pixels, the cached teacher view
embeddings of those canvases and, when the MAE branch is on, the visible patch positions (drawn
from a generator seeded by (seed, step), so a resumed run masks the same patches). `ZeroSegModule`
returns the weighted losses: `global` (multi-scale global L1 over the views of `global_grids`),
`match` (segment matching L1 against the cells of `match_grids`), `rec` (MSE on masked patches).

Evaluation (no masking): each segment token is labelled by its most similar class text embedding
(cosine; the teacher's text tower on the prompts "a <colour> <shape>"), every pixel takes the label
of the segment that owns it, and pixels whose segment's best cosine is below a threshold are
background. The threshold is chosen on the validation canvases (the candidate giving the best
validation mIoU), then applied to the test canvases: `test_miou` (%, background + 25 classes,
`kdforge.tasks.dense.metrics.miou`). Nothing is evaluated during training; the final weights count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.zeroseg import multiscale_global_l1, segment_matching_l1
from kdforge.tasks.base import SampledTask, TaskModule, seeded_generator
from kdforge.tasks.dense.metrics import miou
from kdforge.tasks.dense.zeroseg.canvases import BACKGROUND, Canvases, num_classes
from kdforge.tasks.dense.zeroseg.student import ZeroSegStudent, patchify
from kdforge.tasks.dense.zeroseg.views import encode_views, grid_boxes, single_object_cells, view_grid
from kdforge.tasks.vision_language.models import pixels
from kdforge.train.distributed import DistEnv

__all__ = ["NO_BACKGROUND", "LossSwitches", "ZeroSegBatch", "ZeroSegModule", "ZeroSegTask", "apply_threshold",
           "choose_threshold", "class_palette", "label_pixels", "view_positions"]

NO_BACKGROUND = -2.0        # a threshold below every cosine: no pixel is background


@dataclass
class LossSwitches:
    """Which ZeroSeg terms train, and on which views: the card's ablation arms are settings of these."""

    global_weight: float = 1.0
    global_grids: list[int] = field(default_factory=lambda: [1, 2, 3, 4])   # [1]: the ablation base
    match_weight: float = 1.0
    match_grids: list[int] = field(default_factory=lambda: [2, 3, 4])       # never 1 (the full image)
    rec_weight: float = 1.0
    mask_ratio: float = 0.6


def view_positions(cached: Sequence[int], wanted: Sequence[int]) -> Tensor:
    """Positions, among the cached views of grids `cached`, of the views of grids `wanted`."""
    missing = set(wanted) - set(cached)
    if missing:
        raise ConfigError(f"zeroseg: grids {sorted(missing)} are not among the teacher's views {list(cached)}")
    grid_of = view_grid(cached)
    return torch.cat([(grid_of == g).nonzero().flatten() for g in wanted]) if wanted else torch.zeros(0).long()


@dataclass
class ZeroSegBatch:
    pixel_values: Tensor       # (B, 3, S, S) normalised
    views: Tensor              # (B, n, E) cached, L2-normalised teacher view embeddings
    keep: Tensor | None        # (B, k) visible patch positions, sorted; None: no masking
    index: Tensor


class ZeroSegModule(TaskModule):
    """The student and ZeroSeg's losses (both sides L2-normalised before the L1 terms)."""

    def __init__(self, student: ZeroSegStudent, switches: LossSwitches, cached_grids: Sequence[int]) -> None:
        super().__init__()
        s = switches
        if s.match_weight and 1 in s.match_grids:
            raise ConfigError("zeroseg.match_grids must not hold 1: the full-image view is not a matching "
                              "candidate (segments would collapse onto the global concept)")
        if s.rec_weight and not s.mask_ratio:
            raise ConfigError("zeroseg.rec_weight > 0 needs zeroseg.mask_ratio > 0 (nothing to reconstruct)")
        if s.rec_weight and student.decoder is None:
            raise ConfigError("zeroseg.rec_weight > 0 needs a student built with an MAE decoder")
        if not (s.global_weight or s.match_weight):
            raise ConfigError("zeroseg: global_weight and match_weight are both 0 (nothing is distilled)")
        self.student, self.switches = student, s
        self.register_buffer("global_index", view_positions(cached_grids, s.global_grids if s.global_weight else ()),
                             persistent=False)
        self.register_buffer("match_index", view_positions(cached_grids, s.match_grids if s.match_weight else ()),
                             persistent=False)

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: ZeroSegBatch) -> Step:
        s = self.switches
        out = self.student(batch.pixel_values, batch.keep)
        g = F.normalize(out.segments, dim=-1)
        z = F.normalize(out.image, dim=-1)
        losses: dict[str, Tensor] = {}
        groups: dict[str, str] = {}
        if s.global_weight:
            losses["global"] = s.global_weight * multiscale_global_l1(z, batch.views[:, self.global_index])
            groups["global"] = "distill"
        if s.match_weight:
            losses["match"] = s.match_weight * segment_matching_l1(g, batch.views[:, self.match_index])
            groups["match"] = "distill"
        if s.rec_weight and batch.keep is not None:
            pred = self.student.reconstruct(out.tokens, batch.keep)
            target = patchify(batch.pixel_values, self.student.patch)
            masked = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
            masked.scatter_(1, batch.keep, False)
            losses["rec"] = s.rec_weight * ((pred - target) ** 2).mean(-1)[masked].mean()
            groups["rec"] = "task"
        return Step(outputs=z.detach(), losses=losses, groups=groups)


@torch.no_grad()
def label_pixels(student: ZeroSegStudent, images_uint8: Tensor, text: Tensor, device: torch.device,
                 chunk: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """(class 0..C-1, best cosine, segment) of every pixel, each (N, S, S): the pixel's segment's label."""
    was = student.training
    student.eval()
    labels, scores, owners = [], [], []
    text = F.normalize(text.float(), dim=-1).to(device)
    try:
        for s in range(0, len(images_uint8), chunk):
            x = pixels(images_uint8[s:s + chunk]).to(device)
            out = student(x)
            sims = F.normalize(out.segments, dim=-1) @ text.T              # (b, m, C)
            best, cls = sims.max(-1)                                       # (b, m)
            owner = student.pixel_groups(out.assignments, x.shape[-1]).argmax(1)     # (b, S, S)
            labels.append(cls.gather(1, owner.flatten(1)).view_as(owner).cpu())
            scores.append(best.gather(1, owner.flatten(1)).view_as(owner).cpu())
            owners.append(owner.cpu())
    finally:
        student.train(was)
    return torch.cat(labels), torch.cat(scores), torch.cat(owners)


def class_palette() -> Tensor:
    """(26, 3) display colours: background dark grey, each class its colour, a shade per shape."""
    from kdforge.tasks.vision_language.data import _RGB, SHAPES

    shade = torch.linspace(1.0, 0.55, len(SHAPES))
    rows = [torch.tensor([0.15, 0.15, 0.15])]
    rows += [_RGB[c] * shade[s] for c in range(len(_RGB)) for s in range(len(SHAPES))]
    return torch.stack(rows).clamp(0, 1)


def apply_threshold(labels: Tensor, scores: Tensor, theta: float) -> Tensor:
    """Class masks: background where the best cosine is below `theta`, else 1 + the label."""
    return torch.where(scores < theta, torch.full_like(labels, BACKGROUND), labels + 1)


def choose_threshold(labels: Tensor, scores: Tensor, masks: Tensor, classes: int,
                     candidates: int = 41) -> tuple[float, float]:
    """(theta, mIoU): the background threshold with the best mIoU on these (validation) pixels.

    Candidates: NO_BACKGROUND and the 0, 2.5, ..., 100 % quantiles of the pixels' cosines."""
    flat = scores.flatten().float()
    flat = flat[::max(1, len(flat) // 2_000_000)]                  # torch.quantile takes at most 16M values
    qs = torch.quantile(flat, torch.linspace(0, 1, candidates)).tolist()
    best = (NO_BACKGROUND, miou(apply_threshold(labels, scores, NO_BACKGROUND), masks, classes))
    for theta in sorted(set(qs)):
        value = miou(apply_threshold(labels, scores, theta), masks, classes)
        if value > best[1]:
            best = (float(theta), value)
    return best


class ZeroSegTask(SampledTask):
    """ZeroSeg training on canvases; zero-shot mIoU with the background threshold chosen on val."""

    name = "zeroseg"
    stream = 31
    ddp_note = "the teacher's view cache and the threshold search are built for one process; run it in one process"

    def __init__(self, module: ZeroSegModule, splits: dict[str, Canvases], teacher: nn.Module, text: Tensor,
                 grids: Sequence[int], batch_size: int, seed: int = 0,
                 extra_result: dict[str, Any] | None = None) -> None:
        """`teacher`: the CLIP whose image tower gives the views; `text`: (C, E) class embeddings from
        its text tower; `grids`: the view grids cached for training (the 1x1 full view first)."""
        missing = {"train", "val", "test"} - splits.keys()
        if missing:
            raise KdforgeError(f"zeroseg task: missing splits {sorted(missing)}")
        if text.dim() != 2 or text.shape[1] != module.student.proj.out_features:
            raise KdforgeError(f"zeroseg task: class embeddings {tuple(text.shape)} do not match the student's "
                               f"embedding size {module.student.proj.out_features}")
        self.module, self.splits, self.teacher, self.text = module, splits, teacher, text
        self.grids, self.batch_size, self.seed = tuple(grids), batch_size, seed
        self.extra_result = dict(extra_result or {})
        self.classes = num_classes()
        self.theta: float | None = None
        self.views: Tensor | None = None
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        if self.views is None:
            self.views = encode_views(self.teacher, self.splits["train"].images, self.grids, device=device)
        return self.module.to(device)

    @property
    def train(self) -> Any:
        """The training split (what SampledTask draws batches from)."""
        return self.splits["train"]

    def batch(self, epoch: int, step: int, env: DistEnv) -> ZeroSegBatch:
        train = self.splits["train"]
        k = epoch * self.steps_per_epoch() + step
        idx = self.batch_index(epoch, step, env)
        keep = None
        ratio = self.module.switches.mask_ratio
        if ratio > 0:
            patches = self.module.student.grid ** 2
            visible = max(1, round(patches * (1 - ratio)))
            noise = torch.rand(len(idx), patches, generator=seeded_generator(self.seed, 37, k))
            keep = noise.argsort(1)[:, :visible].sort(1).values.to(self.device)
        return ZeroSegBatch(pixels(train.images[idx]).to(self.device), self.views[idx].to(self.device), keep,
                            idx.to(self.device))

    def predictions(self, module: nn.Module, split: str) -> tuple[Tensor, Tensor, Tensor]:
        return label_pixels(module.eval_model(), self.splits[split].images, self.text, self.device)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        """mIoU of `split` at the chosen threshold (chosen on val first if not yet), and with no background."""
        if self.theta is None:
            self.choose(module)
        labels, scores, owners = self.predictions(module, split)
        masks = self.splits[split].masks
        pred = apply_threshold(labels, scores, self.theta)
        used = torch.tensor([len(o.unique()) for o in owners], dtype=torch.float32)
        return {"miou": miou(pred, masks, self.classes), "segments_per_image": float(used.mean()),
                "pixel_acc": 100.0 * float((pred == masks).float().mean()),
                "miou_no_background": miou(apply_threshold(labels, scores, NO_BACKGROUND), masks, self.classes)}

    def choose(self, module: nn.Module) -> float:
        labels, scores, _ = self.predictions(module, "val")
        self.theta, self.val_miou = choose_threshold(labels, scores, self.splits["val"].masks, self.classes)
        return self.theta

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        self.choose(module)
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        out.update({"val_miou": self.val_miou, "theta": self.theta, **self.teacher_cells("test")})
        return {**out, **self.extra_result}

    @torch.no_grad()
    def teacher_cells(self, split: str) -> dict[str, Any]:
        """The premise: the teacher's zero-shot accuracy on the grid cells that hold one whole object
        (>= 90 % of its pixels) and nothing else (no other object with 16 pixels or more)."""
        data = self.splits[split]
        local = [g for g in self.grids if g > 1]
        samples, view, label = single_object_cells(data.instances, data.masks, local, min_share=0.9)
        if not len(samples):
            return {"teacher_cell_top1": None, "teacher_cells": 0}
        v = encode_views(self.teacher, data.images, local, device=self.device)[samples, view]
        pred = (v @ F.normalize(self.text.float(), dim=-1).T.to(v.device)).argmax(1).cpu()
        by_grid = view_grid(local)[view]
        out = {"teacher_cell_top1": 100.0 * float((pred == label).float().mean()), "teacher_cells": len(samples)}
        for g in local:
            sel = by_grid == g
            if sel.any():
                out[f"teacher_cell_top1_{g}x{g}"] = 100.0 * float((pred[sel] == label[sel]).float().mean())
        return out

    def describe(self) -> dict[str, Any]:
        c = self.module.student.tower.config
        return {"task": self.name, "canvases": {k: len(v) for k, v in self.splits.items()},
                "views": len(grid_boxes(int(self.splits["train"].images.shape[-1]), self.grids)),
                "student": {"width": c.hidden_size, "tower_depths": list(c.depths), "patch": c.patch_size,
                            "grouping": "groupvit" if self.module.student.head is None else "pooled",
                            "segments": self.module.student.num_segments}}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Six test canvases: the image, the ground truth, the segments and the zero-shot prediction."""
        from kdforge.plotting import pyplot, save_png
        from kdforge.tasks.vision_language.data import class_prompts

        if self.theta is None:
            self.choose(module)
        test = self.splits["test"]
        count = min(6, len(test))
        labels, scores, owners = label_pixels(module.eval_model(), test.images[:count], self.text, self.device)
        pred = apply_threshold(labels, scores, self.theta)
        names = ["background", *class_prompts()[0]]
        palette = class_palette()
        plt = pyplot()
        fig, axes = plt.subplots(4, count, figsize=(1.9 * count, 8.2), squeeze=False)
        for j in range(count):
            axes[0, j].imshow(test.images[j].permute(1, 2, 0).numpy())
            axes[1, j].imshow(palette[test.masks[j]].numpy(), interpolation="nearest")
            axes[2, j].imshow(owners[j].numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            axes[3, j].imshow(palette[pred[j]].numpy(), interpolation="nearest")
            truth = sorted({names[int(c)] for c in test.masks[j].unique() if c != BACKGROUND})
            guess = sorted({names[int(c)] for c in pred[j].unique() if c != BACKGROUND})
            axes[1, j].set_title("\n".join(truth), fontsize=6)
            axes[3, j].set_xlabel("\n".join(guess[:4]), fontsize=6)
            for ax in axes[:, j]:
                ax.set_xticks([])
                ax.set_yticks([])
        for ax, name in zip(axes[:, 0], ("image", "ground truth", "segments", "prediction")):
            ax.set_ylabel(name, fontsize=8)
        fig.suptitle(f"test canvases: ground truth, the student's segments and its zero-shot labels (colour = class "
                     f"colour, darker = later shape; background below cos {self.theta:.2f}, chosen on val)", fontsize=7)
        fig.tight_layout()
        save_png(fig, path, dpi=70)
        return True
