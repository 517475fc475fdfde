"""FerKD (Shen, ICCV 2023): FKD region soft labels with surgical soft->hard label adaptation + SelfMix.

FKD trains the student on stored random-resized-crop regions and the teacher's stored soft label
of each region; no teacher forward pass happens during training. FerKD observes that the crops
of an image are easy positives, hard positives or hard negatives (mostly background) and that the
teacher's soft label of the last kind is unreliable. It therefore

1. ranks the stored crops of each image by the teacher's probability of the true class and
   replaces the labels of the least-confident ("hard") ones by a softened one-hot label
   `(1 - eps) * onehot(y) + eps / K`, so they act as context for the true class; optionally it
   drops the easiest crops (weight 0);
2. mixes crops of the *same* image (SelfMix: CutMix or Mixup between two regions of one image,
   target `lam * q_a + (1 - lam) * q_b`), which varies the mixed image and label less than
   mixing different images;
3. fits the (mixed) labels with a soft cross-entropy on the student's logits (T = 1, no
   separate hard-label term, as in FKD).

The exact mining rule is not in public code (see the method card): `rho_h` (fraction of an
image's crops) and/or `tau_h` (absolute confidence threshold), `eps` and `rho_e` are
hyper-parameters. With both given, a crop is hard only if it is in the `rho_h` hardest of its
image *and* below `tau_h`, which keeps the hard bucket small.

Use: `method: {name: ferkd, args: {...}}` with `data.augment` off (the method makes its own
region views). `data.batch_size` counts images; each step trains on `batch_size * num_crops`
regions. `adapt: false, selfmix: false` is plain FKD, the paper's baseline; `crossmix: true`
(with `selfmix: false`) is FKD's optional `--mixup_cutmix`: CutMix/Mixup between any two crops
of the batch, i.e. across images, the mixing SelfMix replaces.

Task recipe (`kdforge train configs/methods/ferkd.yaml`, schema `FerKDRecipe`): a teacher stage
trained on RandomResizedCrop views (`RRCTask`, as FKD's teachers are; skipped with
`teacher.run=<trained teacher>`), the region bank built once from it and stored beside it
(`ensure_bank`), then the student (`FerKDTask`, whose result.json adds `region_stats`: the
teacher's top-1 on the stored regions, what the mining rule picks and, with the data set's
object masks, how much of the object those regions show). `final_stage: teacher` trains only the
teacher (an experiment's shared stage).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import kdforge.data.objects  # noqa: F401  (registers objects_clutter, the card's object-on-clutter data)
from kdforge.config import (
    AugmentConfig,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainerConfig,
)
from kdforge.data.cache_dir import atomic_torch_save, cache_key
from kdforge.data.transforms import hash_u32
from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.ferkd_regions import (
    RegionBank,
    object_coverage,
    precompute_region_bank,
    region_soft_labels,
    region_views,
    rrc_boxes,
)
from kdforge.models import create_model
from kdforge.registry import METHODS
from kdforge.tasks.classification import ClassificationTask
from kdforge.tasks.common import LoopConfig
from kdforge.train.stages import parse_recipe

STREAM_SELFMIX_PARTNER = 11
STREAM_CROSSMIX_PARTNER = 13
MIX_MODES = ("cutmix", "mixup", "switch")

# ---------------------------------------------------------------------------------------------
# label adaptation (pure functions)


def gt_confidence(probs: Tensor, labels: Tensor) -> Tensor:
    """Teacher probability of the true class: probs (N, M, K), labels (N,) -> (N, M)."""
    if probs.dim() != 3 or labels.shape != probs.shape[:1]:
        raise KdforgeError(f"gt_confidence expects probs (N, M, K) and labels (N,), got {tuple(probs.shape)} "
                           f"and {tuple(labels.shape)}")
    return probs.gather(2, labels.long()[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(2)


def _rank_mask(conf: Tensor, count: int, lowest: bool) -> Tensor:
    """Per row: True for the `count` lowest (or highest) values; ties go to the earlier crop."""
    m = conf.shape[1]
    mask = torch.zeros_like(conf, dtype=torch.bool)
    if count <= 0:
        return mask
    key = conf if lowest else -conf
    order = torch.sort(key, dim=1, stable=True).indices[:, : min(count, m)]
    return mask.scatter_(1, order, True)


def hard_region_mask(conf: Tensor, rho_h: float | None = None, tau_h: float | None = None) -> Tensor:
    """Which crops of each image are "hard": (N, M) bool from the confidences (N, M).

    `rho_h`: the floor(rho_h * M) least-confident crops of each image (ranked within the image,
    never across images); `tau_h`: crops with confidence below tau_h. Both given: both must hold.
    """
    if conf.dim() != 2:
        raise KdforgeError(f"hard_region_mask expects confidences (N, M), got {tuple(conf.shape)}")
    if rho_h is None and tau_h is None:
        raise KdforgeError("ferkd: give rho_h (fraction of crops per image) and/or tau_h (threshold)")
    mask = torch.ones_like(conf, dtype=torch.bool)
    if rho_h is not None:
        if not 0.0 <= rho_h <= 1.0:
            raise KdforgeError(f"ferkd: rho_h must be in [0, 1], got {rho_h}")
        mask &= _rank_mask(conf, int(rho_h * conf.shape[1] + 1e-9), lowest=True)
    if tau_h is not None:
        if not 0.0 <= tau_h <= 1.0:
            raise KdforgeError(f"ferkd: tau_h must be in [0, 1], got {tau_h}")
        mask &= conf < tau_h
    return mask


def easy_region_mask(conf: Tensor, rho_e: float) -> Tensor:
    """The floor(rho_e * M) most confident crops of each image (the optional easy drop)."""
    if not 0.0 <= rho_e < 1.0:
        raise KdforgeError(f"ferkd: rho_e must be in [0, 1), got {rho_e}")
    return _rank_mask(conf, int(rho_e * conf.shape[1] + 1e-9), lowest=False)


def softened_onehot(labels: Tensor, num_classes: int, eps: float) -> Tensor:
    """(1 - eps) * onehot(y) + eps / K: the label a hard region gets instead of the teacher's."""
    if not 0.0 <= eps <= 1.0:
        raise KdforgeError(f"ferkd: eps must be in [0, 1], got {eps}")
    out = torch.full((*labels.shape, num_classes), eps / num_classes)
    out = out.to(labels.device)
    return out.scatter_add_(-1, labels.long()[..., None], torch.full_like(out[..., :1], 1.0 - eps))


