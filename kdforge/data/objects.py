"""Procedural object-on-clutter images: one coloured shape (the class) on a cluttered background.

The FerKD card's CPU data set. Why it exists: region-level distillation (FKD/FerKD) trains on
RandomResizedCrop regions, some of which show the object (easy or hard positives) and some only
background (hard negatives). That split is only meaningful when the class is a property of an
*object* that survives cropping and zooming. Here the class is the outline of one shape (disc,
square, triangle, plus, ring, star, diamond, tee, saltire, frame). Its size, position, a small
rotation, saturation and brightness are random per image; its hue is the class's hue (evenly
spaced around the colour wheel) blurred by `hue_jitter`, so colour is a partial cue that
neighbouring classes share (like real objects' typical colours) and the outline decides
(`hue_jitter=None`: fully random colours). A zoomed view of any part of the object keeps its
identity. All shapes are mirror-symmetric about the vertical axis, so a horizontal flip never
changes the class. The background is label-independent clutter: a smooth random colour field,
fine texture noise and line fragments of random colour (pieces that look like the edges of
shapes, so a crop without the object is ambiguous, not blank).

Every image also carries its object mask (`extra["mask"]`, bool (N, H, W)), so the share of the
object a crop contains can be measured exactly (which crops are hard negatives).

Generation is vectorised in torch, deterministic in `seed` (train and test from independent
streams of it) and cached on disk keyed by every parameter plus `VERSION`, like
`procedural_cifar`.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import torch
from torch import Tensor

from kdforge.data.base import ImageTensors
from kdforge.data.cache_dir import cached_split
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

# Bump whenever the generator's output changes, so old caches are never mistaken for new data.
VERSION = 1
NAME = "objects_clutter"
SHAPES = ("disc", "square", "triangle", "plus", "ring", "star", "diamond", "tee", "saltire", "frame")
_CHUNK = 2048
_SUPERSAMPLE = 2            # render at 2x and average-pool: anti-aliased edges
_ROT_JITTER = math.radians(12.0)
_TEX_SMOOTH, _TEX_FINE, _PIXEL_NOISE = 0.08, 0.03, 0.02    # background colour field, texture, pixel noise


def _derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _unif(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _bars(u: Tensor, v: Tensor, width: float, length: float) -> Tensor:
    """Signed distance-like field of a plus sign (two bars) centred at 0."""
    h = torch.maximum(u.abs() - length, v.abs() - width)
    w = torch.maximum(u.abs() - width, v.abs() - length)
    return torch.minimum(h, w)


def shape_field(shape: int, u: Tensor, v: Tensor) -> Tensor:
    """Inside (< 0) / outside (> 0) field of shape `shape` in object coordinates.

    (u, v): u to the right, v downwards, in units of the object radius (the shape fits in about
    the unit disc). Fields are scaled roughly like distances, so one edge softness fits all.
    """
    name = SHAPES[shape]
    rho = torch.sqrt(u * u + v * v)
    if name == "disc":
        return rho - 0.95
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.75
    if name == "diamond":
        return (u.abs() + v.abs()) / math.sqrt(2.0) - 0.72
    if name == "triangle":      # apex up, flat base: three half-planes (normals down, up-left, up-right)
        d = v * 1.0 - 0.5
        for ang in (math.radians(210.0), math.radians(330.0)):
            d = torch.maximum(d, u * math.cos(ang) + v * math.sin(ang) - 0.5)
        return d
    if name == "plus":
        return _bars(u, v, 0.3, 0.95)
    if name == "saltire":
        c = math.sqrt(0.5)
        return _bars(c * (u + v), c * (v - u), 0.28, 0.95)
    if name == "ring":
        return (rho - 0.72).abs() - 0.24
    if name == "frame":
        return (torch.maximum(u.abs(), v.abs()) - 0.62).abs() - 0.18
    if name == "star":          # five points, one pointing up
        ang = torch.atan2(v, u)
        radius = 0.64 + 0.34 * torch.cos(5.0 * (ang + math.pi / 2))
        return (rho - radius) * 0.8
    if name == "tee":           # a T: top bar and stem
        top = torch.maximum(u.abs() - 0.95, (v + 0.62).abs() - 0.26)
        stem = torch.maximum(u.abs() - 0.26, (v - 0.2).abs() - 0.78)
        return torch.minimum(top, stem)
    raise KdforgeError(f"{NAME}: unknown shape index {shape}")


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(n,) hue in [0, 1), saturation, value -> (n, 3) RGB in [0, 1]."""
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], dim=1)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * ramp


def class_hues(seed: int, num_classes: int) -> Tensor:
    """Each class's hue: evenly spaced around the colour wheel, in an order fixed by `seed`."""
    gen = torch.Generator().manual_seed(_derive_seed(NAME, VERSION, seed, "hues"))
    return torch.randperm(num_classes, generator=gen).float() / num_classes


