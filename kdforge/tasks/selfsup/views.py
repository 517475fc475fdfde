"""Batched, seeded multi-crop views for self-distillation (DINO-style), in pure torch.

Each view is a random resized crop (per-image scale and aspect ratio, via one `affine_grid`),
a horizontal flip, brightness/contrast jitter and random greyscale, then normalisation.

The random draws (`view_params`) are separate from their application (`apply_view`): a task
draws the parameters of a whole *global* batch from a generator seeded by (seed, epoch, step)
and each DDP rank applies its share, so a view is a pure function of (seed, epoch, step, position)
and a distributed run sees the views of one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.data.transforms import normalize, to_float
from kdforge.errors import KdforgeError

__all__ = ["apply_view", "crop_boxes", "random_view", "slice_params", "view_params"]


def crop_boxes(n: int, scale: tuple[float, float], gen: torch.Generator) -> Tensor:
    """(n, 4) boxes (cx, cy, w, h) in [-1, 1] image units: area fraction in `scale`, ratio in [3/4, 4/3]."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise KdforgeError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    area = lo + (hi - lo) * torch.rand(n, generator=gen)
    log_r = (torch.rand(n, generator=gen) * 2 - 1) * math.log(4 / 3)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    return torch.stack([cx, cy, w, h], 1)


def view_params(n: int, scale: tuple[float, float], gen: torch.Generator, jitter: float = 0.4,
                grey_p: float = 0.2) -> dict[str, Tensor]:
    """The random draws of `n` views (CPU tensors, first dim n): crop box, flip, jitter, greyscale."""
    box = crop_boxes(n, scale, gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    out = {"box": box, "flip": flip}
    if jitter > 0:
        out["bright"] = 1 + jitter * (torch.rand(n, generator=gen) * 2 - 1)
        out["contrast"] = 1 + jitter * (torch.rand(n, generator=gen) * 2 - 1)
    if grey_p > 0:
        out["grey"] = (torch.rand(n, generator=gen) < grey_p).float()
    return out


def slice_params(params: dict[str, Tensor], part: Tensor | slice) -> dict[str, Tensor]:
    """The parameters of a subset of the views (e.g. this rank's share of a global batch)."""
    return {k: v[part] for k, v in params.items()}


def apply_view(images: Tensor, params: dict[str, Tensor], size: int, mean: Sequence[float],
               std: Sequence[float]) -> Tensor:
    """Apply drawn view parameters to uint8 or [0, 1] images: normalised (B, C, size, size) views."""
    x = to_float(images) if images.dtype == torch.uint8 else images
    n, dev = x.shape[0], x.device
    box, flip = params["box"].to(dev), params["flip"].to(dev)
    if len(box) != n:
        raise KdforgeError(f"apply_view: {n} images but parameters for {len(box)} views")
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = box[:, 2] * flip, box[:, 0]
    theta[:, 1, 1], theta[:, 1, 2] = box[:, 3], box[:, 1]
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if "bright" in params:
        b = params["bright"].to(dev).view(n, 1, 1, 1)
        c = params["contrast"].to(dev).view(n, 1, 1, 1)
        m = v.mean(dim=(1, 2, 3), keepdim=True)
        v = ((v - m) * c + m) * b
    if "grey" in params:
        g = params["grey"].to(dev).view(n, 1, 1, 1)
        v = g * v.mean(1, keepdim=True).expand_as(v) + (1 - g) * v
    return normalize(v.clamp(0, 1), mean, std)


def random_view(
    images: Tensor,
    size: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    jitter: float = 0.4,
    grey_p: float = 0.2,
) -> Tensor:
    """One augmented, normalised view (B, C, size, size) of uint8 or [0, 1] images."""
    return apply_view(images, view_params(images.shape[0], scale, gen, jitter, grey_p), size, mean, std)