def adapt_labels(soft: Tensor, labels: Tensor, hard: Tensor, eps: float) -> Tensor:
    """Replace the soft labels of hard crops: soft (..., K), labels and hard of shape (...)."""
    if soft.shape[:-1] != hard.shape or labels.shape != hard.shape:
        raise KdforgeError(f"adapt_labels: soft {tuple(soft.shape)}, labels {tuple(labels.shape)} and hard "
                           f"{tuple(hard.shape)} do not match")
    target = softened_onehot(labels, soft.shape[-1], eps).to(soft)
    return torch.where(hard[..., None].to(soft.device), target, soft)


# ---------------------------------------------------------------------------------------------
# SelfMix


def selfmix_partner(index: Tensor, num_crops: int, epoch: int, seed: int) -> Tensor:
    """Partner row of every crop in a (B * n) image-major batch: a crop of the same image.

    Crop j of image b mixes with crop (j + s_b) mod n, s_b in [1, n-1] hashed from
    (seed, epoch, index), so a crop never mixes with itself and never with another image.
    """
    if num_crops < 2:
        raise KdforgeError("SelfMix needs num_crops >= 2 (it mixes two crops of the same image)")
    b = index.shape[0]
    shift = 1 + hash_u32(index.cpu(), seed, epoch, STREAM_SELFMIX_PARTNER) % (num_crops - 1)   # (B,)
    j = torch.arange(num_crops)
    partner_j = (j[None, :] + shift[:, None]) % num_crops
    return (torch.arange(b)[:, None] * num_crops + partner_j).reshape(-1)


def crossmix_partner(num_rows: int, epoch: int, step: int, seed: int) -> Tensor:
    """Partner row of every crop for FKD's cross-image mixing: a random permutation of the batch.

    As FKD's `mixup_cutmix` (`torch.randperm` over all crops of the batch), but seeded by
    (seed, epoch, step) so a resumed run mixes the same pairs. A crop may meet a crop of its own
    image by chance; most partners come from other images.
    """
    if num_rows < 1:
        raise KdforgeError(f"crossmix_partner needs at least one row, got {num_rows}")
    key = int(hash_u32(torch.tensor([step]), seed, epoch, STREAM_CROSSMIX_PARTNER).item())
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(key))


