"""Anomaly-detection data: seeded procedural textures with injected defects, or a user's MVTec AD folders.

Unsupervised anomaly detection trains on normal images only; the test split mixes normal and
defective images and keeps a pixel mask of every defect, so both image-level and pixel-level
AUROC can be computed. Procedural textures (`stripes`, `grid`, `dots`) are a pure function of
(seed, index): every image has its own phase, orientation jitter, frequency and noise. Defects
are pasted on test images only: `blob` (a darker or lighter ellipse), `scratch` (a thin line),
`spot` (a small disc of another colour) and `rotate` (a patch of the same texture at another
orientation: locally plausible, a structural anomaly a student that generalises too well may
reconstruct). `strength` < 1 blends every defect into the texture (subtler anomalies).

A user's data in the MVTec AD layout (`<root>/train/good/*.png`, `<root>/test/<defect>/*.png`,
`<root>/ground_truth/<defect>/<name>_mask.png`; `test/good` has no masks) load with Pillow,
resized to `size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["CATEGORIES", "DEFECTS", "AnomalyData", "load_mvtec", "procedural_split", "textures"]

CATEGORIES = ("stripes", "grid", "dots")
DEFECTS = ("blob", "scratch", "spot", "rotate")
_COLOURS = {"stripes": ((0.25, 0.22, 0.18), (0.80, 0.74, 0.60)), "grid": ((0.15, 0.20, 0.30), (0.65, 0.75, 0.85)),
            "dots": ((0.30, 0.30, 0.30), (0.85, 0.85, 0.80))}


@dataclass
class AnomalyData:
    """One split: uint8 images (N, 3, H, W), uint8 pixel masks (N, H, W) (1 = defect), labels (N,)
    (1 = defective image) and each image's defect type ("good" for a normal image)."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = torch.arange(size, dtype=torch.float32)
    return torch.meshgrid(c, c, indexing="ij")


def _pattern(category: str, size: int, angle: float, period: float, phase: tuple[float, float]) -> Tensor:
    """A (H, W) pattern in [0, 1] of `category` at orientation `angle` (radians)."""
    y, x = _grid(size)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    a = torch.sin(2 * math.pi * u / period + phase[0])
    if category == "stripes":
        return 0.5 + 0.5 * a
    b = torch.sin(2 * math.pi * v / period + phase[1])
    if category == "grid":
        return torch.maximum(a, b).clamp(min=0) ** 0.5
    if category == "dots":
        return ((a * b).clamp(min=0) * 2).clamp(max=1)
    raise ConfigError(f"data.category must be one of {', '.join(CATEGORIES)}, got {category!r}")


def _colourise(p: Tensor, category: str) -> Tensor:
    dark, light = (torch.tensor(c).view(3, 1, 1) for c in _COLOURS[category])
    return dark + (light - dark) * p


def _texture(category: str, size: int, g: torch.Generator, noise: float) -> tuple[Tensor, dict[str, float]]:
    """One normal image (3, H, W) in [0, 1] and its pattern parameters (to re-render it elsewhere)."""
    r = torch.rand(5, generator=g).tolist()
    params = {"angle": math.radians(30 + 10 * (2 * r[0] - 1)), "period": 7.0 + 2.0 * r[1],
              "phase0": 2 * math.pi * r[2], "phase1": 2 * math.pi * r[3]}
    img = _colourise(_pattern(category, size, params["angle"], params["period"],
                              (params["phase0"], params["phase1"])), category)
    img = img * (0.9 + 0.2 * r[4]) + noise * torch.randn(3, size, size, generator=g)
    return img.clamp(0, 1), params


