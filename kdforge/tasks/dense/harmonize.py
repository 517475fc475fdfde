"""Image harmonization as a Task on the one Trainer: composite + foreground mask -> harmonized image.

`HarmonizationNet` is the dense package's UNet (`models.Encoder` / `UNetDecoder` / `Head`) with a
4-channel input (the normalised composite and the 0/1 mask) and a 3-channel head whose output is
added to the composite inside the mask only:

    I_hat = I_c + M * head(decoder(encoder([I_c, M])))        (normalised space; head zero-initialised)

so the untrained network returns the composite and the background is copied exactly (the usual
mask blending of harmonization networks). Optionally a `GlobalGuidedTransform` follows encoder
stages (GiftNet's globally guided feature transformation, card p17, reconstructed): per-channel
(gamma, beta) predicted by an MLP from globally pooled features, applied to the foreground only,

    g = MLP(GAP_bg(F))            (guidance: background)   or   MLP([GAP_bg(F), GAP_fg(F)]) (both)
    F' = m * ((1 + g_gamma) * F + g_beta) + (1 - m) * F      m: the mask area-pooled to the stage

(last MLP layer zero-initialised: the identity at the start). The decoder reads the transformed
stages as skips.

`HarmonizationModule` trains it with the foreground-normalised MSE of iSSAM (Sofiiuk et al. 2021)

    L_rec = mean_b sum_{c,p} (I_hat - I_r)^2 / (C * max(|M_b|, min_area * H * W))

and, with `lambda_rd` > 0, GiftNet's relation distillation (`kdforge.losses.giftnet`): the real
image I_r goes through the same network (no gradient; batch-norm uses the real batch's statistics
without updating its running statistics) and the foreground-background cosine relations of the
composite's (transformed) encoder features are matched to the real image's. Inference uses the
composite only.

`HarmonizationTask` evaluates a split with the iHarmony4 practice (`metrics.harmony_*`, 0..255
images, per-image means): MSE, fMSE, PSNR, fMSE binned by foreground ratio (0-5 %, 5-15 %,
15-100 %), and the relation gap (mean L1 between the composite's and the real image's relation
matrices at the distillation levels, eval mode). `result` adds the same metrics of the input
composite itself (`test_input_*`: what doing nothing scores) and `test_fmse_vs_input`, the ratio of the
two fMSEs (< 1: the composite was improved). `draw` writes rows composite |
prediction | real | mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.losses.giftnet import relation_distill_loss, relation_gap
from kdforge.tasks.base import SampledTask, TaskModule, seeded_generator
from kdforge.tasks.dense.composites import HarmonizationData
from kdforge.tasks.dense.metrics import harmony_fmse, harmony_metrics
from kdforge.tasks.dense.models import Encoder, Head, UNetDecoder
from kdforge.tasks.dense.task import MEAN, STD, normalise
from kdforge.train.distributed import DistEnv

__all__ = ["FG_BINS", "GUIDANCE", "GlobalGuidedTransform", "HarmonizationModule", "HarmonizationNet",
           "HarmonizationTask", "HarmonyBatch", "fn_mse", "harmony_split_metrics", "level_index", "to_pixels"]

GUIDANCE = ("background", "both")
FG_BINS = ((0.0, 0.05, "fg0_5"), (0.05, 0.15, "fg5_15"), (0.15, 1.01, "fg15_100"))


def level_index(name: str, depth: int) -> int:
    """'enc3' -> 2 (0-based encoder stage), one line for other names."""
    names = [f"enc{i + 1}" for i in range(depth)]
    if name not in names:
        raise KdforgeError(f"harmonization: unknown encoder level {name!r}; known: {', '.join(names)}")
    return names.index(name)


def to_pixels(x: Tensor) -> Tensor:
    """Normalised network images -> float 0..255 (clamped)."""
    return ((x.float() * STD + MEAN) * 255).clamp(0, 255)


def _area_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    m = mask.float()
    return F.adaptive_avg_pool2d(m, size) if tuple(m.shape[-2:]) != tuple(size) else m


class GlobalGuidedTransform(nn.Module):
    """F' = m ((1 + gamma) F + beta) + (1 - m) F with (gamma, beta) = MLP(global pooled features)."""

    def __init__(self, channels: int, guidance: str = "background") -> None:
        super().__init__()
        if guidance not in GUIDANCE:
            raise KdforgeError(f"global guided transform: guidance must be one of {', '.join(GUIDANCE)}, "
                               f"got {guidance!r}")
        self.guidance = guidance
        cin = channels * (1 if guidance == "background" else 2)
        self.mlp = nn.Sequential(nn.Linear(cin, channels), nn.ReLU(inplace=True), nn.Linear(channels, 2 * channels))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def params(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """(gamma, beta), each (B, C): the MLP of the masked global averages."""
        bg = 1 - m
        g = [(x * bg).sum((2, 3)) / bg.sum((2, 3)).clamp_min(1e-6)]
        if self.guidance == "both":
            g.append((x * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6))
        gamma, beta = self.mlp(torch.cat(g, 1)).chunk(2, dim=1)
        return gamma, beta

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = _area_mask(mask, tuple(x.shape[-2:])).to(x.dtype)
        gamma, beta = self.params(x, m)
        moved = (1 + gamma[:, :, None, None]) * x + beta[:, :, None, None]
        return m * moved + (1 - m) * x


class HarmonizationNet(nn.Module):
    """UNet on [composite, mask] -> the composite plus a masked residual; optional global guided transforms."""

    def __init__(self, width: int = 8, depth: int = 4, transform_levels: Sequence[str] = (),
                 guidance: str = "background") -> None:
        super().__init__()
        if width < 1 or not 2 <= depth <= 5:
            raise KdforgeError(f"HarmonizationNet needs width >= 1 and 2 <= depth <= 5, got {width}, {depth}")
        widths = [width * 2 ** i for i in range(depth)]
        self.encoder = Encoder(4, widths)
        self.decoder = UNetDecoder(widths)
        self.head = Head(self.decoder.out_channels, 3)
        nn.init.zeros_(self.head.body[2].weight)
        nn.init.zeros_(self.head.body[2].bias)
        self.depth, self.stride = depth, 2 ** (depth - 1)
        self.transform_levels = [level_index(n, depth) for n in transform_levels]
        self.transforms = nn.ModuleDict({f"enc{i + 1}": GlobalGuidedTransform(widths[i], guidance)
                                         for i in self.transform_levels})

    def run(self, image: Tensor, mask: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(harmonized image (normalised), every encoder stage's output after its transform)."""
        if image.shape[-1] % self.stride or image.shape[-2] % self.stride:
            raise KdforgeError(f"HarmonizationNet: input {tuple(image.shape[-2:])} must be divisible by {self.stride}")
        m = mask.to(image.dtype)
        x = torch.cat([image, m], 1)
        feats = []
        for i, stage in enumerate(self.encoder.stages):
            x = stage(x)
            name = f"enc{i + 1}"
            if name in self.transforms:
                x = self.transforms[name](x, m)
            feats.append(x)
        return image + m * self.head(self.decoder(feats)), feats

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.run(image, mask)[0]


@contextlib.contextmanager
def batch_stats_only(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers use the batch's statistics and leave their running statistics untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def fn_mse(pred: Tensor, target: Tensor, mask: Tensor, min_area: float) -> Tensor:
    """iSSAM's foreground-normalised MSE: per image sum (pred - target)^2 / (C max(|M|, min_area H W)), mean."""
    h, w = pred.shape[-2:]
    area = mask.float().sum((1, 2, 3)).clamp_min(min_area * h * w)
    return (((pred.float() - target.float()) ** 2).sum((1, 2, 3)) / (pred.shape[1] * area)).mean()


@dataclass
class HarmonyBatch:
    composite: Tensor      # (B, 3, H, W) normalised
    real: Tensor           # (B, 3, H, W) normalised
    mask: Tensor           # (B, 1, H, W) float 0 / 1
    index: Tensor
    step: int = 0


class HarmonizationModule(TaskModule):
    """The network, L_rec, and (lambda_rd > 0) the relation distillation from the real image's branch."""

    def __init__(self, net: HarmonizationNet, lambda_rd: float = 0.0, layers: Sequence[str] = ("enc3", "enc4"),
                 distance: str = "l1", tau: float = 0.1, pool: int = 16, sample: int = 0, min_area: float = 100 / 65536,
                 seed: int = 0) -> None:
        super().__init__()
        self.net = net
        self.lambda_rd, self.distance, self.tau = float(lambda_rd), distance, float(tau)
        self.layers = [level_index(n, net.depth) for n in layers]
        self.pool, self.sample, self.min_area, self.seed = pool, sample, float(min_area), seed

    def eval_model(self) -> nn.Module:
        return self.net

    def relation_loss(self, feats_c: list[Tensor], batch: HarmonyBatch) -> Tensor:
        with torch.no_grad(), batch_stats_only(self.net):
            _, feats_r = self.net.run(batch.real, batch.mask)
        g = seeded_generator(self.seed, 59, batch.step) if self.sample else None
        return relation_distill_loss([feats_c[i] for i in self.layers], [feats_r[i] for i in self.layers],
                                     batch.mask, self.distance, self.tau, self.pool, self.sample, g)

    def forward(self, batch: HarmonyBatch) -> Step:
        pred, feats = self.net.run(batch.composite, batch.mask)
        losses = {"rec": fn_mse(pred, batch.real, batch.mask, self.min_area)}
        groups = {"rec": "task"}
        if self.lambda_rd > 0:
            losses["relation"] = self.lambda_rd * self.relation_loss(feats, batch)
            groups["relation"] = "distill"
        return Step(outputs=pred.detach(), losses=losses, groups=groups)


@torch.no_grad()
def _predict(net: HarmonizationNet, data: HarmonizationData, device: torch.device, layers: Sequence[int],
             pool: int, batch_size: int = 64) -> tuple[Tensor, list[tuple[float, int]]]:
    """(harmonized 0..255 float images, per-level relation-gap sums and counts), eval mode, restored."""
    was = net.training
    net.eval()
    preds, gaps = [], [(0.0, 0)] * len(layers)
    try:
        for s in range(0, len(data), batch_size):
            comp = normalise(data.composite[s:s + batch_size]).to(device)
            real = normalise(data.real[s:s + batch_size]).to(device)
            mask = data.mask[s:s + batch_size].float().to(device)
            pred, fc = net.run(comp, mask)
            preds.append(to_pixels(pred).cpu())
            if layers:
                _, fr = net.run(real, mask)
                part = relation_gap([fc[i] for i in layers], [fr[i] for i in layers], mask, pool)
                gaps = [(a + b, n + k) for (a, n), (b, k) in zip(gaps, part, strict=True)]
    finally:
        net.train(was)
    return torch.cat(preds), gaps


def harmony_split_metrics(pred: Tensor, data: HarmonizationData) -> dict[str, float]:
    """mse, fmse, psnr of 0..255 `pred` against the real images, and fmse (and the image count) per
    foreground-ratio bin (FG_BINS; fmse only for a bin with images)."""
    real, mask = data.real.float(), data.mask
    out = harmony_metrics(pred, real, mask)
    ratio = mask.float().mean((1, 2, 3))
    for lo, hi, name in FG_BINS:
        pick = (ratio >= lo) & (ratio < hi)
        out[f"n_{name}"] = float(pick.sum())
        if pick.any():                   # an empty bin has no fMSE (left out)
            out[f"fmse_{name}"] = harmony_fmse(pred[pick], real[pick], mask[pick])
    return out


class HarmonizationTask(SampledTask):
    """Train a `HarmonizationModule` on composite triplets; harmonization metrics of a split."""

    name = "harmonization"
    ddp_note = ("batch-norm statistics of the real-image branch and the per-batch relation means are "
                "one-process quantities; run it in one process")

    def __init__(self, module: HarmonizationModule, train: HarmonizationData, test: HarmonizationData,
                 batch_size: int, seed: int = 0, flip: bool = True, val: HarmonizationData | None = None,
                 extra_result: dict[str, Any] | None = None) -> None:
        if batch_size < 1:
            raise KdforgeError(f"harmonization: batch_size must be >= 1, got {batch_size}")
        for name, d in (("train", train), ("test", test), ("val", val)):
            if d is not None and (d.real.shape != d.composite.shape or d.mask.shape[1] != 1
                                  or d.mask.shape[-2:] != d.real.shape[-2:]):
                raise KdforgeError(f"harmonization: the {name} split's real {tuple(d.real.shape)}, composite "
                                   f"{tuple(d.composite.shape)} and mask {tuple(d.mask.shape)} do not match")
        self.module, self.train, self.test, self.val = module, train, test, val
        self.batch_size, self.seed, self.flip = batch_size, seed, flip
        self.extra_result = dict(extra_result or {})
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return self.module.to(device)

    def batch(self, epoch: int, step: int, env: DistEnv) -> HarmonyBatch:
        k = epoch * self.steps_per_epoch() + step
        idx = self.batch_index(epoch, step, env)
        comp, real, mask = self.train.composite[idx], self.train.real[idx], self.train.mask[idx]
        if self.flip:
            flip = torch.rand(len(idx), generator=seeded_generator(self.seed, 29, k)) < 0.5
            if flip.any():
                comp, real, mask = (x.clone() for x in (comp, real, mask))
                for x in (comp, real, mask):
                    x[flip] = x[flip].flip(-1)
        d = self.device
        return HarmonyBatch(normalise(comp).to(d), normalise(real).to(d), mask.float().to(d), idx.to(d), k)

    def split(self, split: str) -> HarmonizationData:
        data = {"train": self.train, "test": self.test, "val": self.val}.get(split)
        if data is None:
            raise KdforgeError(f"harmonization: no '{split}' split (data.num_val sets a validation split)")
        return data

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data, m = self.split(split), self.module
        with autocast() if autocast is not None else contextlib.nullcontext():
            pred, gaps = _predict(module.eval_model(), data, self.device, m.layers, m.pool)
        out = harmony_split_metrics(pred, data)
        if gaps:
            out["relation_gap"] = sum(total / max(1, n) for total, n in gaps)
        return out

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        if self.val is not None:
            out.update({f"val_{k}": v for k, v in self.evaluate(module, "val", env).items()})
        inputs = harmony_split_metrics(self.test.composite.float(), self.test)
        out.update({f"test_input_{k}": v for k, v in inputs.items() if not k.startswith("n_")})
        out["test_fmse_vs_input"] = out["test_fmse"] / max(inputs["fmse"], 1e-12)
        return {**out, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        net = self.module.net
        return {"task": self.name, "train_images": len(self.train), "test_images": len(self.test),
                "parameters": sum(p.numel() for p in net.parameters()),
                "transform_levels": [f"enc{i + 1}" for i in net.transform_levels],
                "relation_levels": [f"enc{i + 1}" for i in self.module.layers], "lambda_rd": self.module.lambda_rd}

    def draw(self, module: nn.Module, path: Path, count: int = 6) -> bool:
        """`count` test composites: rows composite | prediction | real | mask, fMSE in the titles."""
        from kdforge.plotting import pyplot, save_png

        n = min(count, len(self.test))
        sub = HarmonizationData(self.test.real[:n], self.test.composite[:n], self.test.mask[:n])
        pred, _ = _predict(module.eval_model(), sub, self.device, (), 0)
        rows = [("composite", sub.composite.float()), ("prediction", pred), ("real", sub.real.float()),
                ("mask", sub.mask.float().expand(-1, 3, -1, -1) * 255)]
        plt = pyplot()
        fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n, 1.5 * len(rows)), squeeze=False)
        for j in range(n):
            for r, (label, images) in enumerate(rows):
                ax = axes[r, j]
                ax.imshow((images[j].permute(1, 2, 0) / 255).clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r < 2:
                    f = harmony_fmse(images[j:j + 1], sub.real[j:j + 1].float(), sub.mask[j:j + 1])
                    ax.set_title(f"fMSE {f:.0f}", fontsize=6)
                if j == 0:
                    ax.set_ylabel(label, fontsize=7)
        fig.suptitle("test composites: input, harmonized prediction, real image, foreground mask", fontsize=8)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True
