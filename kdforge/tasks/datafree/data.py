"""Original data (teacher only) and a shifted, polluted "web" pool (student only) for KD³.

The teacher is trained on `procedural_cifar` images; then that training set is discarded. The
student sees only a web pool built like a web crawl for the same class names:

* `in_class` (default 50%): new draws of the original classes, re-styled (colour gain and offset,
  posterisation; blur is optional) - right content, shifted p(x);
* `related` (20%): original-class images whose 4x4 tiles are shuffled - the colours and textures
  of the class, but not the object (the "cat food" of a "cat" query);
* `other` (30%): images of an unrelated procedural data set (different generator seed) and noise.

Every sample keeps its true class (-1 for off-topic) and kind, for selection-precision diagnostics
only; the student never reads them. The original test split is the evaluation set; an optional
validation split (`num_val` more original-distribution images, disjoint from the test split) is
for the experimenter's choices (a loss weight, a selection fraction), never for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import KdforgeError

__all__ = ["DataFreeData", "DataFreeDataConfig", "KINDS", "build_datafree", "restyle", "shuffle_tiles"]

KINDS = ("in_class", "related", "other")


@dataclass
class DataFreeData:
    """Teacher train split, web pool (images, true labels / -1, kind ids) and original test split."""

    orig_images: Tensor
    orig_labels: Tensor
    web_images: Tensor
    web_labels: Tensor
    web_kind: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_images: Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    val_labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def restyle(
    images: Tensor, gen: torch.Generator, levels: int = 6, blur: bool = False, gain_std: float = 0.2,
    swap_p: float = 0.0,
) -> Tensor:
    """Style shift of uint8 images: colour gain/offset (optional channel swap), posterisation, 3x3 blur."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise KdforgeError(f"restyle: need uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.float() / 255.0
    n, c = x.shape[:2]
    swap = torch.rand(n, generator=gen) < swap_p
    perm = torch.stack([torch.randperm(c, generator=gen) for _ in range(n)])  # (N, C)
    perm[~swap] = torch.arange(c)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gain = torch.exp(gain_std * torch.randn(n, c, 1, 1, generator=gen))
    x = (x * gain + 0.05 * torch.randn(n, 1, 1, 1, generator=gen)).clamp(0, 1)
    if levels > 1:
        x = torch.round(x * (levels - 1)) / (levels - 1)
    if blur:
        k = torch.full((c, 1, 3, 3), 1.0 / 9.0)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def shuffle_tiles(images: Tensor, gen: torch.Generator, grid: int = 4) -> Tensor:
    """Shuffle a grid x grid tiling of each image independently (keeps colours, destroys the object)."""
    n, c, h, w = images.shape
    if h % grid or w % grid:
        raise KdforgeError(f"shuffle_tiles: image size {h}x{w} is not divisible by grid {grid}")
    th, tw = h // grid, w // grid
    tiles = images.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    order = torch.stack([torch.randperm(grid * grid, generator=gen) for _ in range(n)])
    tiles = torch.gather(tiles, 1, order[:, :, None, None, None].expand_as(tiles))
    return tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def build_datafree(
    num_classes: int = 10,
    num_orig: int = 2000,
    num_web: int = 3000,
    num_test: int = 1000,
    image_size: int = 16,
    fractions: tuple[float, float, float] = (0.5, 0.2, 0.3),
    seed: int = 0,
    num_val: int = 0,
) -> DataFreeData:
    """Original train/test splits of procedural_cifar(`seed`) and a web pool drawn as described above.

    With `num_val` > 0 the original-distribution draw holds `num_test + num_val` images: the first
    `num_val` are the validation split, the rest the test split (`num_val` = 0: the test draw as before).
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise KdforgeError(f"build_datafree: fractions (in_class, related, other) must sum to 1, got {fractions}")
    if min(num_orig, num_web, num_test) < 1 or num_val < 0:
        raise KdforgeError("build_datafree: num_orig, num_web and num_test must be >= 1 and num_val >= 0")
    n_in, n_rel = int(round(fractions[0] * num_web)), int(round(fractions[1] * num_web))
    n_other = num_web - n_in - n_rel
    kw = {"num_classes": num_classes, "num_superclasses": num_classes, "image_size": image_size}
    train = procedural_cifar("train", num_orig + n_in + n_rel, num_test, seed, **kw)
    test = procedural_cifar("test", num_orig + n_in + n_rel, num_test + num_val, seed, **kw)
    n_foreign = n_other - n_other // 3
    foreign = procedural_cifar("train", max(n_foreign, 1), 10, seed + 7919, **kw)
    gen = torch.Generator().manual_seed(seed * 7 + 3)
    web_in = restyle(train.images[num_orig : num_orig + n_in], gen)
    rel = train.images[num_orig + n_in : num_orig + n_in + n_rel]
    web_rel = restyle(shuffle_tiles(rel, gen, grid=4), gen)
    noise = (torch.rand(n_other - n_foreign, 3, image_size, image_size, generator=gen) * 255).to(torch.uint8)
    web_other = torch.cat([restyle(foreign.images[:n_foreign], gen, swap_p=1.0), noise])
    images = torch.cat([web_in, web_rel, web_other])
    labels = torch.cat([train.labels[num_orig : num_orig + n_in], torch.full((n_rel + n_other,), -1)])
    kind = torch.cat([torch.zeros(n_in), torch.ones(n_rel), torch.full((n_other,), 2)]).long()
    order = torch.randperm(num_web, generator=gen)
    return DataFreeData(
        orig_images=train.images[:num_orig], orig_labels=train.labels[:num_orig],
        web_images=images[order], web_labels=labels[order], web_kind=kind[order],
        test_images=test.images[num_val:], test_labels=test.labels[num_val:], num_classes=num_classes,
        mean=train.mean, std=train.std, val_images=test.images[:num_val], val_labels=test.labels[:num_val],
    )


@dataclass
class DataFreeDataConfig:
    """The `data:` section of a data-free recipe: `build_datafree`'s arguments."""

    num_classes: int = 10
    num_orig: int = 2000
    num_web: int = 3000
    num_test: int = 1000
    image_size: int = 16
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])
    seed: int = 0
    num_val: int = 0       # original-distribution validation images (experimenter's choices only)

    def build(self) -> DataFreeData:
        return build_datafree(self.num_classes, self.num_orig, self.num_web, self.num_test, self.image_size,
                              tuple(self.fractions), self.seed, self.num_val)
