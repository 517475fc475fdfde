"""Procedural multi-label images: 1 to `max_objects` glyphs of distinct classes per image.

Why procedural: multi-label distillation needs images where several labels compete for one
image and label frequencies differ (rare labels), without a download. Each class is a glyph
shape (disc, ring, square, plus, cross, triangle, bars, diamond, half-disc, dots). A glyph is
drawn in a random colour that contrasts with the background (colour carries no label), in its
own cell of a 2x2 grid with jitter, at a random scale and a small rotation, over clutter: a
colour gradient, distractor blobs and pixel noise. So the label is the *shape* only and it is
only a few pixels wide: the task is learnable but not trivial for a small network.

Label frequencies follow a geometric profile: class 0 is the most common and class C-1 the
rarest (its sampling weight is `rarity` times class 0's). An image holds k ~ U{1..max_objects}
distinct classes drawn without replacement by those weights (Gumbel top-k), so with the
defaults the rarest label appears in about 5% of images. All shapes are symmetric under a
horizontal flip, so flip augmentation keeps every label.

Generation is vectorised in torch and deterministic in `seed` (train, test and the optional
validation split come from independent streams, so asking for `num_val` validation images leaves
train and test unchanged), and memoised in memory: a 3k-image split takes well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["SHAPES", "MultiLabelData", "label_frequencies", "procedural_multilabel"]

NAME = "procedural_multilabel"
VERSION = 1
SHAPES = ("disc", "ring", "square", "plus", "cross", "triangle", "bars", "diamond", "halfdisc", "dots")
_CHUNK = 4096
_CELLS = ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5))  # 2x2 grid centres in [-1, 1] units
_JITTER = 0.12  # cell-centre jitter (image half-width units)
_RADIUS = 0.36  # glyph radius (image half-width units): ~4.3 px at 24 px
_LOG_SCALE = 0.15  # glyph scale jitter (log-uniform half-width)
_ROT = 0.2  # rad, std of the rotation jitter
_NOISE = 0.06  # pixel noise std


@dataclass
class MultiLabelData:
    """A multi-label split: uint8 images (N, C, H, W) and multi-hot float targets (N, num_classes)."""

    images: Tensor
    targets: Tensor
    num_classes: int
    name: str = NAME
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise KdforgeError(
                f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.targets.shape != (self.images.shape[0], self.num_classes):
            raise KdforgeError(
                f"{self.name}: targets must be (N, {self.num_classes}) multi-hot, got "
                f"{tuple(self.targets.shape)} for {self.images.shape[0]} images"
            )
        self.targets = self.targets.float()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Tensor) -> MultiLabelData:
        """Some samples of the split (e.g. a validation part carved from train)."""
        return MultiLabelData(
            self.images[indices],
            self.targets[indices],
            self.num_classes,
            self.name,
            self.mean,
            self.std,
            list(self.class_names),
        )


def label_frequencies(targets: Tensor) -> Tensor:
    """Fraction of images carrying each label (C,)."""
    return targets.float().mean(0)


def _field(name: str, u: Tensor, v: Tensor) -> Tensor:
    """Signed inside-measure of glyph `name` at object coordinates (positive inside, radius-1 units)."""
    r = torch.sqrt(u**2 + v**2)
    au, av = u.abs(), v.abs()
    if name == "disc":
        return 0.85 - r
    if name == "ring":
        return 0.2 - (r - 0.65).abs()
    if name == "square":
        return 0.75 - torch.maximum(au, av)
    if name in ("plus", "cross"):
        if name == "cross":  # the plus turned by 45 degrees
            au, av = ((u + v) / math.sqrt(2)).abs(), ((u - v) / math.sqrt(2)).abs()
        return torch.maximum(torch.minimum(0.25 - au, 0.95 - av), torch.minimum(0.25 - av, 0.95 - au))
    if name == "triangle":  # apex up (image y grows downwards), base at v = 0.65
        return torch.minimum(0.65 - v, 0.62 * (v + 0.9) - au)
    if name == "bars":  # three horizontal bars
        near = torch.minimum(torch.minimum((v + 0.62).abs(), v.abs()), (v - 0.62).abs())
        return torch.minimum(0.85 - au, 0.17 - near)
    if name == "diamond":  # outline
        return 0.17 - (au + av - 0.72).abs()
    if name == "halfdisc":  # lower half of a disc
        return torch.minimum(0.9 - r, v + 0.05)
    if name == "dots":  # four small discs
        d = torch.sqrt((au - 0.48) ** 2 + (av - 0.48) ** 2)
        return 0.3 - d
    raise KdforgeError(f"{NAME}: unknown shape '{name}'")


def _sample_labels(n: int, weights: Tensor, max_objects: int, gen: torch.Generator) -> Tensor:
    """(n, max_objects) class ids, -1 for empty slots: k ~ U{1..max_objects} distinct classes (Gumbel)."""
    c = weights.numel()
    k = torch.randint(1, max_objects + 1, (n,), generator=gen)
    gumbel = -torch.log(-torch.log(torch.rand((n, c), generator=gen).clamp(1e-12, 1 - 1e-7)))
    order = torch.argsort(weights.log().unsqueeze(0) + gumbel, dim=1, descending=True)[:, :max_objects]
    slot = torch.arange(max_objects).unsqueeze(0)
    return torch.where(slot < k.unsqueeze(1), order, torch.full_like(order, -1))


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts, so the train and test streams are independent."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _unif(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _render(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Render float (n, 3, size, size) images in [0, 1] holding the glyphs of `labels` (n, slots)."""
    n, slots = labels.shape
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = coords.view(1, size, 1), coords.view(1, 1, size)

    def col(x: Tensor) -> Tensor:
        return x.view(n, 1, 1)

    # background: base colour + linear gradient + distractor blobs
    base = _unif(gen, (n, 3), 0.3, 0.7)
    grad = _unif(gen, (n, 3, 2), -0.12, 0.12)
    img = (
        base.view(n, 3, 1, 1)
        + grad[..., 0].view(n, 3, 1, 1) * gx.unsqueeze(0)
        + grad[..., 1].view(n, 3, 1, 1) * gy.unsqueeze(0)
    )
    for _ in range(2):
        bx, by = _unif(gen, (n,), -1.0, 1.0), _unif(gen, (n,), -1.0, 1.0)
        rad = _unif(gen, (n,), 0.06, 0.14)
        alpha = torch.exp(-((gx - col(bx)) ** 2 + (gy - col(by)) ** 2) / col(2 * rad**2)) * 0.7
        img = torch.lerp(img, _unif(gen, (n, 3), 0.0, 1.0).view(n, 3, 1, 1), alpha.unsqueeze(1))

    cells = torch.tensor(_CELLS)
    cell_order = torch.argsort(torch.rand((n, len(_CELLS)), generator=gen), dim=1)
    for j in range(slots):
        cls = labels[:, j]
        centre = cells[cell_order[:, j]] + _unif(gen, (n, 2), -_JITTER, _JITTER)
        radius = _RADIUS * torch.exp(_unif(gen, (n,), -_LOG_SCALE, _LOG_SCALE))
        theta = torch.randn((n,), generator=gen) * _ROT
        sign = torch.where(torch.rand((n, 3), generator=gen) < 0.5, -1.0, 1.0)
        colour = (base + sign * _unif(gen, (n, 3), 0.3, 0.55)).clamp(0.0, 1.0)
        dx, dy = gx - col(centre[:, 0]), gy - col(centre[:, 1])
        ct, st = col(torch.cos(theta)), col(torch.sin(theta))
        u, v = (dx * ct + dy * st) / col(radius), (-dx * st + dy * ct) / col(radius)
        inside = torch.full((n, size, size), -1.0)
        for c in cls.unique().tolist():
            if c < 0:
                continue
            idx = (cls == c).nonzero().flatten()
            inside[idx] = _field(SHAPES[c], u[idx], v[idx])
        # ~1 px soft edge: the field is in radius units, one pixel is 2 / (size * radius) of them
        alpha = torch.sigmoid(inside * col(radius * size))
        img = torch.lerp(img, colour.view(n, 3, 1, 1), alpha.unsqueeze(1))
    img = img + torch.randn(img.shape, generator=gen) * _NOISE
    return img.clamp_(0.0, 1.0)


