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
regions. `adapt: false, selfmix: false` is plain FKD, the paper's baseline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.transforms import hash_u32
from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.errors import KdforgeError
from kdforge.methods.ferkd_regions import RegionBank, precompute_region_bank, region_views
from kdforge.registry import METHODS

STREAM_SELFMIX_PARTNER = 11
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
                 mix: str = "cutmix", alpha: float = 1.0, temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__(student, None, [])
        if mix not in MIX_MODES:
            raise KdforgeError(f"ferkd: mix must be one of {', '.join(MIX_MODES)}, got {mix!r}")
        if alpha <= 0 or temperature <= 0:
            raise KdforgeError(f"ferkd: alpha and temperature must be > 0, got {alpha}, {temperature}")
        if selfmix and bank.num_crops < 2:
            raise KdforgeError("ferkd: selfmix needs a bank with num_crops >= 2")
        self.bank = bank
        self.adapt, self.eps, self.selfmix = adapt, float(eps), selfmix
        self.mix, self.alpha, self.temperature, self.seed = mix, float(alpha), float(temperature), int(seed)
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
        if self.selfmix:
            partner = selfmix_partner(idx, self.bank.num_crops, batch.epoch, self.seed)
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


METHODS.register("ferkd", FerKD, family="classification",
                 paper="FerKD: Surgical Label Adaptation for Efficient Distillation (ICCV 2023)",
                 summary="FKD region soft labels; least-confident crops relabelled to softened one-hot; SelfMix")