def cutmix_box(lam: float, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """CutMix box (y0, y1, x0, x1) of area about (1 - lam) * H * W at a uniform centre, clipped."""
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y0, y1, x0, x1


def selfmix(views: Tensor, targets: Tensor, partner: Tensor, lam: float, mode: str = "cutmix",
            box: tuple[int, int, int, int] | None = None, weights: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Mix every crop with its partner crop: returns (images, targets, weights, effective lam).

    mixup: `lam * x_a + (1 - lam) * x_b`. cutmix: x_a with `box` pasted from x_b, lam replaced
    by the kept area fraction. Targets (and per-crop weights) mix with the same lam.
    """
    if views.shape[0] != targets.shape[0] or partner.shape != views.shape[:1]:
        raise KdforgeError(f"selfmix: {views.shape[0]} views, {targets.shape[0]} targets, partner "
                           f"{tuple(partner.shape)}")
    partner = partner.to(views.device)
    xb = views[partner]
    if mode == "mixup":
        mixed = lam * views + (1.0 - lam) * xb
    elif mode == "cutmix":
        if box is None:
            raise KdforgeError("selfmix: cutmix needs a box")
        y0, y1, x0, x1 = box
        mixed = views.clone()
        mixed[:, :, y0:y1, x0:x1] = xb[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(views.shape[-2] * views.shape[-1])
    else:
        raise KdforgeError(f"selfmix: mode must be mixup or cutmix, got {mode!r}")
    mixed_t = lam * targets + (1.0 - lam) * targets[partner.to(targets.device)]
    mixed_w = None if weights is None else lam * weights + (1.0 - lam) * weights[partner.to(weights.device)]
    return mixed, mixed_t, mixed_w, lam


def soft_cross_entropy(logits: Tensor, target: Tensor, temperature: float = 1.0,
                       weights: Tensor | None = None) -> Tensor:
    """-(target * log_softmax(logits / T)).sum(-1), averaged (weighted when `weights` are given)."""
    per = -(target * F.log_softmax(logits.float() / temperature, dim=1)).sum(1)
    if weights is None:
        return per.mean()
    return (per * weights).sum() / weights.sum().clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------
# training module


class FerKD(Distiller):
    """Student trained on stored region soft labels (FKD), adapted and SelfMixed as in FerKD."""

    def __init__(self, student: nn.Module, bank: RegionBank, *, adapt: bool = True, rho_h: float | None = 0.2,
                 tau_h: float | None = None, eps: float = 0.1, rho_e: float = 0.0, selfmix: bool = True,
                 crossmix: bool = False, mix: str = "cutmix", alpha: float = 1.0, temperature: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__(student, None, [])
        if mix not in MIX_MODES:
            raise KdforgeError(f"ferkd: mix must be one of {', '.join(MIX_MODES)}, got {mix!r}")
        if alpha <= 0 or temperature <= 0:
            raise KdforgeError(f"ferkd: alpha and temperature must be > 0, got {alpha}, {temperature}")
        if selfmix and crossmix:
            raise KdforgeError("ferkd: selfmix (crops of one image) and crossmix (crops of the batch) exclude "
                               "each other; set one of them")
        if selfmix and bank.num_crops < 2:
            raise KdforgeError("ferkd: selfmix needs a bank with num_crops >= 2")
        self.bank = bank
        self.adapt, self.eps, self.selfmix, self.crossmix = adapt, float(eps), selfmix, crossmix
        self.mix, self.alpha, self.temperature, self.seed = mix, float(alpha), float(temperature), int(seed)
        self.rho_h, self.tau_h = rho_h, tau_h
        k, n_img, n = bank.confidence.shape
        conf = bank.confidence.permute(1, 0, 2).reshape(n_img, k * n)      # all stored crops of an image
        hard = torch.zeros_like(conf, dtype=torch.bool)
        if adapt:
            hard = hard_region_mask(conf, rho_h, tau_h)
        drop = easy_region_mask(conf, rho_e) & ~hard
        # offline, once: (K, N, n) flags read back per batch (plain attributes: never checkpointed)
        self.hard = hard.reshape(n_img, k, n).permute(1, 0, 2).contiguous()
        self.weight = (~drop).float().reshape(n_img, k, n).permute(1, 0, 2).contiguous()
        self.use_weights = bool(drop.any())

    def relabel_stats(self) -> dict[str, float | None]:
        """Fraction of stored crops relabelled, and the mean true-class confidence of each bucket
        (None for an empty bucket)."""
        conf, hard = self.bank.confidence, self.hard
        return {"relabelled_fraction": float(hard.float().mean()),
                "relabelled_mean_conf": float(conf[hard].mean()) if hard.any() else None,
                "kept_mean_conf": float(conf[~hard].mean()) if (~hard).any() else None,
                "dropped_fraction": float((self.weight == 0).float().mean())}

    def region_stats(self, masks: Tensor | None = None, miss_below: float = 0.25) -> dict[str, float | None]:
        """How the teacher does on the stored regions and what FerKD's mining rule picks (the premise).

        Computed on the whole bank with the module's `rho_h`/`tau_h` whether or not `adapt` is on
        (for FKD: the regions FerKD *would* relabel). Top-1 values in %, None for an empty bucket.
        With the training images' object `masks` (N, H, W): the share of the object each region
        contains (`object_coverage`); a region with less than `miss_below` of it is a miss (a hard
        negative, mostly background).
        """
        bank = self.bank
        k, n_img, n = bank.confidence.shape
        conf = bank.confidence
        if self.rho_h is None and self.tau_h is None:
            mined = torch.zeros_like(conf, dtype=torch.bool)
        else:
            flat = hard_region_mask(conf.permute(1, 0, 2).reshape(n_img, k * n), self.rho_h, self.tau_h)
            mined = flat.reshape(n_img, k, n).permute(1, 0, 2)
        if bank.probs is not None:
            pred = bank.probs.argmax(-1)
        elif bank.topk_indices is not None:
            pred = bank.topk_indices[..., 0].long()
        else:
            raise KdforgeError("region bank holds neither full labels nor top-k labels")
        right = (pred == bank.labels[None, :, None]).float()

        def mean(x: Tensor, where: Tensor, scale: float = 1.0) -> float | None:
            return scale * float(x[where].float().mean()) if bool(where.any()) else None

        every = torch.ones_like(mined)
        out: dict[str, float | None] = {
            "teacher_region_top1": mean(right, every, 100.0), "mined_fraction": float(mined.float().mean()),
            "mined_teacher_top1": mean(right, mined, 100.0), "kept_teacher_top1": mean(right, ~mined, 100.0),
            "mined_mean_conf": mean(conf, mined), "kept_mean_conf": mean(conf, ~mined)}
        if masks is not None:
            if masks.shape[0] != n_img:
                raise KdforgeError(f"region_stats: {masks.shape[0]} object masks for a bank of {n_img} images")
            cov = object_coverage(masks, bank.boxes.permute(1, 0, 2, 3)).permute(1, 0, 2)      # (K, N, n)
            miss = cov < miss_below
            out.update({
                "region_object_coverage": mean(cov, every), "miss_fraction": float(miss.float().mean()),
                "mined_object_coverage": mean(cov, mined), "kept_object_coverage": mean(cov, ~mined),
                "mined_miss_fraction": mean(miss, mined), "kept_miss_fraction": mean(miss, ~mined),
                "teacher_top1_on_misses": mean(right, miss, 100.0), "teacher_top1_on_hits": mean(right, ~miss, 100.0),
                "misses_mined_fraction": mean(mined, miss)})
        return out

    def targets(self, epoch: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """(B * n, K) training targets of the stored crops and their (B * n,) loss weights."""
        soft = self.bank.soft_labels(epoch, index)                                   # (B, n, K)
        e, idx = self.bank.slot(epoch), index.cpu().long()
        if self.adapt:
            lab = self.bank.labels[idx][:, None].expand(-1, soft.shape[1])
            soft = adapt_labels(soft, lab, self.hard[e, idx], self.eps)
        return soft.reshape(-1, soft.shape[-1]), self.weight[e, idx].reshape(-1)

    def _mix_params(self, epoch: int, step: int, height: int, width: int) -> tuple[str, float, Any]:
        rng = random.Random(hash_u32(torch.tensor([step]), self.seed, epoch, STREAM_SELFMIX_PARTNER + 1).item())
        mode = self.mix if self.mix != "switch" else ("cutmix" if rng.random() < 0.5 else "mixup")
        lam = rng.betavariate(self.alpha, self.alpha)
        box = cutmix_box(lam, height, width, rng) if mode == "cutmix" else None
        return mode, lam, box

    def forward(self, batch: Batch) -> Step:
        if not self.is_setup:
            raise KdforgeError("Distiller.setup(sample_images, num_samples) must run before training")
        index = batch.index
        if int(index.max()) >= self.bank.num_images:
            raise KdforgeError(f"sample index {int(index.max())} is outside the region bank "
                               f"({self.bank.num_images} images)")
        e = self.bank.slot(batch.epoch)
        idx = index.cpu().long()
        dev = batch.images.device
        views = region_views(batch.images, self.bank.boxes[e, idx].to(dev), self.bank.flips[e, idx].to(dev),
                             self.bank.size)
        target, weight = self.targets(batch.epoch, index)
        target, weight = target.to(dev), weight.to(dev)
        if self.selfmix or self.crossmix:
            if self.selfmix:        # FerKD: two crops of the same image
                partner = selfmix_partner(idx, self.bank.num_crops, batch.epoch, self.seed)
            else:                   # FKD's mixup_cutmix: any two crops of the batch
                partner = crossmix_partner(views.shape[0], batch.epoch, batch.step, self.seed)
            mode, lam, box = self._mix_params(batch.epoch, batch.step, views.shape[-2], views.shape[-1])
            views, target, weight, _ = selfmix(views, target, partner, lam, mode, box, weight)
        logits = self.student(views)
        loss = soft_cross_entropy(logits, target, self.temperature, weight if self.use_weights else None)
        per_image = logits.detach().reshape(index.shape[0], self.bank.num_crops, -1).mean(1)
        return Step(outputs=per_image, losses={"ferkd": loss}, groups={"ferkd": "distill"})

    @classmethod
    def build_module(cls, cfg: Any, student: nn.Module, teachers: dict[str, nn.Module], terms: list,
                     data: Any, bank: str | None = None, bank_epochs: int | None = None, num_crops: int = 4,
                     scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                     topk: int | None = None, bank_seed: int | None = None, **kwargs: Any) -> FerKD:
        """Load the region bank from `bank` (a `RegionBank.save` file) or build it now with the teacher."""
        aug = cfg.data.augment
        if aug.crop_padding or aug.flip or aug.mixup or aug.cutmix:
            raise KdforgeError("ferkd makes its own region views: set data.augment.crop_padding=0, flip=false, "
                               "mixup=0 and cutmix=0")
        if cfg.terms:
            raise KdforgeError("ferkd trains on its stored region soft labels only; remove `terms` from the config")
        train = data.train
        if bank is not None:
            region_bank = RegionBank.load(bank)
        else:
            if not isinstance(getattr(train, "images", None), Tensor):
                raise KdforgeError("ferkd builds its region bank from in-memory images: set data.stream=false, "
                                   "or precompute the bank (precompute_region_bank) and pass method.args.bank")
            if "teacher" not in teachers:
                raise KdforgeError("ferkd needs `teacher` (with a checkpoint) or method.args.bank")
            region_bank = precompute_region_bank(
                teachers["teacher"], train.images, train.labels, train.num_classes,
                bank_epochs or cfg.trainer.epochs, num_crops, cfg.trainer.seed if bank_seed is None else bank_seed,
                scale, ratio, mean=train.mean, std=train.std, topk=topk)
        region_bank.check_matches(train.labels)
        kwargs.setdefault("seed", cfg.trainer.seed)
        try:
            return cls(student, region_bank, **kwargs)
        except TypeError as err:
            raise KdforgeError(f"ferkd: {err}") from None

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        """Run a task recipe (`kdforge train configs/methods/ferkd.yaml`): teacher, bank, student."""
        cfg, trainer, text = parse_recipe(tree, source, FerKDRecipe, method="ferkd")
        cfg.check(source)
        return run_ferkd(cfg, run_dir, trainer, text)


# ---------------------------------------------------------------------------------------------
# the task recipe: RandomResizedCrop teacher -> region bank -> student


@dataclass
class RRCConfig:
    """RandomResizedCrop of a training view (torchvision's sampling rule, see `rrc_boxes`)."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True


@dataclass
class FerKDData:
    """The image data set (a registered name) and its validation split, fixed for every run seed."""

    name: str = "objects_clutter"
    args: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    val_fraction: float = 0.1       # held out of train for the per-epoch curve and for choosing settings
    split_seed: int = 0             # the train/val split (the bank is built for one training set)
    eval_batch_size: int = 256


@dataclass
class FerKDTeacher:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet20"))
    run: str | None = None          # a trained teacher (run directory or weights file): skips the teacher stage
    seed: int = 0
    rrc: RRCConfig | None = field(default_factory=RRCConfig)    # null: whole images (+ flip)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=15, batch_size=64, optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine")))


@dataclass
class FerKDBank:
    """FKD's offline soft-label generation: `epochs` x `num_crops` RandomResizedCrop regions per image."""

    epochs: int = 3
    num_crops: int = 4
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True
    topk: int | None = None         # store full labels; e.g. 5 = FKD's top-5 "marginal smoothing"
    seed: int | None = 0            # the regions; null: the run seed


@dataclass
class FerKDArgs:
    """The student's labels and mixing; `adapt: false, selfmix: false` is plain FKD."""

    adapt: bool = True
    rho_h: float | None = 0.2
    tau_h: float | None = None
    eps: float = 0.1
    rho_e: float = 0.0
    selfmix: bool = True
    crossmix: bool = False
    mix: str = "cutmix"
    alpha: float = 1.0
    temperature: float = 1.0


@dataclass
class FerKDRecipe:
    method: str = "ferkd"
    seed: int = 0                   # the student: initialisation, batch order, mixing
    data: FerKDData = field(default_factory=FerKDData)
    teacher: FerKDTeacher = field(default_factory=FerKDTeacher)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet8"))
    bank: FerKDBank = field(default_factory=FerKDBank)
    ferkd: FerKDArgs = field(default_factory=FerKDArgs)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=3, batch_size=32, optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine")))
    final_stage: str = "student"    # "teacher": train only the teacher, into the run directory itself

    def check(self, where: str) -> None:
        if self.final_stage not in ("teacher", "student"):
            raise ConfigError(f"{where}: final_stage must be 'teacher' or 'student', got {self.final_stage!r}")
        if self.final_stage == "teacher" and self.teacher.run:
            raise ConfigError(f"{where}: final_stage=teacher trains the teacher, but teacher.run already gives one")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"{where}: data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.bank.epochs < 1 or self.bank.num_crops < 1:
            raise ConfigError(f"{where}: bank.epochs and bank.num_crops must be >= 1")
        for name, rrc in (("bank", self.bank), ("teacher.rrc", self.teacher.rrc)):
            if rrc is not None and (len(rrc.scale) != 2 or len(rrc.ratio) != 2):
                raise ConfigError(f"{where}: {name}.scale and {name}.ratio must be [min, max]")
        if self.train.epochs < 1:
            raise ConfigError(f"{where}: train.epochs must be >= 1, got {self.train.epochs}")
        self.train.check(f"{where}: train")
        self.teacher.loop.check(f"{where}: teacher.loop")


def _data_config(d: FerKDData, batch_size: int, flip: bool = False) -> DataConfig:
    return DataConfig(name=d.name, args=dict(d.args), root=d.root, batch_size=batch_size,
                      eval_batch_size=d.eval_batch_size, val_fraction=d.val_fraction,
                      augment=AugmentConfig(crop_padding=0, flip=flip, mixup=0.0, cutmix=0.0))


class RRCTask(ClassificationTask):
    """Labelled classification on RandomResizedCrop views: how FKD's teachers are trained.

    View of sample i in epoch e: `rrc_boxes(i, e, rrc_seed)` cut from the normalised image and
    resized back to the image size (`region_views`), a pure function of (seed, epoch, index).
    `result()` adds the teacher's top-1 on 4 RandomResizedCrop regions of every test image
    (`test_region_top1`): how reliable its region labels are.
    """

    def __init__(self, cfg: RunConfig, data: Any, rrc: RRCConfig | None, rrc_seed: int) -> None:
        super().__init__(cfg, data)
        self.rrc, self.rrc_seed = rrc, int(rrc_seed)

    def make_batch(self, index: Tensor, epoch: int, step: int, images: Tensor | None = None,
                   target: Tensor | None = None) -> Batch:
        if self.rrc is None:
            return super().make_batch(index, epoch, step, images, target)
        if images is None or target is None:
            images, target = self.source.fetch(index)
        x = self.prepare(images)
        h, w = x.shape[-2:]
        boxes, flips = rrc_boxes(index.cpu(), epoch, self.rrc_seed, h, w, 1, self.rrc.scale, self.rrc.ratio,
                                 self.rrc.flip)
        x = region_views(x.contiguous(), boxes.to(x.device), flips.to(x.device), (h, w))
        return Batch(images=x, target=target, index=index, epoch=epoch, step=step)

    def result(self, module: nn.Module, env: Any, autocast: Any = None) -> dict[str, Any]:
        out = super().result(module, env, autocast)
        test = self.data.test
        rrc = self.rrc or RRCConfig()
        n, (_, h, w) = len(test), test.image_shape
        idx = torch.arange(n)
        boxes, flips = rrc_boxes(idx, 0, self.rrc_seed + 1, h, w, 4, rrc.scale, rrc.ratio, rrc.flip)
        x = self.prepare(test.images)
        probs = region_soft_labels(module.eval_model(), x, boxes.to(x.device), flips.to(x.device), (h, w))
        right = probs.argmax(1).cpu() == test.labels.repeat_interleave(4)
        out["test_region_top1"] = 100.0 * float(right.float().mean())
        return out


class FerKDTask(ClassificationTask):
    """The student stage: FKD/FerKD on the stored regions; result.json also holds the region statistics.

    `region_stats` (teacher top-1 on the stored regions, what the mining rule picks and, when the
    data set gives object masks, how much of the object those regions contain) is what the
    experiment's premise reads; `bank_time_s` is the time spent building the bank in this run
    (0 when it was reused).
    """

    def __init__(self, cfg: RunConfig, data: Any, bank_time_s: float = 0.0) -> None:
        super().__init__(cfg, data)
        self.bank_time_s = float(bank_time_s)

    def result(self, module: nn.Module, env: Any, autocast: Any = None) -> dict[str, Any]:
        out = super().result(module, env, autocast)
        ferkd = self.distiller
        if isinstance(ferkd, FerKD):
            masks = getattr(self.data.train, "extra", {}).get("mask")
            out.update(ferkd.region_stats(masks))
            stats = ferkd.relabel_stats()
            out.update({"relabelled_fraction": stats["relabelled_fraction"],
                        "dropped_fraction": stats["dropped_fraction"]})
        out["bank_time_s"] = round(self.bank_time_s, 2)
        return out


def _teacher_weights(path: Path) -> Path:
    """A teacher run directory resolves to its last checkpoint (as `teacher.checkpoint` does); a file is used as is."""
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.safetensors", path / "model.safetensors"):
            if candidate.is_file():
                return candidate
        raise KdforgeError(f"ferkd: no teacher checkpoint in {path} (expected checkpoints/last.safetensors)")
    if not path.is_file():
        raise KdforgeError(f"ferkd: teacher checkpoint not found: {path}")
    return path


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def ensure_bank(cfg: FerKDRecipe, data: Any, teacher_dir: Path, run_dir: Path) -> tuple[Path, float]:
    """The region bank of (teacher, training set, bank settings): loaded when stored, else built.

    Stored beside the teacher (`<teacher>/banks/bank-<key>.pt`, the key hashing the teacher's
    weights, the data and the bank settings), so every run that uses this teacher with these
    settings shares one bank, as FKD generates its soft labels once. Returns (path, seconds
    spent building it here; 0 when reused).
    """
    from kdforge.train.build import load_weights

    weights = _teacher_weights(Path(teacher_dir).expanduser())
    b = cfg.bank
    seed = cfg.seed if b.seed is None else b.seed
    key = cache_key({"teacher": cfg.teacher.model.name, "teacher_args": cfg.teacher.model.args,
                     "weights": _file_digest(weights), "data": asdict(cfg.data), "epochs": b.epochs,
                     "num_crops": b.num_crops, "scale": list(b.scale), "ratio": list(b.ratio), "flip": b.flip,
                     "topk": b.topk, "seed": seed, "version": 1})
    base = weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent
    path = base / "banks" / f"bank-{key}.pt"
    if path.is_file():
        return path, 0.0
    t0 = time.time()
    train = data.train
    c, _, _ = train.image_shape
    teacher = create_model(cfg.teacher.model.name, num_classes=train.num_classes, in_channels=c,
                           **cfg.teacher.model.args)
    load_weights(teacher, weights, f"teacher ({cfg.teacher.model.name})")
    bank = precompute_region_bank(teacher, train.images, train.labels, train.num_classes, b.epochs, b.num_crops,
                                  seed, b.scale, b.ratio, b.flip, topk=b.topk, mean=train.mean, std=train.std)
    try:
        atomic_torch_save(bank.state(), path)
    except (OSError, KdforgeError):             # a read-only teacher directory: keep the bank with the run
        path = run_dir / "stages" / f"bank-{key}.pt"
        atomic_torch_save(bank.state(), path)
    return path, time.time() - t0


def _teacher_identity(cfg: FerKDRecipe) -> dict[str, Any]:
    """The settings that define the teacher (and the training set its bank is built for)."""
    teacher = asdict(cfg.teacher)
    teacher.pop("run")
    return {"data": asdict(cfg.data), "teacher": teacher}


def run_ferkd(cfg: FerKDRecipe, run_dir: str | Path, trainer: TrainerConfig | None = None,
              config_text: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Teacher stage (unless `teacher.run`), region bank, then the student in `run_dir` itself."""
    from kdforge.train.build import load_data
    from kdforge.train.stages import loop_settings, run_stage, shared_recipe

    run_dir = Path(run_dir)
    text = config_text or yaml.safe_dump(asdict(cfg), sort_keys=False)
    t = cfg.teacher
    if t.run:
        teacher_dir = Path(t.run).expanduser()
        if not teacher_dir.exists():
            raise KdforgeError(f"ferkd: teacher.run {teacher_dir} does not exist (train it first, or drop teacher.run "
                               "to train the teacher as a stage of this run)")
        if teacher_dir.is_dir():        # another ferkd run's teacher: it must be this recipe's teacher
            shared_recipe(teacher_dir, FerKDRecipe, cfg, _teacher_identity, "ferkd", what="teacher.run")
    else:
        settings = loop_settings(t.loop, t.seed, trainer)
        settings.data = _data_config(cfg.data, t.loop.batch_size, flip=t.rrc is None)
        settings.student = ModelConfig(name=t.model.name, args=dict(t.model.args))
        data = load_data(settings.data, cfg.data.split_seed)
        task = RRCTask(settings, data, t.rrc, rrc_seed=t.seed + 1_000_003)
        name = None if cfg.final_stage == "teacher" else "teacher"
        stage = run_stage(run_dir, name, settings, task, text, quiet=quiet)
        if stage.stopped or cfg.final_stage == "teacher":
            return stage.result
        teacher_dir = stage.run_dir
    settings = loop_settings(cfg.train, cfg.seed, trainer)
    settings.data = _data_config(cfg.data, cfg.train.batch_size)
    data = load_data(settings.data, cfg.data.split_seed)
    bank_path, bank_time = ensure_bank(cfg, data, teacher_dir, run_dir)
    settings.student = ModelConfig(name=cfg.student.name, args=dict(cfg.student.args))
    settings.method = MethodConfig(name="ferkd", args={"bank": str(bank_path), **asdict(cfg.ferkd)})
    return run_stage(run_dir, None, settings, FerKDTask(settings, data, bank_time), text, quiet=quiet).result


METHODS.register("ferkd", FerKD, family="classification",
                 paper="FerKD: Surgical Label Adaptation for Efficient Distillation (ICCV 2023)",
                 summary="FKD region soft labels; least-confident crops relabelled to softened one-hot; SelfMix")