def _validate(
    split: str,
    num_train: int,
    num_test: int,
    num_classes: int,
    image_size: int,
    max_objects: int,
    rarity: float,
    num_val: int = 0,
) -> None:
    if split not in ("train", "val", "test"):
        raise KdforgeError(f"{NAME}: unknown split '{split}'; expected 'train', 'val' or 'test'")
    if split == "val" and num_val < 1:
        raise KdforgeError(f"{NAME}: no validation split: set num_val >= 1 (data.num_val in a recipe)")
    if num_val < 0:
        raise KdforgeError(f"{NAME}: num_val must be >= 0, got {num_val}")
    if not 2 <= num_classes <= len(SHAPES):
        raise KdforgeError(f"{NAME}: num_classes must be 2-{len(SHAPES)}, got {num_classes}")
    if num_train < 1 or num_test < 1:
        raise KdforgeError(f"{NAME}: num_train and num_test must be >= 1, got {num_train} and {num_test}")
    if image_size < 12:
        raise KdforgeError(f"{NAME}: image_size must be >= 12, got {image_size}")
    if not 1 <= max_objects <= min(len(_CELLS), num_classes):
        raise KdforgeError(
            f"{NAME}: max_objects must be 1-{min(len(_CELLS), num_classes)}, got {max_objects}"
        )
    if not 0 < rarity <= 1:
        raise KdforgeError(f"{NAME}: rarity must be in (0, 1], got {rarity}")


