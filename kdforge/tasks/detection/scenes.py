"""Procedural detection scenes written as COCO data, plus the noisy-box and class-incremental variants.

A scene is a `size` x `size` RGB image of coloured clutter holding 1..`max_objects` objects of
`num_classes` categories (shapes from the multi-label glyph set, each category one shape and a
hue band), at scales from small (a few pixels) to large, possibly overlapping (later objects
occlude earlier ones; a box keeps the object's full extent, as annotators draw it). Everything is
a pure function of the seed. `noisy_boxes` jitters centres and sizes by a ratio (the SSD-Det
protocol); `incremental_split` makes class-incremental tasks (e.g. 10 + 10).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.detection.coco import CocoData, validate

__all__ = ["SHAPE_NAMES", "incremental_split", "noisy_boxes", "procedural_scenes"]

SHAPE_NAMES = ("disc", "square", "triangle", "ring", "plus", "cross", "diamond", "bar_h", "bar_v", "halfdisc")


def _mask(shape: int, n: int) -> Tensor:
    """(n, n) boolean mask of one shape (index into SHAPE_NAMES)."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1      # [-1, 1]
    y, x = torch.meshgrid(c, c, indexing="ij")
    r = (x ** 2 + y ** 2).sqrt()
    name = SHAPE_NAMES[shape % len(SHAPE_NAMES)]
    masks = {
        "disc": r <= 1.0,
        "square": (x.abs() <= 0.85) & (y.abs() <= 0.85),
        "triangle": (y >= -0.9) & (y <= 0.9) & (x.abs() <= (y + 0.9) / 1.8 * 0.95),
        "ring": (r <= 1.0) & (r >= 0.55),
        "plus": ((x.abs() <= 0.3) | (y.abs() <= 0.3)),
        "cross": ((x - y).abs() <= 0.4) | ((x + y).abs() <= 0.4),
        "diamond": x.abs() + y.abs() <= 1.0,
        "bar_h": y.abs() <= 0.35,
        "bar_v": x.abs() <= 0.35,
        "halfdisc": (r <= 1.0) & (y <= 0.1),
    }
    return masks[name]


def _hsv_to_rgb(h: float, s: float, v: float) -> list[float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def procedural_scenes(num_images: int, num_classes: int = 10, size: int = 64, max_objects: int = 6,
                      min_scale: float = 0.08, max_scale: float = 0.45, clutter: float = 0.5,
                      seed: int = 0) -> tuple[Tensor, CocoData]:
    """(uint8 images (N, 3, size, size), COCO annotations) of `num_images` procedural scenes."""
    if num_images < 1 or not 1 <= num_classes <= 20 or max_objects < 1 or size < 16:
        raise KdforgeError("procedural_scenes: need num_images >= 1, 1 <= num_classes <= 20, max_objects >= 1 "
                           f"and size >= 16, got {num_images}, {num_classes}, {max_objects}, {size}")
    if not 0 < min_scale <= max_scale <= 1:
        raise KdforgeError(f"procedural_scenes: need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
    images = torch.empty(num_images, 3, size, size, dtype=torch.uint8)
    annotations: list[dict[str, Any]] = []
    coco_images: list[dict[str, Any]] = []
    for i in range(num_images):
        g = seeded_generator(seed, 911, i)
        canvas = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.25
        canvas = canvas + clutter * 0.25 * (torch.rand(3, size // 4, size // 4, generator=g) - 0.5).repeat_interleave(
            4, 1).repeat_interleave(4, 2)
        canvas = canvas.expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            cls = int(torch.randint(0, num_classes, (1,), generator=g))
            scale = math.exp(math.log(min_scale) + float(torch.rand(1, generator=g)) * math.log(max_scale / min_scale))
            n = max(3, int(round(scale * size)))
            x0 = int(torch.randint(0, size - n + 1, (1,), generator=g))
            y0 = int(torch.randint(0, size - n + 1, (1,), generator=g))
            hue = (cls / num_classes + 0.04 * float(torch.randn(1, generator=g))) % 1.0
            color = torch.tensor(_hsv_to_rgb(hue, 0.85, 0.95))[:, None, None]
            m = _mask(cls, n)
            patch = canvas[:, y0:y0 + n, x0:x0 + n]
            canvas[:, y0:y0 + n, x0:x0 + n] = torch.where(m, color.expand(3, n, n), patch)
            ys, xs = m.nonzero(as_tuple=True)
            bx, by = x0 + int(xs.min()), y0 + int(ys.min())
            bw, bh = int(xs.max()) - int(xs.min()) + 1, int(ys.max()) - int(ys.min()) + 1
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [float(bx), float(by), float(bw), float(bh)], "area": float(bw * bh),
                                "iscrowd": 0})
        noise = (torch.randn(3, size, size, generator=g) * 0.03)
        images[i] = ((canvas + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        coco_images.append({"id": i + 1, "file_name": f"scene_{seed}_{i:06d}.png", "width": size, "height": size})
    categories = [{"id": c + 1, "name": f"{SHAPE_NAMES[c % len(SHAPE_NAMES)]}_{c}"} for c in range(num_classes)]
    return images, validate({"images": coco_images, "annotations": annotations, "categories": categories},
                            f"procedural_scenes(seed={seed})")


def noisy_boxes(data: CocoData, ratio: float, seed: int = 0) -> CocoData:
    """Boxes with centre and size jittered uniformly by +-`ratio` of their size (clipped to the image)."""
    if not 0 <= ratio < 1:
        raise KdforgeError(f"noisy_boxes: ratio must be in [0, 1), got {ratio}")
    sizes = {img["id"]: (float(img["width"]), float(img["height"])) for img in data.images}
    out = []
    for k, ann in enumerate(data.annotations):
        g = seeded_generator(seed, 37, k)
        x, y, w, h = ann["bbox"]
        dx, dy, dw, dh = ((torch.rand(4, generator=g) * 2 - 1) * ratio).tolist()
        cx, cy = x + w / 2 + dx * w, y + h / 2 + dy * h
        nw, nh = w * (1 + dw), h * (1 + dh)
        W, H = sizes[ann["image_id"]]
        x1, y1 = min(max(cx - nw / 2, 0.0), W - 1), min(max(cy - nh / 2, 0.0), H - 1)
        x2, y2 = min(max(cx + nw / 2, x1 + 1), W), min(max(cy + nh / 2, y1 + 1), H)
        out.append({**ann, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    return CocoData(data.images, out, data.categories, data.source + f" + noise {ratio}", dict(data.dropped))


def incremental_split(data: CocoData, old_classes: int) -> tuple[CocoData, CocoData]:
    """Class-incremental tasks: (old: annotations of the first `old_classes` categories, new: the rest).

    Both keep every image (as in incremental detection, images of one task show unlabelled
    objects of the other); categories are split by their order in `data.categories`.
    """
    ids = [c["id"] for c in data.categories]
    if not 0 < old_classes < len(ids):
        raise KdforgeError(f"incremental_split: old_classes must be in 1..{len(ids) - 1}, got {old_classes}")
    old = set(ids[:old_classes])

    def part(keep: bool) -> CocoData:
        return CocoData(data.images, [a for a in data.annotations if (a["category_id"] in old) == keep],
                        [c for c in data.categories if (c["id"] in old) == keep], data.source, dict(data.dropped))
    return part(True), part(False)
