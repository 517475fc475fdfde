"""A user's dense data set as folders of PNG files (read with Pillow).

Layout (one file stem per sample, the same stem in every folder)::

    root/images/<stem>.png     RGB (any mode Pillow converts to RGB)
    root/semseg/<stem>.png     8-bit labels 0..num_classes-1; 255 = unlabelled
    root/depth/<stem>.png      16-bit (or 8-bit) depth, value / depth_scale; 0 = no measurement
    root/normals/<stem>.png    RGB, normal = value / 127.5 - 1; (0, 0, 0) = no measurement
    root/boundary/<stem>.png   8-bit, non-zero = boundary

Only the folders of the requested tasks are read. Every target must have its image's size (a
size mismatch fails naming the file), every image its target and every target its image (a
missing pair fails naming the stem), and a label outside 0..num_classes-1 that is not 255 fails
naming the file and the value. Samples are resized to `size` x `size` (images bilinear, labels
and boundaries nearest, depth nearest so no invalid zero is blended in, normals renormalised).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.dense.scenes import IGNORE, TASKS, DenseData

__all__ = ["load_dense_folder"]

_SUFFIXES = (".png",)


def _stems(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in _SUFFIXES and p.is_file()}


def _open(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise KdforgeError(f"dense data: cannot read {path}: {exc}") from None


def _array(img, mode: str | None = None) -> Tensor:
    import numpy as np

    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    arr = np.asarray(img)
    if arr.dtype == np.uint16 or arr.dtype.kind == "i":
        arr = arr.astype(np.int32)
    return torch.from_numpy(arr.copy())


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    four = x[None, None] if x.dim() == 2 else x[None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(four.float(), size=(size, size), mode=mode, **kwargs)
    return out[0, 0] if x.dim() == 2 else out[0]


def load_dense_folder(root: str | Path, tasks: tuple[str, ...] | list[str], num_classes: int, size: int = 64,
                      depth_scale: float = 1000.0) -> DenseData:
    """Read `root`'s images and the targets of `tasks` into a `DenseData` (see the module doc)."""
    root = Path(root)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise KdforgeError(f"dense data: unknown task(s) {unknown or '(none given)'}; known: {', '.join(TASKS)}")
    if "semseg" in tasks and not 1 <= num_classes <= IGNORE:
        raise KdforgeError(f"dense data: num_classes must be in 1..{IGNORE}, got {num_classes}")
    for name in ("images", *tasks):
        if not (root / name).is_dir():
            raise KdforgeError(f"dense data: folder {root / name} not found (layout: root/images, root/<task>)")
    images = _stems(root / "images")
    if not images:
        raise KdforgeError(f"dense data: no .png images in {root / 'images'}")
    folders = {t: _stems(root / t) for t in tasks}
    for t, files in folders.items():
        if missing := sorted(set(images) - set(files)):
            raise KdforgeError(f"dense data: image '{missing[0]}' has no {t} file in {root / t} "
                               f"({len(missing)} missing)")
        if extra := sorted(set(files) - set(images)):
            raise KdforgeError(f"dense data: {t} file {files[extra[0]]} has no image in {root / 'images'}")
    out_images, targets = [], {t: [] for t in tasks}
    for stem, path in images.items():
        img = _open(path)
        w, h = img.size
        out_images.append(_resize(_array(img, "RGB").permute(2, 0, 1), size, "bilinear").round().clamp(0, 255))
        for t in tasks:
            target = _open(folders[t][stem])
            if target.size != (w, h):
                raise KdforgeError(f"dense data: {folders[t][stem]} is {target.size[0]}x{target.size[1]} but its "
                                   f"image {path} is {w}x{h}")
            targets[t].append(_read_target(t, target, folders[t][stem], num_classes, size, depth_scale))
    return DenseData(torch.stack(out_images).to(torch.uint8), {t: torch.stack(v) for t, v in targets.items()},
                     num_classes, [str(i) for i in range(num_classes)], names=list(images))


def _read_target(task: str, img, path: Path, num_classes: int, size: int, depth_scale: float) -> Tensor:
    if task == "semseg":
        if img.mode not in ("L", "P", "I", "I;16"):
            raise KdforgeError(f"dense data: {path} must be a single-channel label PNG (mode L or P), "
                               f"got mode {img.mode}")
        labels = _array(img).long()
        bad = labels[(labels >= num_classes) & (labels != IGNORE) | (labels < 0)]
        if bad.numel():
            raise KdforgeError(f"dense data: {path} holds label value {int(bad[0])}, outside 0..{num_classes - 1} "
                               f"(and not {IGNORE}, unlabelled)")
        return _resize(labels, size, "nearest").long()
    if task == "depth":
        if img.mode not in ("L", "I", "I;16", "I;16B", "F"):
            raise KdforgeError(f"dense data: {path} must be a single-channel depth PNG (8 or 16 bit), got mode "
                               f"{img.mode}")
        return _resize(_array(img).float() / depth_scale, size, "nearest")
    if task == "normals":
        raw = _array(img, "RGB").permute(2, 0, 1).float()
        valid = raw.sum(0, keepdim=True) > 0
        n = torch.where(valid, raw / 127.5 - 1.0, torch.zeros_like(raw))
        n = _resize(n, size, "nearest")
        return n / n.norm(dim=0, keepdim=True).clamp_min(1e-6)
    return (_resize(_array(img, "L").float(), size, "nearest") > 0).to(torch.uint8)     # boundary