@functools.lru_cache(maxsize=8)
def _generate(
    num_train: int,
    num_test: int,
    num_classes: int,
    image_size: int,
    max_objects: int,
    rarity: float,
    seed: int,
    num_val: int = 0,
) -> dict[str, tuple[Tensor, Tensor]]:
    weights = rarity ** (torch.arange(num_classes, dtype=torch.float64) / (num_classes - 1))
    out: dict[str, tuple[Tensor, Tensor]] = {}
    splits = [("train", num_train), ("test", num_test)] + ([("val", num_val)] if num_val > 0 else [])
    for split, n in splits:
        gen = torch.Generator().manual_seed(_derive_seed(NAME, VERSION, seed, split))
        labels = _sample_labels(n, weights.float(), max_objects, gen)
        images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            images[start:stop] = (
                (_render(labels[start:stop], image_size, gen) * 255.0).round_().to(torch.uint8)
            )
        targets = torch.zeros(n, num_classes)
        rows = torch.arange(n).unsqueeze(1).expand_as(labels)
        present = labels >= 0
        targets[rows[present], labels[present]] = 1.0
        out[split] = (images, targets)
    return out


def procedural_multilabel(
    split: str = "train",
    num_train: int = 3000,
    num_test: int = 1000,
    num_classes: int = 6,
    image_size: int = 24,
    max_objects: int = 3,
    rarity: float = 0.08,
    seed: int = 0,
    num_val: int = 0,
) -> MultiLabelData:
    """One split (`train`, `val` or `test`) of the procedural multi-label set.

    Normalisation statistics come from train. `val` (needs `num_val` >= 1) is drawn from its own
    stream of `seed`, like test: a held-out split for choosing settings, never the test split.
    """
    _validate(split, num_train, num_test, num_classes, image_size, max_objects, rarity, num_val)
    data = _generate(
        int(num_train),
        int(num_test),
        int(num_classes),
        int(image_size),
        int(max_objects),
        float(rarity),
        int(seed),
        int(num_val),
    )
    x = data["train"][0].double().div(255.0)
    mean = tuple(float(m) for m in x.mean(dim=(0, 2, 3)))
    std = tuple(float(s) for s in x.std(dim=(0, 2, 3)))
    images, targets = data[split]
    return MultiLabelData(images, targets.clone(), num_classes, NAME, mean, std, list(SHAPES[:num_classes]))
