"""Taxonomy-adaptive domain adaptation data: a labelled source domain with old classes, a shifted
target domain with the old classes plus new ones, few labels per target class.

Both domains render the same procedural classes (`procedural_cifar`, one pattern family per
class); the target is re-styled by a fixed domain shift (channel rotation, lower contrast, colour
gain and posterisation), so the shift is systematic, as between two scanners. Source carries
classes [0, num_old); the target carries [0, num_old + num_new). Target splits: `few` labelled
(shots per class), `unlabelled` (for mixing/pseudo-labels) and `test`. `mix_domains` pastes
target patches into source images, placed by a pure function of (seed, epoch, step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["DomainData", "build_domains", "domain_shift", "mix_domains"]

MIX_STREAM = 4      # seeded_generator id of the patch positions (the domain task uses 1-3)


@dataclass
class DomainData:
    src_images: Tensor
    src_labels: Tensor
    few_images: Tensor
    few_labels: Tensor
    unl_images: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_old: int
    num_new: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return self.num_old + self.num_new


def domain_shift(images: Tensor, gen: torch.Generator, contrast: float = 0.6, levels: int = 5) -> Tensor:
    """Fixed target style of uint8 images: RGB -> GBR, contrast x`contrast`, small gain jitter, posterise."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise KdforgeError(f"domain_shift: need uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.float()[:, [1, 2, 0]] / 255.0
    x = (x - 0.5) * contrast + 0.5
    x = x * torch.exp(0.08 * torch.randn(len(x), 3, 1, 1, generator=gen))
    x = torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)
    return (x * 255).round().to(torch.uint8)


def _take(labels: Tensor, classes: range, per_class: int, used: Tensor) -> Tensor:
    out = []
    for c in classes:
        idx = ((labels == c) & ~used).nonzero().flatten()[:per_class]
        if len(idx) < per_class:
            raise KdforgeError(f"build_domains: class {c} has only {len(idx)} free samples, need {per_class}")
        used[idx] = True
        out.append(idx)
    return torch.cat(out)


def build_domains(
    num_old: int = 4,
    num_new: int = 2,
    src_per_class: int = 200,
    shots: int = 5,
    unl_per_class: int = 60,
    test_per_class: int = 100,
    image_size: int = 16,
    seed: int = 0,
) -> DomainData:
    """Source/target splits as described above (disjoint draws of one procedural data set)."""
    if num_old < 1 or num_new < 0 or min(src_per_class, shots, unl_per_class, test_per_class) < 1:
        raise KdforgeError("build_domains: need num_old >= 1, num_new >= 0 and positive split sizes")
    c = num_old + num_new
    per = src_per_class + shots + unl_per_class
    total = int(per * c * 1.4) + 50
    kw = {"num_classes": c, "num_superclasses": c, "image_size": image_size}
    tr = procedural_cifar("train", total, int(test_per_class * c * 1.4) + 50, seed, **kw)
    te = procedural_cifar("test", total, int(test_per_class * c * 1.4) + 50, seed, **kw)
    used = torch.zeros(len(tr.labels), dtype=torch.bool)
    src = _take(tr.labels, range(num_old), src_per_class, used)
    few = _take(tr.labels, range(c), shots, used)
    unl = _take(tr.labels, range(c), unl_per_class, used)
    test = _take(te.labels, range(c), test_per_class, torch.zeros(len(te.labels), dtype=torch.bool))
    gen = torch.Generator().manual_seed(seed * 11 + 5)
    return DomainData(
        src_images=tr.images[src], src_labels=tr.labels[src],
        few_images=domain_shift(tr.images[few], gen), few_labels=tr.labels[few],
        unl_images=domain_shift(tr.images[unl], gen),
        test_images=domain_shift(te.images[test], gen), test_labels=te.labels[test],
        num_old=num_old, num_new=num_new, mean=tr.mean, std=tr.std,
    )


def mix_domains(source: Tensor, target: Tensor, seed: int, epoch: int, step: int, frac: float = 0.5) -> Tensor:
    """Paste a square target patch (side `frac` of the image) into each source image (uint8).

    Patch positions are drawn from a generator seeded by (seed, MIX_STREAM, epoch, step), so the
    mixed batch of a step is the same however the run was stopped and resumed (the stream id keeps
    it apart from other generators of the same seed).
    """
    if source.shape != target.shape or source.dim() != 4:
        raise KdforgeError(f"mix_domains: need equal (N, C, H, W) shapes, got {tuple(source.shape)}, "
                           f"{tuple(target.shape)}")
    if not 0 < frac <= 1:
        raise KdforgeError(f"mix_domains: frac must be in (0, 1], got {frac}")
    gen = seeded_generator(seed, MIX_STREAM, epoch, step)
    n, _, h, w = source.shape
    ph, pw = max(int(h * frac), 1), max(int(w * frac), 1)
    out = source.clone()
    ys = torch.randint(0, h - ph + 1, (n,), generator=gen)
    xs = torch.randint(0, w - pw + 1, (n,), generator=gen)
    for i in range(n):
        y, x = int(ys[i]), int(xs[i])
        out[i, :, y : y + ph, x : x + pw] = target[i, :, y : y + ph, x : x + pw]
    return out
