"""Taxonomy-adaptive domain adaptation data: a labelled source domain with old classes, a shifted
target domain with the old classes plus new ones, few labels per target class.

Both domains render the same procedural classes (`procedural_cifar`, one pattern family per
class); the target is re-styled by a fixed domain shift (channel rotation, lower contrast, colour
gain and posterisation), so the shift is systematic, as between two scanners. Source carries
classes [0, num_old); the target carries [0, num_old + num_new). Target splits: `few` labelled
(shots per class), `unlabelled` (for class-mixing with pseudo-labels), an optional labelled
`val` split (for choosing settings; never the test split) and `test`; `src_test` holds the
same test draws *without* the shift (old classes only), to measure the domain gap.

`class_mix` is the official code's ClassMix (`camwew/TADA-MI`, `image_mix.oneMix`) transcribed
to image-level labels: a region of a labelled few-shot target image is pasted into an unlabelled
target image; the mixed label is the few-shot label on the pasted area fraction and the
unlabelled image's pseudo-label on the rest (the module supplies the pseudo-label). Regions are
drawn by a pure function of (seed, epoch, step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["DomainData", "build_domains", "class_mix", "domain_shift", "mix_regions"]

MIX_STREAM = 4      # seeded_generator id of the pasted regions (the domain task uses 1-3 and 5)


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
    val_images: Tensor | None = None
    val_labels: Tensor | None = None
    src_test_images: Tensor | None = None     # unshifted test draws of the old classes
    src_test_labels: Tensor | None = None
    unl_labels: Tensor | None = None          # diagnostics only (pseudo-label accuracy); never trained on

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
    val_per_class: int = 0,
) -> DomainData:
    """Source/target splits as described above (disjoint draws of one procedural data set).

    The generated pool grows with every split size (`val_per_class` included), so compare runs
    that share all of them.
    """
    if num_old < 1 or num_new < 0 or min(src_per_class, shots, unl_per_class, test_per_class) < 1 or val_per_class < 0:
        raise KdforgeError("build_domains: need num_old >= 1, num_new >= 0 and positive split sizes")
    c = num_old + num_new
    per = src_per_class + shots + unl_per_class + val_per_class
    total = int(per * c * 1.4) + 50
    kw = {"num_classes": c, "num_superclasses": c, "image_size": image_size}
    n_test = int(test_per_class * c * 1.4) + 50
    tr = procedural_cifar("train", total, n_test, seed, **kw)
    te = procedural_cifar("test", total, n_test, seed, **kw)
    used = torch.zeros(len(tr.labels), dtype=torch.bool)
    src = _take(tr.labels, range(num_old), src_per_class, used)
    few = _take(tr.labels, range(c), shots, used)
    unl = _take(tr.labels, range(c), unl_per_class, used)
    val = _take(tr.labels, range(c), val_per_class, used) if val_per_class else None
    test = _take(te.labels, range(c), test_per_class, torch.zeros(len(te.labels), dtype=torch.bool))
    gen = torch.Generator().manual_seed(seed * 11 + 5)
    few_images, unl_images = domain_shift(tr.images[few], gen), domain_shift(tr.images[unl], gen)
    test_images = domain_shift(te.images[test], gen)
    val_images = domain_shift(tr.images[val], gen) if val is not None else None
    src_test = test[te.labels[test] < num_old]
    return DomainData(
        src_images=tr.images[src], src_labels=tr.labels[src],
        few_images=few_images, few_labels=tr.labels[few], unl_images=unl_images,
        test_images=test_images, test_labels=te.labels[test],
        num_old=num_old, num_new=num_new, mean=tr.mean, std=tr.std,
        val_images=val_images, val_labels=tr.labels[val] if val is not None else None,
        src_test_images=te.images[src_test], src_test_labels=te.labels[src_test], unl_labels=tr.labels[unl],
    )


def mix_regions(n: int, height: int, width: int, area: float, seed: int, epoch: int,
                step: int) -> tuple[Tensor, Tensor]:
    """(masks (n, 1, H, W) bool, pasted area fraction (n,)): one square region per image.

    The square's side is round(sqrt(area) * side) (at least one pixel); its position is drawn from
    a generator seeded by (seed, MIX_STREAM, epoch, step), so a step's regions are the same however
    the run was stopped and resumed (the stream id keeps it apart from other generators of the seed).
    """
    if not 0 < area <= 1:
        raise KdforgeError(f"mix_regions: area must be in (0, 1], got {area}")
    gen = seeded_generator(seed, MIX_STREAM, epoch, step)
    ph = min(max(round(math.sqrt(area) * height), 1), height)
    pw = min(max(round(math.sqrt(area) * width), 1), width)
    ys = torch.randint(0, height - ph + 1, (n,), generator=gen)
    xs = torch.randint(0, width - pw + 1, (n,), generator=gen)
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    mask = ((rows >= ys[:, None, None]) & (rows < ys[:, None, None] + ph)
            & (cols >= xs[:, None, None]) & (cols < xs[:, None, None] + pw))
    frac = mask.flatten(1).float().mean(1)
    return mask[:, None], frac


def class_mix(labelled: Tensor, unlabelled: Tensor, mask: Tensor) -> Tensor:
    """ClassMix of the official code (`oneMix`): `labelled` where `mask`, `unlabelled` elsewhere.

    `labelled` / `unlabelled`: (N, C, H, W) images of any dtype (a view of the few-shot target
    batch and of the unlabelled target batch); `mask`: (N, 1, H, W) bool.
    """
    if labelled.shape != unlabelled.shape or labelled.dim() != 4 or mask.shape != (len(labelled), 1,
                                                                                   *labelled.shape[2:]):
        raise KdforgeError(f"class_mix: need equal (N, C, H, W) images and an (N, 1, H, W) mask, got "
                           f"{tuple(labelled.shape)}, {tuple(unlabelled.shape)}, {tuple(mask.shape)}")
    return torch.where(mask.to(labelled.device), labelled, unlabelled)
