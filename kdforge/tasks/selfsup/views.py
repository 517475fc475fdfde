"""Batched, seeded multi-crop views for self-distillation (DINO-style), in pure torch.

Each view is a random resized crop (per-image scale and aspect ratio, via one `affine_grid`),
a horizontal flip, brightness/contrast jitter and random greyscale, then normalisation. A view
is a pure function of the generator state, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.data.transforms import normalize, to_float
from kdforge.errors import KdforgeError

__all__ = ["crop_boxes", "random_view"]


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
    x = to_float(images) if images.dtype == torch.uint8 else images
    n = x.shape[0]
    box = crop_boxes(n, scale, gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = box[:, 2] * flip, box[:, 0]
    theta[:, 1, 1], theta[:, 1, 2] = box[:, 3], box[:, 1]
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        b = 1 + jitter * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
        c = 1 + jitter * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
        m = v.mean(dim=(1, 2, 3), keepdim=True)
        v = ((v - m) * c + m) * b
    if grey_p > 0:
        g = (torch.rand(n, 1, 1, 1, generator=gen) < grey_p).float()
        v = g * v.mean(1, keepdim=True).expand_as(v) + (1 - g) * v
    return normalize(v.clamp(0, 1), mean, std)
