"""Multi-object canvases for zero-shot segmentation, drawn with the vision-language shape renderer.

Each canvas (S x S, default 64) holds 2-4 coloured shapes from `kdforge.tasks.vision_language.data`
(the same 5 shapes, 5 colours, tints, noise and radii as the 32 px single-object images the CLIP
teacher was trained on) on the same noisy grey background, at non-overlapping random places. So a
cell of a 2x2 grid shows objects at the scale the teacher knows, and grid cells often hold one
object. The per-pixel class mask uses 0 for background and 1 + (colour * 5 + shape) for an object,
i.e. the vision-language class index shifted by one. A canvas set is a pure function of its seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.errors import ConfigError
from kdforge.tasks.vision_language.data import _RGB, COLOURS, SHAPES, _shape_masks

__all__ = ["BACKGROUND", "Canvases", "make_canvases", "num_classes"]

BACKGROUND = 0


def num_classes() -> int:
    """Background + the 25 (colour, shape) classes."""
    return 1 + len(COLOURS) * len(SHAPES)


@dataclass
class Canvases:
    """uint8 images (N, 3, S, S), class masks (N, S, S) int64 (0 = background), instance masks (N, S, S)
    (0 = background, k = the k-th object), and the objects of each canvas."""

    images: Tensor
    masks: Tensor
    instances: Tensor
    objects: list[list[tuple[int, float, float, float]]]     # (class 0..24, cx, cy, r) of each object

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _place(rng: random.Random, radii: list[float], size: int, gap: float = 2.0, tries: int = 200) -> list[tuple]:
    """Centres for objects of `radii` whose bounding discs do not overlap (an object that finds no place
    in `tries` draws is dropped)."""
    placed: list[tuple[float, float, float]] = []
    for r in radii:
        for _ in range(tries):
            cx, cy = rng.uniform(r, size - 1 - r), rng.uniform(r, size - 1 - r)
            if all(math.hypot(cx - x, cy - y) >= r + q + gap for x, y, q in placed):
                placed.append((cx, cy, r))
                break
    return placed


def make_canvases(n: int, seed: int, size: int = 64, min_objects: int = 2, max_objects: int = 4,
                  noise: float = 0.1, object_scale: float = 32.0) -> Canvases:
    """`n` seeded canvases; radii follow the renderer's (0.20-0.24 or 0.30-0.34 of `object_scale` px)."""
    if n < 1 or size < 16 or not 1 <= min_objects <= max_objects or noise < 0 or object_scale <= 0:
        raise ConfigError(f"canvases: need n >= 1, size >= 16, 1 <= min_objects <= max_objects, noise >= 0 and "
                          f"object_scale > 0, got {n}, {size}, {min_objects}..{max_objects}, {noise}, {object_scale}")
    rng = random.Random(int(seed) * 104729 + 17)
    gen = torch.Generator().manual_seed(int(seed))
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    instances = torch.zeros(n, size, size, dtype=torch.long)
    objects: list[list[tuple[int, float, float, float]]] = []
    for i in range(n):
        count = rng.randint(min_objects, max_objects)
        radii = [object_scale * (rng.choice((0.2, 0.3)) + 0.04 * rng.random()) for _ in range(count)]
        placed = _place(rng, radii, size)
        grey = 0.3 + 0.3 * rng.random()
        canvas = grey + noise * torch.randn(3, size, size, generator=gen)
        mine = []
        for k, (cx, cy, r) in enumerate(placed):
            colour, shape = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
            m = _shape_masks(torch.tensor([shape]), torch.tensor([cx]), torch.tensor([cy]), torch.tensor([r]),
                             size)[0]
            tint = _RGB[colour] + 0.08 * (2 * torch.rand(3, generator=gen) - 1)
            fore = tint.view(3, 1, 1) + 0.5 * noise * torch.randn(3, size, size, generator=gen)
            canvas = torch.where(m, fore, canvas)
            label = colour * len(SHAPES) + shape
            masks[i][m] = 1 + label
            instances[i][m] = 1 + k
            mine.append((label, cx, cy, r))
        images[i] = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
        objects.append(mine)
    return Canvases(images, masks, instances, objects)