def _render(labels: Tensor, size: int, gen: torch.Generator, obj_scale: tuple[float, float],
            fragments: int, class_hue: Tensor, hue_jitter: float | None) -> tuple[Tensor, Tensor]:
    """One chunk: float images (n, 3, size, size) in [0, 1] and bool object masks (n, size, size)."""
    n = labels.shape[0]
    big = size * _SUPERSAMPLE
    coords = (torch.arange(big, dtype=torch.float32) + 0.5) / big        # [0, 1] image units
    gy, gx = coords.view(1, big, 1), coords.view(1, 1, big)

    def col(x: Tensor) -> Tensor:
        return x.view(n, 1, 1)

    # --- background: smooth colour field (low-res noise, upsampled) + fine texture
    base = _unif(gen, (n, 3, 1, 1), 0.2, 0.8)
    smooth = torch.nn.functional.interpolate(torch.randn((n, 3, 4, 4), generator=gen), size=(big, big),
                                             mode="bicubic", align_corners=False)
    img = base + _TEX_SMOOTH * smooth
    fine = torch.nn.functional.interpolate(torch.randn((n, 3, size, size), generator=gen), size=(big, big),
                                           mode="nearest")
    img = img + _TEX_FINE * fine
    # line fragments of random colour: edge-like clutter, never a whole shape
    for _ in range(fragments):
        cx, cy = _unif(gen, (n,), 0.0, 1.0), _unif(gen, (n,), 0.0, 1.0)
        ang = _unif(gen, (n,), 0.0, math.pi)
        half = _unif(gen, (n,), 0.08, 0.2)
        width = _unif(gen, (n,), 0.025, 0.05)
        colr = _unif(gen, (n, 3), 0.0, 1.0)
        present = (torch.rand((n,), generator=gen) < 0.8).float()
        dx, dy = gx - col(cx), gy - col(cy)
        along = dx * col(torch.cos(ang)) + dy * col(torch.sin(ang))
        across = -dx * col(torch.sin(ang)) + dy * col(torch.cos(ang))
        seg = torch.sqrt((along.abs() - col(half)).clamp(min=0.0) ** 2 + across ** 2) - col(width)
        alpha = torch.sigmoid(-seg * big * 1.5) * col(present)
        img = torch.lerp(img, colr.view(n, 3, 1, 1), alpha.unsqueeze(1))

    # --- the object: class shape, random colour (contrasting with the background), size, place, tilt
    radius = _unif(gen, (n,), *obj_scale)                               # in image units
    cx = radius + torch.rand((n,), generator=gen) * (1.0 - 2.0 * radius)
    cy = radius + torch.rand((n,), generator=gen) * (1.0 - 2.0 * radius)
    theta = torch.randn((n,), generator=gen) * _ROT_JITTER
    px, py = (gx - col(cx)) / col(radius), (gy - col(cy)) / col(radius)
    ct, st = col(torch.cos(theta)), col(torch.sin(theta))
    u, v = px * ct + py * st, -px * st + py * ct
    field = torch.empty(n, big, big)
    for s in range(len(SHAPES)):
        idx = (labels == s).nonzero().flatten()
        if idx.numel():
            field[idx] = shape_field(s, u[idx], v[idx])
    if hue_jitter is None:                                              # colour carries no class information
        obj_col = _unif(gen, (n, 3), 0.0, 1.0)
    else:                                                               # a class hue, blurred by jitter
        hue = (class_hue[labels] + torch.randn((n,), generator=gen) * hue_jitter).remainder(1.0)
        obj_col = _hsv_to_rgb(hue, _unif(gen, (n,), 0.55, 1.0), _unif(gen, (n,), 0.45, 1.0))
    bg_mean = base.view(n, 3)
    weak = (obj_col - bg_mean).abs().mean(1, keepdim=True) < 0.25      # weak contrast: darken or lighten
    bright_bg = bg_mean.mean(1, keepdim=True) > 0.5
    fixed = torch.where(bright_bg, obj_col * 0.35, obj_col * 0.35 + 0.65)
    obj_col = torch.where(weak, fixed, obj_col)
    shade = 1.0 + 0.15 * torch.tanh(-field * 2.0)                       # a little interior shading
    px_per_unit = col(radius) * big
    alpha = torch.sigmoid(-field * px_per_unit * 1.2)                   # about one-pixel soft edge
    obj = obj_col.view(n, 3, 1, 1) * shade.unsqueeze(1)
    img = torch.lerp(img, obj, alpha.unsqueeze(1))

    img = img + _PIXEL_NOISE * torch.randn(img.shape, generator=gen)
    img = torch.nn.functional.avg_pool2d(img, _SUPERSAMPLE)
    mask = torch.nn.functional.avg_pool2d(alpha.unsqueeze(1), _SUPERSAMPLE).squeeze(1) > 0.5
    return img.clamp_(0.0, 1.0), mask


