"""Procedural bar images whose orientation is the attribute a diffusion model is conditioned on.

Each image is `size` x `size` grayscale in [-1, 1]: a bright bar (+1) on a dark background (-1)
plus optional Gaussian pixel noise. The bar is horizontal (label 0) or vertical (label 1); its
centre, length and thickness vary. Every image is a pure function of (seed, index), so splits
drawn with different seeds hold different images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["HORIZONTAL", "ORIENTATIONS", "VERTICAL", "BarData", "bar_images"]

HORIZONTAL, VERTICAL = 0, 1
ORIENTATIONS = ("horizontal", "vertical")


@dataclass
class BarData:
    """images (N, 1, S, S) float in [-1, 1], labels (N,) (0 horizontal, 1 vertical), masks (N, S, S) bool (the bar)."""

    images: Tensor
    labels: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor) -> BarData:
        return BarData(self.images[index], self.labels[index], self.masks[index])


def bar_images(labels: Tensor, size: int = 16, seed: int = 0, thickness: tuple[int, int] = (2, 3),
               length: tuple[int, int] = (8, 14), noise: float = 0.0) -> BarData:
    """One bar per label (0 horizontal, 1 vertical) with seeded centre, length and thickness."""
    lo_t, hi_t = thickness
    lo_l, hi_l = length
    if size < 8 or not 1 <= lo_t <= hi_t < size or not 2 <= lo_l <= hi_l <= size:
        raise KdforgeError(f"bar_images: need size >= 8, 1 <= thickness <= size and 2 <= length <= size, got "
                           f"size {size}, thickness {thickness}, length {length}")
    n = len(labels)
    g = seeded_generator(seed, 8101)
    thick = torch.randint(lo_t, hi_t + 1, (n,), generator=g)
    long = torch.randint(lo_l, hi_l + 1, (n,), generator=g)
    u = torch.rand(n, generator=g)
    v = torch.rand(n, generator=g)
    pix = torch.randn(n, 1, size, size, generator=g) * noise
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)
    # start of the bar along its length and across it, uniformly where the whole bar fits
    along0 = (u * (size - long + 1)).floor().long().view(n, 1, 1)
    across0 = (v * (size - thick + 1)).floor().long().view(n, 1, 1)
    long, thick = long.view(n, 1, 1), thick.view(n, 1, 1)
    horiz = ((cols >= along0) & (cols < along0 + long) & (rows >= across0) & (rows < across0 + thick))
    vert = ((rows >= along0) & (rows < along0 + long) & (cols >= across0) & (cols < across0 + thick))
    masks = torch.where(labels.view(n, 1, 1) == VERTICAL, vert, horiz)
    images = (masks.float() * 2 - 1).unsqueeze(1) + pix
    return BarData(images.clamp(-1, 1), labels.long().clone(), masks)
