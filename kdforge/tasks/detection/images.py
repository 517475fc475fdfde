"""A user's COCO data set (annotation JSON + image folder) as detection training / test data.

Images are decoded once with Pillow into one uint8 tensor (N, 3, S, S): each is letterboxed, i.e.
resized so its longer side is S (aspect kept) and padded with black at the right and bottom, so
batches are tensor slices and the batched, seeded augmentation works as on procedural scenes.
Boxes are scaled by the same factor for training; evaluation maps predictions back by 1 / scale
and scores them against the ORIGINAL annotations, so COCO AP (and its small/medium/large split)
is in the user's own pixel frame. Labels are positions in the sorted category ids, so COCO's
sparse ids (1..90 with gaps) work. A file whose pixel size differs from its JSON entry, or that
Pillow cannot read, fails in one line naming the file and the image id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdforge.data.folder import _pil
from kdforge.errors import KdforgeError
from kdforge.tasks.detection.coco import CocoData, load_coco
from kdforge.tasks.detection.task import DetectionData

__all__ = ["letterboxed", "load_coco_images"]


def letterboxed(coco: CocoData, scales: list[float]) -> CocoData:
    """The annotations (and image sizes) in the letterboxed frame: boxes and areas times each image's scale."""
    by_id = {img["id"]: s for img, s in zip(coco.images, scales)}
    images = [{**img, "width": img["width"] * s, "height": img["height"] * s} for img, s in zip(coco.images, scales)]
    anns = []
    for a in coco.annotations:
        s = by_id[a["image_id"]]
        x, y, w, h = (float(v) * s for v in a["bbox"])
        anns.append({**a, "bbox": [x, y, w, h], "area": float(a.get("area", w * h / s / s)) * s * s})
    return CocoData(images, anns, coco.categories, coco.source, dict(coco.dropped))


def load_coco_images(annotations: str | Path, image_root: str | Path, size: int,
                     on_bad: str = "error") -> DetectionData:
    """A COCO JSON and its image folder -> DetectionData of letterboxed `size` x `size` images."""
    if size < 16:
        raise KdforgeError(f"load_coco_images: size must be >= 16, got {size}")
    root = Path(image_root)
    if not root.is_dir():
        raise KdforgeError(f"image folder not found: {root}")
    coco = load_coco(annotations, on_bad=on_bad, image_root=root)
    if not coco.images:
        raise KdforgeError(f"{annotations}: holds no images")
    Image = _pil()
    pixels = np.zeros((len(coco.images), size, size, 3), dtype=np.uint8)
    scales = []
    for i, img in enumerate(coco.images):
        path = root / str(img["file_name"])
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except OSError as err:
            raise KdforgeError(f"{path}: image {img['id']}: Pillow cannot read it ({err})") from None
        if rgb.size != (int(img["width"]), int(img["height"])):
            raise KdforgeError(f"{path}: image {img['id']}: the file is {rgb.size[0]}x{rgb.size[1]} but "
                               f"{annotations} says {img['width']}x{img['height']}")
        scale = size / max(rgb.size)
        w, h = max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale))
        pixels[i, :h, :w] = np.asarray(rgb.resize((w, h), Image.BILINEAR))
        scales.append(scale)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    category_ids = sorted(c["id"] for c in coco.categories)
    return DetectionData(images, letterboxed(coco, scales), category_ids=category_ids, original=coco,
                         scales=torch.tensor(scales, dtype=torch.float32))
