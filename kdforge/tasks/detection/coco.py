"""COCO-format detection data in and out, validated so a bad annotation never passes silently.

`load_coco(path)` reads a COCO JSON (`images`, `annotations` with `bbox` [x, y, w, h] in pixels,
`categories`). With `on_bad="error"` (default) the first bad annotation fails in one line naming
the file, the image id and the field; with `on_bad="drop"` bad annotations are dropped by the
documented rule below and counted in `CocoData.dropped` (reason -> count), never silently:

* `bbox` not four finite numbers, or width/height <= 0                  -> "bad_size"
* box outside its image (x < 0, y < 0, x + w > width or y + h > height,
  beyond a 1-pixel tolerance for rounding)                              -> "outside_image"
* `category_id` not among `categories`                                   -> "unknown_category"
* `image_id` not among `images`                                          -> "unknown_image"

With `image_root`, an image whose file is missing fails in one line (it is never dropped: a
missing image is a broken data set, not a noisy label). `save_coco` writes atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.train.checkpoint import atomic_write_text

__all__ = ["CocoData", "load_coco", "save_coco"]

TOLERANCE = 1.0     # pixels a box may exceed its image (rounding in exported annotations)


@dataclass
class CocoData:
    """A validated COCO data set: images, annotations and categories as plain dicts (COCO's own keys)."""

    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    source: str = "<memory>"
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}


def _fail(source: str, image_id: Any, field_name: str, message: str) -> KdforgeError:
    where = f"image {image_id}" if image_id is not None else "data set"
    return KdforgeError(f"{source}: {where}: '{field_name}' {message}")


def _problem(ann: dict[str, Any], image: dict[str, Any] | None, categories: set[Any]) -> tuple[str, str, str] | None:
    """(reason, field, message) of the first problem of one annotation, or None."""
    if image is None:
        return "unknown_image", "image_id", f"{ann.get('image_id')!r} names no image"
    box = ann.get("bbox")
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return "bad_size", "bbox", f"must be four finite numbers [x, y, w, h], got {box!r}"
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return "bad_size", "bbox", f"has non-positive size (w {w:g}, h {h:g})"
    width, height = float(image["width"]), float(image["height"])
    if x < -TOLERANCE or y < -TOLERANCE or x + w > width + TOLERANCE or y + h > height + TOLERANCE:
        return ("outside_image", "bbox",
                f"[{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {width:g}x{height:g} image")
    if ann.get("category_id") not in categories:
        return "unknown_category", "category_id", f"{ann.get('category_id')!r} is not among the categories"
    return None


def validate(tree: Any, source: str, on_bad: str = "error", image_root: str | Path | None = None) -> CocoData:
    """A COCO mapping -> CocoData (see the module docstring for the rules)."""
    if on_bad not in ("error", "drop"):
        raise KdforgeError(f"load_coco: on_bad must be 'error' or 'drop', got {on_bad!r}")
    if not isinstance(tree, dict):
        raise KdforgeError(f"{source}: a COCO file is a mapping with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(tree.get(key), list):
            raise _fail(source, None, key, "is missing or not a list")
    images: dict[Any, dict[str, Any]] = {}
    for img in tree["images"]:
        if not isinstance(img, dict) or "id" not in img:
            raise _fail(source, None, "images", f"entry {img!r} has no 'id'")
        for key in ("file_name", "width", "height"):
            if key not in img:
                raise _fail(source, img["id"], key, "is missing")
        if not (isinstance(img["width"], int | float) and isinstance(img["height"], int | float)
                and img["width"] > 0 and img["height"] > 0):
            raise _fail(source, img["id"], "width", f"and 'height' must be positive, got {img['width']!r}, "
                                                    f"{img['height']!r}")
        if img["id"] in images:
            raise _fail(source, img["id"], "id", "is repeated")
        if image_root is not None and not (Path(image_root) / str(img["file_name"])).is_file():
            raise _fail(source, img["id"], "file_name", f"{img['file_name']!r} not found under {image_root}")
        images[img["id"]] = img
    categories = set()
    for cat in tree["categories"]:
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise _fail(source, None, "categories", f"entry {cat!r} needs 'id' and 'name'")
        categories.add(cat["id"])
    kept, dropped = [], {}
    for i, ann in enumerate(tree["annotations"]):
        if not isinstance(ann, dict):
            raise _fail(source, None, "annotations", f"entry {i} is not a mapping")
        problem = _problem(ann, images.get(ann.get("image_id")), categories)
        if problem is None:
            kept.append(ann)
            continue
        reason, field_name, message = problem
        if on_bad == "error":
            raise _fail(source, ann.get("image_id"), field_name, f"(annotation {ann.get('id', i)}) {message}")
        dropped[reason] = dropped.get(reason, 0) + 1
    return CocoData(list(images.values()), kept, list(tree["categories"]), source, dropped)


def load_coco(path: str | Path, on_bad: str = "error", image_root: str | Path | None = None) -> CocoData:
    """Read and validate a COCO JSON file (one line on any problem; see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise KdforgeError(f"COCO file not found: {path}")
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KdforgeError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    return validate(tree, str(path), on_bad, image_root)


def save_coco(data: CocoData | dict[str, Any], path: str | Path) -> Path:
    """Write COCO JSON atomically (temp file, then rename)."""
    tree = data.as_dict() if isinstance(data, CocoData) else data
    path = Path(path)
    atomic_write_text(path, json.dumps(tree))
    return path