def textures(n: int, category: str = "stripes", size: int = 64, seed: int = 0, noise: float = 0.05) -> Tensor:
    """`n` normal images (uint8, (n, 3, size, size)); image i is a pure function of (seed, i)."""
    if category not in CATEGORIES:
        raise ConfigError(f"data.category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        img, _ = _texture(category, size, seeded_generator(seed, 11, i), noise)
        out[i] = (img * 255).round().to(torch.uint8)
    return out


def _ellipse(size: int, g: torch.Generator, r_min: float, r_max: float) -> Tensor:
    y, x = _grid(size)
    r = torch.rand(5, generator=g).tolist()
    m = r_max + 2
    cy, cx = m + (size - 2 * m) * r[0], m + (size - 2 * m) * r[1]
    ry, rx = r_min + (r_max - r_min) * r[2], r_min + (r_max - r_min) * r[3]
    t = math.pi * r[4]
    dy, dx = y - cy, x - cx
    u, v = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def _scratch(size: int, g: torch.Generator) -> Tensor:
    y, x = _grid(size)
    r = torch.rand(5, generator=g).tolist()
    length, width = 14 + 18 * r[0], 0.6 + 0.8 * r[1]
    t = math.pi * r[2]
    cy, cx = size * (0.25 + 0.5 * r[3]), size * (0.25 + 0.5 * r[4])
    dy, dx = y - cy, x - cx
    along, across = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
    return (along.abs() <= length / 2) & (across.abs() <= width)


def _defect(img: Tensor, kind: str, category: str, params: dict[str, float], g: torch.Generator,
            noise: float, strength: float = 1.0) -> tuple[Tensor, Tensor]:
    """`img` (3, H, W in [0, 1]) with one defect of `kind` blended in at `strength` (1: pasted), and its
    (H, W) bool mask."""
    size = img.shape[-1]
    if kind == "blob":
        mask = _ellipse(size, g, 3, 8)
        r = torch.rand(2, generator=g).tolist()
        shift = (0.25 + 0.15 * r[0]) * (1 if r[1] < 0.5 else -1)
        new = (img + shift).clamp(0, 1)
    elif kind == "scratch":
        mask = _scratch(size, g)
        new = torch.full_like(img, 0.95 if float(torch.rand(1, generator=g)) < 0.5 else 0.05)
    elif kind == "spot":
        mask = _ellipse(size, g, 2, 5)
        hue = torch.tensor([0.85, 0.25, 0.2]) if float(torch.rand(1, generator=g)) < 0.5 else torch.tensor([.2, .6, .3])
        new = 0.3 * img + 0.7 * hue.view(3, 1, 1)
    elif kind == "rotate":
        mask = _ellipse(size, g, 6, 11)
        turned = params["angle"] + math.radians(60 + 60 * float(torch.rand(1, generator=g)))
        new = _colourise(_pattern(category, size, turned, params["period"], (params["phase0"], params["phase1"])),
                         category) + noise * torch.randn(3, size, size, generator=g)
    else:
        raise ConfigError(f"data.defects: unknown defect {kind!r} (known: {', '.join(DEFECTS)})")
    return torch.where(mask, img + strength * (new.clamp(0, 1) - img), img), mask


def defective(n: int, category: str = "stripes", size: int = 64, seed: int = 0, noise: float = 0.05,
              kinds: tuple[str, ...] = DEFECTS, strength: float = 1.0) -> AnomalyData:
    """`n` defective images (kinds cycled in order), each a pure function of (seed, i), with masks."""
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    names = []
    for i in range(n):
        g = seeded_generator(seed, 13, i)
        img, params = _texture(category, size, g, noise)
        kind = kinds[i % len(kinds)]
        img, mask = _defect(img, kind, category, params, g, noise, strength)
        images[i], masks[i] = (img * 255).round().to(torch.uint8), mask.to(torch.uint8)
        names.append(kind)
    return AnomalyData(images, masks, torch.ones(n, dtype=torch.long), names)


def _normal(images: Tensor) -> AnomalyData:
    n, _, h, w = images.shape
    return AnomalyData(images, torch.zeros(n, h, w, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), ["good"] * n)


def concat(parts: list[AnomalyData]) -> AnomalyData:
    return AnomalyData(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                       torch.cat([p.labels for p in parts]), [k for p in parts for k in p.kinds])


def procedural_split(category: str = "stripes", size: int = 64, num_train: int = 200, num_test_normal: int = 40,
                     num_test_defect: int = 60, defects: tuple[str, ...] = DEFECTS,
                     seed: int = 0, noise: float = 0.05, strength: float = 1.0) -> tuple[AnomalyData, AnomalyData]:
    """(train, test): train is normal only; test = normals, then defects (drawn with seed + 1000)."""
    if not defects:
        raise ConfigError("data.defects must name at least one defect kind")
    for kind in defects:
        if kind not in DEFECTS:
            raise ConfigError(f"data.defects: unknown defect {kind!r} (known: {', '.join(DEFECTS)})")
    if not 0 < strength <= 1:
        raise ConfigError(f"data.strength must be in (0, 1], got {strength}")
    if min(num_train, num_test_normal, num_test_defect) < 1:
        raise ConfigError("data: num_train, num_test_normal and num_test_defect must be >= 1")
    train = _normal(textures(num_train, category, size, seed, noise))
    test = concat([_normal(textures(num_test_normal, category, size, seed + 1000, noise)),
                   defective(num_test_defect, category, size, seed + 1000, noise, tuple(defects), strength)])
    return train, test


# ------------------------------------------------------------------------------------- MVTec AD folders

_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise KdforgeError("reading image folders needs Pillow: pip install 'kdforge[images]'") from None
    return Image


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES) if folder.is_dir() else []


