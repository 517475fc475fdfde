"""ImageFolder trees (`root/<class>/<image>`): an in-memory loader and a per-item streaming Dataset.

Small trees are decoded once into one uint8 tensor so training batches are tensor slices; large
trees use `ImageFolderStream`, which decodes per item so DataLoader workers share the cost.
Every image is converted to RGB and brought to a fixed square size (shorter side resized, then
center-cropped) so samples stack into one (N, 3, S, S) batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdforge.data.base import ImageTensors
from kdforge.errors import KdforgeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# ImageNet statistics: the usual choice for natural photos, and split-independent (train and test
# must be normalised the same way, so they are not computed from whichever split is loaded).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is an optional extra
        raise KdforgeError("image_folder needs Pillow: pip install 'kdforge[images]'") from None
    return Image


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _resolve(root: str | Path, split: str | None) -> tuple[Path, list[str]]:
    """The folder holding `<class>/` dirs for this split, and the class names.

    With a split, classes are the union over all sibling split folders (`train/`, `val/`, ...), so a
    class missing from one split cannot shift the label ids of the others.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KdforgeError(f"image_folder: directory {root} not found; expected {root}/<class>/<image>"
                           + (f" under {root}/{split}/" if split else ""))
    if split is None:
        split_dir, classes = root, _class_dirs(root)
    else:
        split_dir = root / split
        if not split_dir.is_dir():
            found = _class_dirs(root)
            raise KdforgeError(f"image_folder: split folder {split_dir} not found (found: "
                               f"{', '.join(found) or 'nothing'}); expected {root}/{split}/<class>/<image>")
        classes = sorted({c for s in _class_dirs(root) for c in _class_dirs(root / s)})
    if not classes:
        loose = [p.name for p in split_dir.iterdir() if _is_image(p)]
        what = f"{len(loose)} loose images but no class folders" if loose else "no class folders"
        raise KdforgeError(f"image_folder: {split_dir} has {what}; expected {split_dir}/<class>/<image> "
                           f"with one sub-folder per class")
    return split_dir, classes


def scan_image_folder(root: str | Path, split: str | None = None,
                      classes: Sequence[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """List `(image path, label)` pairs, sorted by class then file name; labels follow sorted folder names."""
    split_dir, found = _resolve(root, split)
    names = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(names)}
    samples: list[tuple[Path, int]] = []
    for c in found:
        if c not in index:
            raise KdforgeError(f"image_folder: class folder '{c}' in {split_dir} is not in the given classes")
        folder = split_dir / c
        if folder.is_dir():
            samples += [(p, index[c]) for p in sorted(folder.iterdir()) if _is_image(p)]
    if not samples:
        raise KdforgeError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                           f"{split_dir}/<class>/")
    return samples, names


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode one file to an RGB uint8 (3, S, S) array; a corrupt file fails naming that file."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()  # Pillow decodes lazily: force it here so truncation is caught
            img = img.convert("RGB")
    except Exception as err:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        raise KdforgeError(f"image_folder: cannot read image {path}: {err}") from None
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # writable copy


def _check_size(image_size: int) -> int:
    if not isinstance(image_size, int) or image_size < 1:
        raise KdforgeError(f"image_folder: image_size must be a positive integer, got {image_size!r}")
    return image_size


def image_folder(root: str | Path, split: str | None = None, image_size: int = 32,
                 classes: Sequence[str] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> ImageTensors:
    """Load a whole ImageFolder tree into memory as (N, 3, S, S) uint8 (fine for up to ~1e5 small images).

    `split` reads `root/<split>/<class>/...`; `classes` pins the class order (e.g. to match a teacher).
    """
    image_size = _check_size(image_size)
    samples, names = scan_image_folder(root, split, classes)
    images = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = torch.from_numpy(load_image(path, image_size))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ImageTensors(images, labels, len(names), "image_folder", tuple(mean), tuple(std), names)


class ImageFolderStream(Dataset):
    """An ImageFolder tree decoded per item, for trees too large to hold in memory.

    Yields `(uint8 (3, S, S) tensor, label)`; pass it to a `DataLoader` with workers to decode in
    parallel. `transform`, if given, is applied to the uint8 tensor.
    """

    def __init__(self, root: str | Path, split: str | None = None, image_size: int = 32,
                 classes: Sequence[str] | None = None,
                 transform: Callable[[Tensor], Any] | None = None) -> None:
        self.image_size = _check_size(image_size)
        self.samples, self.classes = scan_image_folder(root, split, classes)
        self.num_classes = len(self.classes)
        self.transform = transform
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = torch.from_numpy(load_image(path, self.image_size))
        return (self.transform(image) if self.transform else image), label
