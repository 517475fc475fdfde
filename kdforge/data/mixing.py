"""Batched mixup / cutmix on a normalized float batch, reproducible from (seed, epoch, indices).

Why a parameter object: like crop/flip (`kdforge.data.transforms`), every random choice of a
mixed batch is a pure function of (seed, epoch, the batch's data set indices), so a mixed view
can be rebuilt later from `MixParams` alone (`apply_mix`), on any device, regardless of the
global RNG state. The randomness comes from a numpy PCG64 generator seeded with a SHA-256 of the
index list plus (seed, epoch); only a few numbers per sample are drawn, so this is cheap.

Per batch, one mode is chosen (timm's `switch_prob=0.5` when both alphas are > 0). Per sample
(by default; `per_sample=False` shares one lambda and box across the batch, as the papers do):

* `partner[i]`: the batch position whose image is mixed into sample i (a random permutation of
  the batch, as in the original mixup code);
* `lam[i]`: weight of sample i's own image and label, drawn from Beta(alpha, alpha); for cutmix it
  is corrected to the exact area kept, ``1 - box_area / (H * W)``;
* `box[i] = (y1, y2, x1, x2)`: the half-open pixel box pasted from the partner (cutmix only;
  empty for mixup).

Mixing normalized images equals normalizing mixed images (normalization is affine per channel),
so the trainer mixes after `normalize`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

MODES = ("none", "mixup", "cutmix")
_STREAM_MIX = 0x6D1C  # keeps mixing draws independent of other streams keyed by the same seed


@dataclass(frozen=True)
class MixParams:
    """Everything needed to rebuild one mixed batch (tensors on CPU or the batch's device)."""

    mode: str            # "none" | "mixup" | "cutmix"
    partner: Tensor      # (N,) int64 batch positions
    lam: Tensor          # (N,) float32 weight of the sample's own image/label
    box: Tensor          # (N, 4) int64 (y1, y2, x1, x2), half-open; all zero unless cutmix

    def to(self, device: torch.device | str) -> MixParams:
        return MixParams(self.mode, self.partner.to(device), self.lam.to(device), self.box.to(device))


def _generator(index: Tensor, epoch: int, seed: int) -> np.random.Generator:
    """PCG64 keyed by (stream, seed, epoch, SHA-256 of the index list in batch order)."""
    idx = np.ascontiguousarray(index.detach().to("cpu", torch.int64).numpy().astype("<i8"))
    digest = hashlib.sha256(idx.tobytes()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    mask = 0xFFFFFFFF
    seed = int(seed)
    entropy = [_STREAM_MIX, seed & mask, (seed >> 32) & mask, int(epoch) & mask, idx.shape[0], *words]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _check_alpha(name: str, alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise KdforgeError(f"{name} must be a finite alpha >= 0 (0 = off), got {alpha}")
    return alpha


def cutmix_boxes(lam: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Boxes covering about `1 - lam` of the image: uniform centre, clipped at the borders.

    Box side = side * sqrt(1 - lam) (as in the CutMix paper / timm `rand_bbox`); clipping at the
    border makes the area smaller, which the caller accounts for by recomputing lambda.
    """
    ratio = np.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(np.int64)
    cut_w = (width * ratio).astype(np.int64)
    cy = rng.integers(0, height, size=lam.shape[0])
    cx = rng.integers(0, width, size=lam.shape[0])
    y1 = np.clip(cy - cut_h // 2, 0, height)
    y2 = np.clip(cy + cut_h // 2, 0, height)
    x1 = np.clip(cx - cut_w // 2, 0, width)
    x2 = np.clip(cx + cut_w // 2, 0, width)
    return np.stack([y1, y2, x1, x2], axis=1).astype(np.int64)


def mix_params(index: Tensor, epoch: int, seed: int, height: int, width: int, mixup: float = 0.0,
               cutmix: float = 0.0, per_sample: bool = True) -> MixParams:
    """Per-sample mixing parameters of the batch with data set positions `index` (CPU tensors).

    A pure function of (seed, epoch, index in batch order, image size, alphas). `per_sample`
    draws one lambda (and box) per sample (timm's "elem" mode); False shares one lambda and one
    box across the batch (the original mixup / CutMix papers, timm's "batch" mode).
    """
    mixup, cutmix = _check_alpha("mixup", mixup), _check_alpha("cutmix", cutmix)
    index = torch.as_tensor(index)
    if index.dim() != 1:
        raise KdforgeError(f"mixing indices must be 1-D, got shape {tuple(index.shape)}")
    if height < 1 or width < 1:
        raise KdforgeError(f"mixing needs a positive image size, got {height}x{width}")
    n = int(index.shape[0])
    rng = _generator(index, epoch, seed)
    if mixup > 0 and cutmix > 0:
        mode = "cutmix" if rng.random() < 0.5 else "mixup"
    elif mixup > 0:
        mode = "mixup"
    elif cutmix > 0:
        mode = "cutmix"
    else:
        mode = "none"
    partner = rng.permutation(n).astype(np.int64)
    box = np.zeros((n, 4), dtype=np.int64)
    if mode == "none":
        lam = np.ones(n)
        partner = np.arange(n, dtype=np.int64)
    else:
        alpha = mixup if mode == "mixup" else cutmix
        lam = rng.beta(alpha, alpha, size=n if per_sample else 1)
        if mode == "cutmix":
            box = cutmix_boxes(lam, height, width, rng)
            if not per_sample:
                box = np.repeat(box, n, axis=0)
                lam = np.repeat(lam, n)
            area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
            lam = 1.0 - area / float(height * width)
        elif not per_sample:
            lam = np.repeat(lam, n)
    return MixParams(mode, torch.from_numpy(partner), torch.from_numpy(lam.astype(np.float32)),
                     torch.from_numpy(box))


def box_mask(box: Tensor, height: int, width: int) -> Tensor:
    """(N, H, W) bool mask, True inside each sample's half-open box (y1, y2, x1, x2)."""
    rows = torch.arange(height, device=box.device)
    cols = torch.arange(width, device=box.device)
    in_y = (rows[None, :] >= box[:, 0:1]) & (rows[None, :] < box[:, 1:2])
    in_x = (cols[None, :] >= box[:, 2:3]) & (cols[None, :] < box[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def apply_mix(x: Tensor, params: MixParams) -> Tensor:
    """Mix a float batch (N, C, H, W) with its partners as `params` says (a new tensor)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise KdforgeError(f"mixing expects a float batch (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if params.partner.shape != (x.shape[0],):
        raise KdforgeError(f"mixing: {x.shape[0]} images but parameters for {params.partner.shape[0]}")
    if params.mode == "none":
        return x.clone()
    p = params.to(x.device)
    other = x.index_select(0, p.partner)
    if p.mode == "mixup":   # lam * x + (1 - lam) * other, as one kernel
        return torch.lerp(other, x, p.lam.to(x.dtype).view(-1, 1, 1, 1))
    mask = box_mask(p.box, x.shape[2], x.shape[3]).unsqueeze(1)
    return torch.where(mask, other, x)


def mix_targets(target: Tensor, num_classes: int, params: MixParams) -> Tensor:
    """Soft labels lam * onehot(y_i) + (1 - lam) * onehot(y_partner(i)), float32 (N, C)."""
    if target.dim() != 1:
        raise KdforgeError(f"mixing expects class labels (N,), got shape {tuple(target.shape)}")
    if num_classes < 1:
        raise KdforgeError(f"mixing needs num_classes >= 1, got {num_classes}")
    p = params.to(target.device)
    onehot = F.one_hot(target.long(), num_classes).to(torch.float32)
    lam = p.lam.to(torch.float32)[:, None]
    return onehot * lam + onehot[p.partner] * (1.0 - lam)


def mix_batch(x: Tensor, target: Tensor, num_classes: int, index: Tensor, epoch: int, seed: int,
              mixup: float = 0.0, cutmix: float = 0.0, per_sample: bool = True) -> tuple[Tensor, Tensor]:
    """Mixed images and soft targets (N, C) for a normalized batch; see `mix_params`."""
    if x.dim() != 4 or target.shape != (x.shape[0],) or torch.as_tensor(index).shape != (x.shape[0],):
        raise KdforgeError(f"mix_batch: images {tuple(x.shape)}, target {tuple(target.shape)} and index "
                           f"{tuple(torch.as_tensor(index).shape)} must describe the same N samples")
    params = mix_params(index, epoch, seed, x.shape[2], x.shape[3], mixup, cutmix, per_sample)
    return apply_mix(x, params), mix_targets(target, num_classes, params)