def _generate_split(n: int, num_classes: int, size: int, seed: int, split: str, obj_scale: tuple[float, float],
                    fragments: int, hue_jitter: float | None) -> tuple[Tensor, Tensor, Tensor]:
    hues = class_hues(seed, num_classes)
    gen = torch.Generator().manual_seed(_derive_seed(NAME, VERSION, seed, split))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    masks = torch.empty((n, size, size), dtype=torch.bool)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        chunk, m = _render(labels[start:stop], size, gen, obj_scale, fragments, hues, hue_jitter)
        images[start:stop] = (chunk * 255.0).round_().to(torch.uint8)
        masks[start:stop] = m
    return images, labels, masks


def _validate(split: str, num_train: int, num_test: int, num_classes: int, image_size: int,
              object_scale: tuple[float, float], fragments: int, hue_jitter: float | None) -> None:
    if split not in ("train", "test"):
        raise KdforgeError(f"{NAME}: unknown split '{split}'; expected 'train' or 'test'")
    if not 2 <= num_classes <= len(SHAPES):
        raise KdforgeError(f"{NAME}: num_classes must be in [2, {len(SHAPES)}] (one shape per class), "
                           f"got {num_classes}")
    if num_train < 1 or num_test < 1:
        raise KdforgeError(f"{NAME}: num_train and num_test must be >= 1, got {num_train} and {num_test}")
    if image_size < 8:
        raise KdforgeError(f"{NAME}: image_size must be >= 8, got {image_size}")
    lo, hi = object_scale
    if not 0.05 <= lo <= hi <= 0.45:
        raise KdforgeError(f"{NAME}: object_scale (radius as a fraction of the image) must satisfy "
                           f"0.05 <= min <= max <= 0.45, got {object_scale}")
    if fragments < 0:
        raise KdforgeError(f"{NAME}: fragments must be >= 0, got {fragments}")
    if hue_jitter is not None and hue_jitter < 0:
        raise KdforgeError(f"{NAME}: hue_jitter must be >= 0 or null (random colours), got {hue_jitter}")


def generate(num_train: int = 5000, num_test: int = 1000, seed: int = 0, num_classes: int = 10,
             image_size: int = 24, object_scale: tuple[float, float] = (0.2, 0.32),
             fragments: int = 4, hue_jitter: float | None = 0.05) -> dict[str, dict[str, Any]]:
    """Both splits, no cache: {"train"/"test": {images, labels, mask, mean, std}}."""
    scale = (float(object_scale[0]), float(object_scale[1]))
    out: dict[str, dict[str, Any]] = {}
    for split, n in (("train", num_train), ("test", num_test)):
        images, labels, masks = _generate_split(n, num_classes, image_size, seed, split, scale, fragments,
                                                hue_jitter)
        out[split] = {"images": images, "labels": labels, "mask": masks}
    x = out["train"]["images"].double().div_(255.0)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    for split in out:
        out[split]["mean"], out[split]["std"] = mean.float(), std.float()
    return out


def objects_clutter(split: str = "train", num_train: int = 5000, num_test: int = 1000, seed: int = 0,
                    num_classes: int = 10, image_size: int = 24, object_scale: tuple[float, float] | list[float]
                    = (0.2, 0.32), fragments: int = 4, hue_jitter: float | None = 0.05,
                    root: str | os.PathLike[str] | None = None, cache: bool = True) -> ImageTensors:
    """One split of the object-on-clutter data set, generated or loaded from the cache.

    Class `c` is the shape `SHAPES[c]`; `object_scale` is the range of the object's radius as a
    fraction of the image side; `fragments` the number of clutter line fragments per image;
    `hue_jitter` the std of the object's hue around its class hue (None: random colours).
    `extra["mask"]` holds each image's object mask. `root` overrides the cache directory (else
    `$KDFORGE_CACHE`, else `~/.cache/kdforge`); `cache=False` generates in memory only.
    """
    if len(object_scale) != 2:
        raise KdforgeError(f"{NAME}: object_scale must be [min, max], got {object_scale}")
    scale = (float(object_scale[0]), float(object_scale[1]))
    _validate(split, num_train, num_test, num_classes, image_size, scale, fragments, hue_jitter)
    params = {"name": NAME, "version": VERSION, "num_train": int(num_train), "num_test": int(num_test),
              "seed": int(seed), "num_classes": int(num_classes), "image_size": int(image_size),
              "object_scale": list(scale), "fragments": int(fragments),
              "hue_jitter": None if hue_jitter is None else float(hue_jitter)}
    entry = cached_split(NAME, VERSION, params, split,
                         lambda: generate(num_train, num_test, seed, num_classes, image_size, scale, fragments,
                                          hue_jitter),
                         ("images", "labels", "mask", "mean", "std"), root, cache)
    return ImageTensors(images=entry["images"], labels=entry["labels"], num_classes=num_classes, name=NAME,
                        mean=tuple(float(m) for m in entry["mean"]), std=tuple(float(s) for s in entry["std"]),
                        class_names=list(SHAPES[:num_classes]), extra={"mask": entry["mask"]})


DATASETS.register(NAME, objects_clutter, kind="classification", source="procedural")
