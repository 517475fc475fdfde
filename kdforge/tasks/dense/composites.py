"""Image-harmonization triplets (real image, composite, foreground mask), procedural or iHarmony4.

A harmonization composite pastes a foreground whose lighting does not match its background; the
model must restore the real image. `procedural_composites` renders dense scenes (`scenes.render`),
picks one visible object instance as the foreground and re-lights only that instance (gamma,
contrast, brightness, colour temperature, hue rotation; all seeded), so the composite equals the
real image outside the mask and differs inside it, as in iHarmony4's colour-transfer composites.

Scene illuminant (`illuminant > 0`; default 0 = off, the behaviour above, bit for bit): the rendered
scene is lit by a random global illuminant, a per-channel gain

    G = b * (exp(t), exp(u), exp(-t)),   log b ~ U(-0.3, 0.2) s,  t ~ U(-0.25, 0.25) s,  u ~ U(-0.1, 0.1) s

(brightness b, colour temperature t, green-magenta tint u; s = `illuminant`), and the real image is
clip(render * G_real), so foreground and background share one illuminant and the (near-grey) floor
shows it. The composite's foreground is the same object under a second, independently drawn
illuminant G_fg (as when a foreground is cut from another photo): inside the mask clip(render * G_fg)
+ a per-channel offset ~ U(-`bias`, `bias`) (fraction of full scale; the card's gain + bias demo),
then the appearance shift above at `strength` (0: none). Outside the mask composite == real. The
drawn gains are kept in `HarmonizationData.illuminants` (N, 2, 3): [G_real, G_fg] per triplet.

`load_iharmony4(root)` reads one iHarmony4 sub-dataset folder (HCOCO, HAdobe5k, HFlickr, Hday2night)::

    root/composite_images/<id>_<k>_<j>.jpg    composite j of foreground k of image <id>
    root/masks/<id>_<k>.png                    foreground k (0 / 255)
    root/real_images/<id>.jpg                  the real image
    root/<root name>_train.txt, _test.txt      optional split lists (one composite file per line)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.dense.folders import _array, _open, _resize
from kdforge.tasks.dense.scenes import Scene, render, sample_scene

__all__ = ["HarmonizationData", "draw_illuminant", "load_iharmony4", "pick_foreground", "procedural_composites",
           "shift_foreground"]


@dataclass
class HarmonizationData:
    """uint8 real and composite images (N, 3, H, W), uint8 masks (N, 1, H, W) in {0, 1}."""

    real: Tensor
    composite: Tensor
    mask: Tensor
    names: list[str] | None = None
    scenes: list[Scene] | None = None
    illuminants: Tensor | None = None          # procedural with illuminant > 0: (N, 2, 3) [G_real, G_fg]

    def __len__(self) -> int:
        return int(self.real.shape[0])


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _hue_rotation(angle: float) -> Tensor:
    """3x3 rotation about the grey axis (1, 1, 1) / sqrt(3): shifts hue, keeps grey grey."""
    c, s = math.cos(angle), math.sin(angle)
    k = torch.full((3, 3), (1 - c) / 3)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) * (s / math.sqrt(3))
    return k + c * torch.eye(3) + cross


def shift_foreground(image: Tensor, mask: Tensor, g: torch.Generator, strength: float = 1.0) -> Tensor:
    """`image` (uint8 3, H, W) with only the pixels of `mask` (H, W) re-lit by random appearance changes."""
    x = image.float() / 255.0
    inside = mask.bool()
    gamma = math.exp(strength * _u(g, -0.4, 0.4))
    contrast = math.exp(strength * _u(g, -0.35, 0.35))
    brightness = strength * _u(g, -0.15, 0.15)
    warmth = strength * _u(g, -0.15, 0.15)                 # colour temperature: red up, blue down (or back)
    hue = strength * _u(g, -0.6, 0.6)                      # radians about the grey axis
    y = x.clamp_min(1e-6) ** gamma
    mean = y[:, inside].mean(dim=1).view(3, 1, 1) if inside.any() else y.mean(dim=(1, 2), keepdim=True)
    y = (y - mean) * contrast + mean + brightness
    y = y * torch.tensor([1 + warmth, 1.0, 1 - warmth]).view(3, 1, 1)
    y = torch.einsum("ij,jhw->ihw", _hue_rotation(hue), y)
    shifted = (y.clamp(0, 1) * 255).round().to(torch.uint8)
    return torch.where(inside, shifted, image)


def draw_illuminant(g: torch.Generator, scale: float = 1.0) -> Tensor:
    """A random global illuminant: the per-channel RGB gain (3,) of the module doc, `scale` = s."""
    brightness = math.exp(scale * _u(g, -0.3, 0.2))
    warmth, tint = scale * _u(g, -0.25, 0.25), scale * _u(g, -0.1, 0.1)
    return brightness * torch.tensor([math.exp(warmth), math.exp(tint), math.exp(-warmth)])


def _lit(image: Tensor, gain: Tensor, offset: Tensor | None = None) -> Tensor:
    """uint8 `image` (3, H, W) times a per-channel `gain` (+ `offset`, fraction of full scale), clipped."""
    y = image.float() / 255.0 * gain.view(3, 1, 1)
    if offset is not None:
        y = y + offset.view(3, 1, 1)
    return (y.clamp(0, 1) * 255).round().to(torch.uint8)


def pick_foreground(instance: Tensor, g: torch.Generator, min_area: float = 0.01) -> int:
    """A random visible instance id covering at least `min_area` of the image (0 if none does)."""
    areas = torch.bincount(instance.flatten()) / instance.numel()
    ids = [i for i in range(1, areas.numel()) if min_area <= float(areas[i]) < 1.0]
    return ids[int(torch.randint(len(ids), (), generator=g))] if ids else 0


def procedural_composites(count: int, seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 4,
                          strength: float = 1.0, min_area: float = 0.01, min_change: float = 3.0,
                          noise: float = 0.02, illuminant: float = 0.0, bias: float = 0.0) -> HarmonizationData:
    """`count` triplets, a pure function of the arguments. Scenes without a foreground of `min_area` are
    skipped; a shift changing the foreground by less than `min_change` grey levels (mean) is redrawn.
    `illuminant` > 0: a global scene illuminant, the foreground under another one (+ `bias`; module doc)."""
    if (count < 1 or not 1 <= min_objects <= max_objects or strength < 0 or illuminant < 0 or bias < 0
            or (strength == 0 and illuminant == 0) or (bias > 0 and illuminant == 0)):
        raise KdforgeError(f"procedural_composites: need count >= 1, 1 <= min_objects <= max_objects, strength > 0 "
                           f"(or >= 0 with illuminant > 0) and bias >= 0 only with illuminant > 0, got {count}, "
                           f"{min_objects}, {max_objects}, strength {strength}, illuminant {illuminant}, bias {bias}")
    g = seeded_generator(seed, 43)
    real, comp, masks, scenes, gains = [], [], [], [], []
    for attempt in range(50 * count):
        if len(real) == count:
            break
        scene = sample_scene(g, min_objects, max_objects, texture_seed=seed * 100_003 + attempt)
        maps = render(scene, size, noise)
        fg = pick_foreground(maps["instance"], g, min_area)
        if fg == 0:
            continue
        mask = maps["instance"] == fg
        image, source = maps["image"], maps["image"]
        if illuminant > 0:
            gain = draw_illuminant(g, illuminant)
            image = _lit(maps["image"], gain)
        for _ in range(20):
            if illuminant > 0:
                gain_fg = draw_illuminant(g, illuminant)
                offset = (torch.rand(3, generator=g) * 2 - 1) * bias if bias > 0 else None
                source = torch.where(mask, _lit(maps["image"], gain_fg, offset), image)
            shifted = shift_foreground(source, mask, g, strength) if strength > 0 else source
            if (shifted.float() - image.float())[:, mask].abs().mean() >= min_change:
                break
        else:
            continue
        if illuminant > 0:
            gains.append(torch.stack([gain, gain_fg]))
        real.append(image)
        comp.append(shifted)
        masks.append(mask[None].to(torch.uint8))
        scenes.append(scene)
    if len(real) < count:
        raise KdforgeError(f"procedural_composites: only {len(real)} of {count} scenes had a foreground of "
                           f"area >= {min_area} that a shift changes by >= {min_change} grey levels")
    return HarmonizationData(torch.stack(real), torch.stack(comp), torch.stack(masks), scenes=scenes,
                             illuminants=torch.stack(gains) if gains else None)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _composite_names(root: Path, split: str | None) -> list[str]:
    if split is None:
        return sorted(p.name for p in (root / "composite_images").iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    listing = root / f"{root.name}_{split}.txt"
    if not listing.is_file():
        raise KdforgeError(f"iharmony4: split list {listing} not found")
    return [Path(line.strip()).name for line in listing.read_text().splitlines() if line.strip()]


def _pair_paths(root: Path, name: str) -> tuple[Path, Path, Path]:
    parts = Path(name).stem.split("_")
    if len(parts) < 3:
        raise KdforgeError(f"iharmony4: composite name '{name}' is not <id>_<k>_<j>.jpg")
    paths = (root / "composite_images" / name, root / "masks" / ("_".join(parts[:-1]) + ".png"),
             root / "real_images" / ("_".join(parts[:-2]) + ".jpg"))
    for kind, path in zip(("composite", "mask", "real image"), paths):
        if not path.is_file():
            raise KdforgeError(f"iharmony4: composite '{name}' has no {kind} {path}")
    return paths


def _read_triplet(root: Path, name: str, size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    comp_path, mask_path, real_path = _pair_paths(root, name)
    comp, mask, real = _open(comp_path), _open(mask_path), _open(real_path)
    for other, path in ((mask, mask_path), (real, real_path)):
        if other.size != comp.size:
            raise KdforgeError(f"iharmony4: {path} is {other.size[0]}x{other.size[1]} but composite {comp_path} "
                               f"is {comp.size[0]}x{comp.size[1]}")
    m = _array(mask, "L")
    values = set(torch.unique(m).tolist())
    if not values <= {0, 255} and not values <= {0, 1}:
        raise KdforgeError(f"iharmony4: mask {mask_path} is not binary (values {sorted(values)[:4]}...; "
                           "need 0 and 255)")
    m = (m > 0)[None].to(torch.uint8)
    c, r = (_array(img, "RGB").permute(2, 0, 1) for img in (comp, real))
    if size is not None:
        c, r = (_resize(x, size, "bilinear").round().clamp(0, 255).to(torch.uint8) for x in (c, r))
        m = _resize(m[0], size, "nearest")[None].to(torch.uint8)
    return r, c, m


def load_iharmony4(root: str | Path, split: str | None = None, size: int | None = None,
                   limit: int | None = None) -> HarmonizationData:
    """One iHarmony4 sub-dataset (see the module doc), resized to `size` x `size` when given (images
    bilinear, masks nearest); without `size` every image must share one size. `limit`: first n only."""
    root = Path(root)
    for folder in ("composite_images", "masks", "real_images"):
        if not (root / folder).is_dir():
            raise KdforgeError(f"iharmony4: folder {root / folder} not found (layout: composite_images, masks, "
                               "real_images)")
    names = _composite_names(root, split)[:limit]
    if not names:
        raise KdforgeError(f"iharmony4: no composite images in {root / 'composite_images'}")
    triplets = [_read_triplet(root, name, size) for name in names]
    shapes = {t[0].shape for t in triplets}
    if len(shapes) > 1:
        raise KdforgeError(f"iharmony4: images in {root} differ in size ({len(shapes)} sizes); pass size=")
    real, comp, mask = (torch.stack([t[i] for t in triplets]) for i in range(3))
    return HarmonizationData(real, comp, mask, names=names)