def _read(path: Path, size: int, mask: bool = False) -> tuple[Tensor, tuple[int, int]]:
    """An image as uint8 (3, size, size) (a mask as (size, size) of 0/1) and its original (W, H)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            original = im.size
            im = im.convert("L" if mask else "RGB").resize((size, size), Image.NEAREST if mask else Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except OSError as exc:
        raise KdforgeError(f"cannot read image {path}: {exc}") from None
    if mask:
        return (data.view(size, size) > 127).to(torch.uint8), original
    return data.view(size, size, 3).permute(2, 0, 1).contiguous(), original


def load_mvtec(root: str | Path, size: int = 64) -> tuple[AnomalyData, AnomalyData]:
    """(train, test) from a folder in the MVTec AD layout; every defective test image needs its mask of
    the same size (`ground_truth/<defect>/<name>_mask.png`)."""
    root = Path(root)
    train_files = _files(root / "train" / "good")
    if not train_files:
        raise ConfigError(f"data.root {root}: no images in {root / 'train' / 'good'} (MVTec AD layout expected)")
    test_root = root / "test"
    defects = sorted(p.name for p in test_root.iterdir() if p.is_dir()) if test_root.is_dir() else []
    if not defects:
        raise ConfigError(f"data.root {root}: no folders under {test_root} (test/good, test/<defect>)")
    train = _normal(torch.stack([_read(p, size)[0] for p in train_files]))
    images, masks, labels, kinds = [], [], [], []
    for defect in defects:
        for path in _files(test_root / defect):
            img, original = _read(path, size)
            if defect == "good":
                mask = torch.zeros(size, size, dtype=torch.uint8)
            else:
                mask_path = root / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise KdforgeError(f"missing mask {mask_path} for test image {path}")
                mask, mask_size = _read(mask_path, size, mask=True)
                if mask_size != original:
                    raise KdforgeError(f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {path} "
                                       f"is {original[0]}x{original[1]}")
            images.append(img)
            masks.append(mask)
            labels.append(int(defect != "good"))
            kinds.append(defect)
    if not images:
        raise ConfigError(f"data.root {root}: no test images under {test_root}")
    test = AnomalyData(torch.stack(images), torch.stack(masks), torch.tensor(labels), kinds)
    if int(test.labels.sum()) in (0, len(test)):
        raise ConfigError(f"data.root {root}: the test split needs both good and defective images for AUROC")
    return train, test
