"""Procedural image-caption pairs: a coloured shape on noise, described by a short caption.

Each pair is a pure function of (seed, index order): a 32x32 image of one of 5 shapes in one of
5 colours, small or large, at the left / centre / right, on a noisy grey background, and a
caption such as "a small red disc at the left" in which the size and position phrases are
optional and up to `distractors` content-free words are inserted at random places. The 25
(colour, shape) pairs are the zero-shot classes; their prompts are "a <colour> <shape>", the
form of the shortest captions, so a text tower trained on captions reads them in-distribution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.errors import ConfigError

__all__ = ["COLOURS", "SHAPES", "PairData", "class_prompts", "make_pairs", "vocabulary"]

SHAPES = ("disc", "square", "triangle", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
DISTRACTORS = ("photo", "picture", "nice", "image", "some", "noisy", "view", "seen", "here", "shot")
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_RGB = torch.tensor([[0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.3, 0.95], [0.95, 0.9, 0.15], [0.7, 0.2, 0.85]])


@dataclass
class PairData:
    """One split: uint8 images (N, 3, S, S), their captions, and the (colour, shape) class of each."""

    images: Tensor
    captions: list[str]
    labels: Tensor                  # colour * len(SHAPES) + shape

    def __len__(self) -> int:
        return int(self.images.shape[0])


def vocabulary() -> list[str]:
    """Every word a caption or prompt uses, special tokens first (<pad> 0, <unk> 1, <bos> 2, <eos> 3)."""
    return [*SPECIALS, "a", "at", "the", *SIZES, *COLOURS, *SHAPES, *POSITIONS, *DISTRACTORS]


def class_prompts() -> tuple[list[str], list[str]]:
    """(class names "red disc", prompts "a red disc") of the 25 zero-shot classes, in label order."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    return names, [f"a {n}" for n in names]


def _shape_masks(shape: Tensor, cx: Tensor, cy: Tensor, r: Tensor, size: int) -> Tensor:
    """(N, S, S) boolean masks of each sample's shape (vectorised over the batch)."""
    grid = torch.arange(size, dtype=torch.float32)
    dx = grid.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = grid.view(1, -1, 1) - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    dist = (dx ** 2 + dy ** 2).sqrt()
    masks = torch.stack([
        dist <= r,                                                                  # disc
        torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r,                               # square
        (dy >= -r) & (dy <= 0.7 * r) & (dx.abs() <= 0.6 * (dy + r)),                # triangle
        ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r)),   # cross
        (dist <= r) & (dist >= 0.55 * r),                                           # ring
    ], 1)
    return masks[torch.arange(len(shape)), shape]


def _caption(rng: random.Random, colour: int, shape: int, size: int, position: int, distractors: int) -> str:
    words = ["a"]
    if rng.random() < 0.5:
        words.append(SIZES[size])
    words += [COLOURS[colour], SHAPES[shape]]
    if rng.random() < 0.5:
        words += ["at", "the", POSITIONS[position]]
    for _ in range(rng.randint(0, distractors)):
        words.insert(rng.randint(0, len(words)), rng.choice(DISTRACTORS))
    return " ".join(words)


def make_pairs(n: int, seed: int, size: int = 32, noise: float = 0.1, distractors: int = 2) -> PairData:
    """`n` seeded image-caption pairs (classes, sizes and positions uniform)."""
    if n < 1 or size < 16 or noise < 0 or distractors < 0:
        raise ConfigError(f"data: need n >= 1, size >= 16, noise >= 0 and distractors >= 0, "
                          f"got {n}, {size}, {noise}, {distractors}")
    gen = torch.Generator().manual_seed(int(seed))
    colour = torch.randint(0, len(COLOURS), (n,), generator=gen)
    shape = torch.randint(0, len(SHAPES), (n,), generator=gen)
    big = torch.randint(0, 2, (n,), generator=gen)
    pos = torch.randint(0, 3, (n,), generator=gen)
    u = torch.rand(n, 4, generator=gen)
    r = size * torch.where(big.bool(), 0.3 + 0.04 * u[:, 0], 0.2 + 0.04 * u[:, 0])
    cx = size * torch.tensor([0.3, 0.5, 0.7])[pos] + 2 * u[:, 1] - 1
    cy = size * (0.5 + 0.2 * (u[:, 2] - 0.5))
    mask = _shape_masks(shape, cx, cy, r, size).unsqueeze(1)                        # (N, 1, S, S)
    grey = 0.3 + 0.3 * u[:, 3].view(-1, 1, 1, 1)
    back = grey + noise * torch.randn(n, 3, size, size, generator=gen)
    tint = (_RGB[colour] + 0.08 * (2 * torch.rand(n, 3, generator=gen) - 1)).view(n, 3, 1, 1)
    fore = tint + 0.5 * noise * torch.randn(n, 3, size, size, generator=gen)
    images = (torch.where(mask, fore, back).clamp(0, 1) * 255).round().to(torch.uint8)
    rng = random.Random(int(seed) * 7919 + 1)
    captions = [_caption(rng, int(c), int(s), int(b), int(p), distractors)
                for c, s, b, p in zip(colour, shape, big, pos)]
    return PairData(images, captions, colour * len(SHAPES) + shape)
