"""Loaders for real on-disk data formats, registered in `DATASETS` (kind="classification", source="file").

Each loader returns an in-memory `ImageTensors` split (uint8 (N, C, H, W) + int64 labels):

* `cifar10`, `cifar100`: the official python-pickle release (`cifar-10-batches-py/`,
  `cifar-100-python/`), `root` being that folder or its parent.
* `mnist`, `fashion_mnist`: IDX files, gzipped or raw, in `root` or `root/mnist/`
  (`root/fashion_mnist/`), torchvision's `root/MNIST/raw/` layout also accepted.
* `image_folder`: `root/[<split>/]<class>/<image>` trees decoded with Pillow (see `folder.py`).
* `npz`: a NumPy archive holding `x`/`y` (or `images`/`labels`, or `x_<split>`/`y_<split>`).

Security: the CIFAR release is a set of Python pickles, and unpickling can run arbitrary code.
Only point `cifar10`/`cifar100` at files from the official archive (`kdforge data prepare`
checks its MD5) or from a source you trust. The other formats are parsed without pickle
(`np.load(..., allow_pickle=False)`).

Files that are absent raise `MissingDataError` (so `prepare` can fetch them); files that are
present but damaged raise `KdforgeError`; both name the file.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdforge.data.base import ImageTensors
from kdforge.data.folder import ImageFolderStream, image_folder
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

__all__ = ["MissingDataError", "ImageFolderStream", "cifar10", "cifar100", "mnist", "fashion_mnist",
           "image_folder", "npz", "read_idx", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD"]

# Per-channel statistics of the training sets in [0, 1] units. The CIFAR-100 values are the ones the
# common KD code bases (CRD, mdistiller) normalise with, so teachers trained there transfer as-is.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]

CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Where IDX files may sit below `root`; the first entry is where `kdforge data prepare` puts them.
IDX_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"),
               "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw")}


class MissingDataError(KdforgeError):
    """Expected data files are absent (not damaged): `kdforge data prepare` can fetch them."""


def _hint(name: str, root: Path) -> str:
    return f"run `kdforge data prepare {name} --root {root}`"


def _check_split(name: str, split: str) -> None:
    if split not in ("train", "test"):
        raise KdforgeError(f"{name}: split must be 'train' or 'test', got {split!r}")


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")


# ----------------------------------------------------------------------------------------- CIFAR


def _cifar_dir(name: str, root: str | Path, subdir: str, marker: str, archive: str) -> Path:
    """Accept both `root/<subdir>/` (parent given) and `root/` itself (extracted folder given)."""
    root = Path(root).expanduser()
    for d in (root / subdir, root):
        if (d / marker).is_file():
            return d
    raise MissingDataError(f"{name}: {root / subdir / marker} not found; expected the extracted {archive} "
                           f"as {root / subdir}/; {_hint(name, root)}")


def _unpickle(name: str, path: Path) -> dict[Any, Any]:
    """Load one CIFAR pickle (see the module docstring about trusting its origin)."""
    if not path.is_file():
        raise MissingDataError(f"{name}: {path} not found (incomplete extraction?); "
                               f"{_hint(name, path.parent.parent)}")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated / not a pickle / wrong protocol all look different
        raise KdforgeError(f"{name}: cannot read {path}: corrupt or truncated pickle "
                           f"({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise KdforgeError(f"{name}: {path} holds a {type(obj).__name__}, expected a CIFAR dict")
    return obj


def _entry(name: str, path: Path, obj: dict[Any, Any], key: bytes) -> Any:
    if key not in obj:
        found = ", ".join(repr(k) for k in obj)
        raise KdforgeError(f"{name}: {path} has no {key!r} entry (found: {found})")
    return obj[key]


def _labels(name: str, path: Path, values: Any, n: int, num_classes: int, what: str) -> np.ndarray:
    try:
        y = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise KdforgeError(f"{name}: {path}: {what} are not integers ({err})") from None
    if y.shape != (n,):
        raise KdforgeError(f"{name}: {path}: {n} images but {what} of shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise KdforgeError(f"{name}: {path}: {what} outside [0, {num_classes}): "
                           f"min {y.min()}, max {y.max()}")
    return y


def _cifar_batch(name: str, path: Path, label_keys: dict[bytes, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One pickle -> (uint8 (N, 3072) rows, one label array per key in `label_keys` {key: classes})."""
    obj = _unpickle(name, path)
    data = np.asarray(_entry(name, path, obj, b"data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise KdforgeError(f"{name}: {path}: b'data' must be uint8 (N, 3072), got {data.dtype} "
                           f"{data.shape}")
    labels = [_labels(name, path, _entry(name, path, obj, k), len(data), c, repr(k))
              for k, c in label_keys.items()]
    return data, labels


def _label_names(name: str, path: Path, key: bytes) -> list[str]:
    raw = _entry(name, path, _unpickle(name, path), key)
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]


def _cifar_images(parts: list[np.ndarray]) -> Tensor:
    """Rows are the R plane, then G, then B, each 32x32 row-major: a plain reshape gives NCHW."""
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return torch.from_numpy(_writable(data).reshape(-1, 3, 32, 32))


@DATASETS.register("cifar10", kind="classification", source="file")
def cifar10(root: str | Path, split: str = "train") -> ImageTensors:
    """CIFAR-10 from `cifar-10-batches-py/` (trusted pickles only, see the module docstring)."""
    _check_split("cifar10", split)
    d = _cifar_dir("cifar10", root, CIFAR10_DIR, "batches.meta", "cifar-10-python.tar.gz")
    names = _label_names("cifar10", d / "batches.meta", b"label_names")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [_cifar_batch("cifar10", d / f, {b"labels": len(names)}) for f in files]
    images = _cifar_images([x for x, _ in batches])
    labels = torch.from_numpy(np.concatenate([y for _, (y,) in batches]))
    return ImageTensors(images, labels, len(names), "cifar10", CIFAR10_MEAN, CIFAR10_STD, names)


@DATASETS.register("cifar100", kind="classification", source="file")
def cifar100(root: str | Path, split: str = "train", label: str = "fine") -> ImageTensors:
    """CIFAR-100 from `cifar-100-python/` (trusted pickles only, see the module docstring).

    `label="fine"` gives the 100 classes; `label="coarse"` the 20 superclasses. `extra["coarse"]`
    always holds the superclass ids (e.g. for hierarchy-aware losses); with `label="coarse"`,
    `extra["fine"]` keeps the fine ids.
    """
    _check_split("cifar100", split)
    if label not in ("fine", "coarse"):
        raise KdforgeError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    d = _cifar_dir("cifar100", root, CIFAR100_DIR, "meta", "cifar-100-python.tar.gz")
    fine_names = _label_names("cifar100", d / "meta", b"fine_label_names")
    coarse_names = _label_names("cifar100", d / "meta", b"coarse_label_names")
    data, (fine, coarse) = _cifar_batch("cifar100", d / split, {b"fine_labels": len(fine_names),
                                                                b"coarse_labels": len(coarse_names)})
    images = _cifar_images([data])
    fine_t, coarse_t = torch.from_numpy(fine), torch.from_numpy(coarse)
    if label == "fine":
        return ImageTensors(images, fine_t, len(fine_names), "cifar100", CIFAR100_MEAN, CIFAR100_STD,
                            fine_names, {"coarse": coarse_t})
    return ImageTensors(images, coarse_t, len(coarse_names), "cifar100", CIFAR100_MEAN, CIFAR100_STD,
                        coarse_names, {"coarse": coarse_t, "fine": fine_t})


# ------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzipped or raw, detected from its bytes) using its header, strictly.

    Header: two zero bytes, a dtype code, the number of dims, then one big-endian uint32 per dim.
    The payload must hold exactly the promised number of elements: truncation is an error.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise KdforgeError(f"{path}: corrupt or truncated gzip data ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise KdforgeError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim, start = raw[3], 4 + 4 * raw[3]
    if len(raw) < start:
        raise KdforgeError(f"{path}: truncated IDX header ({len(raw)} bytes, {start} needed for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    need, have = count * dtype.itemsize, len(raw) - start
    if have != need:
        what = "truncated" if have < need else "has trailing bytes"
        raise KdforgeError(f"{path}: {what}: header promises shape {dims} ({need} bytes of data), "
                           f"file holds {have}")
    return np.frombuffer(raw, dtype, count, start).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(name: str, root: Path, stem: str) -> Path:
    """Find `stem` (or Kaggle's `train-images.idx3-ubyte` spelling), raw or `.gz`, in root or below."""
    dirs = [root, *(root / s for s in IDX_SUBDIRS[name])]
    spellings = (stem, stem.replace("-idx", ".idx"))
    for d in dirs:
        for s in spellings:
            for suffix in ("", ".gz"):
                if (d / (s + suffix)).is_file():
                    return d / (s + suffix)
    expected = ", ".join(f + ".gz" for pair in MNIST_FILES.values() for f in pair)
    raise MissingDataError(f"{name}: {stem}[.gz] not found in {root} or {root / IDX_SUBDIRS[name][0]}/; "
                           f"expected the {name} IDX files ({expected}) there; {_hint(name, root)}")


def _idx_split(name: str, root: str | Path, split: str, mean: tuple[float, ...], std: tuple[float, ...],
               class_names: list[str]) -> ImageTensors:
    _check_split(name, split)
    root = Path(root).expanduser()
    img_path, lab_path = (_find_idx(name, root, stem) for stem in MNIST_FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise KdforgeError(f"{name}: {img_path}: expected uint8 images (N, H, W), got {images.dtype} "
                           f"{images.shape}")
    if labels.ndim != 1:
        raise KdforgeError(f"{name}: {lab_path}: expected 1-d labels, got shape {labels.shape}")
    if len(labels) != len(images):
        raise KdforgeError(f"{name}: {lab_path} has {len(labels)} labels but {img_path} has "
                           f"{len(images)} images")
    y = _labels(name, lab_path, labels, len(images), len(class_names), "labels")
    x = torch.from_numpy(_writable(images)).unsqueeze(1)
    return ImageTensors(x, torch.from_numpy(y), len(class_names), name, mean, std, class_names)


@DATASETS.register("mnist", kind="classification", source="file")
def mnist(root: str | Path, split: str = "train") -> ImageTensors:
    """MNIST digits from the IDX files, as (N, 1, 28, 28) uint8."""
    return _idx_split("mnist", root, split, MNIST_MEAN, MNIST_STD, [str(i) for i in range(10)])


@DATASETS.register("fashion_mnist", kind="classification", source="file")
def fashion_mnist(root: str | Path, split: str = "train") -> ImageTensors:
    """Fashion-MNIST from the IDX files, as (N, 1, 28, 28) uint8."""
    return _idx_split("fashion_mnist", root, split, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                      list(FASHION_MNIST_CLASSES))


# ------------------------------------------------------------------------------- ImageFolder, npz

DATASETS.register("image_folder", image_folder, kind="classification", source="file")


def _channel_axis_first(path: Path, key: str, shape: tuple[int, ...]) -> bool:
    """Whether a 4-d image array is NCHW (True) or NHWC (False), judged by where a 1/3-sized axis is."""
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first != last:
        return first
    if first and shape[2] == shape[3]:  # (N, 3, 3, 3)-like ties: prefer the square-image reading
        return True
    if first and shape[1] == shape[2]:
        return False
    raise KdforgeError(f"npz: {path}: cannot tell the channel axis of '{key}' with shape {shape}; "
                       f"expected (N, H, W, C) or (N, C, H, W) with C = 1 or 3")


def _npz_images(path: Path, key: str, x: np.ndarray) -> Tensor:
    """Any accepted layout/dtype -> uint8 NCHW; floats must be in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if not _channel_axis_first(path, key, x.shape):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise KdforgeError(f"npz: {path}: '{key}' must be (N, H, W), (N, H, W, C) or (N, C, H, W), "
                           f"got shape {x.shape}")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise KdforgeError(f"npz: {path}: float '{key}' must lie in [0, 1] (got min {x.min()}, "
                               f"max {x.max()}); store uint8 0..255 or divide by 255")
        x = np.rint(x * 255.0).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise KdforgeError(f"npz: {path}: integer '{key}' must lie in 0..255 (got {x.min()}..{x.max()})")
        x = x.astype(np.uint8)
    else:
        raise KdforgeError(f"npz: {path}: '{key}' has unsupported dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise KdforgeError(f"npz: {path}: '{key}' must be 1-d class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or (y.size and not np.array_equal(y, np.round(y))):
            raise KdforgeError(f"npz: {path}: '{key}' must hold integer class ids, got {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise KdforgeError(f"npz: {path}: '{key}' has negative class ids (min {y.min()})")
    return y


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units, accumulated in float64 chunks to bound memory."""
    c = images.shape[1]
    s, s2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        f = chunk.to(torch.float64) / 255.0
        s += f.sum(dim=(0, 2, 3))
        s2 += (f * f).sum(dim=(0, 2, 3))
    n = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant channels: avoid divide-by-zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@DATASETS.register("npz", kind="classification", source="file")
def npz(path: str | Path | None = None, split: str | None = None, *, root: str | Path | None = None,
        num_classes: int | None = None, class_names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageTensors:
    """Images and labels from a NumPy `.npz` (read with `allow_pickle=False`, so no code can run).

    Keys: `x`/`y` or `images`/`labels`; with `split`, `x_<split>`/`y_<split>`. Images are
    (N, H, W), NHWC or NCHW, uint8 or float in [0, 1]. `root` is an alias of `path` so configs can
    use one key for every data set. Unless given, the class count covers every label array in the
    file, class names come from an optional `class_names` array, and mean/std are computed from
    `x_train` when present (so every split is normalised alike), else from the loaded images.
    """
    given = path if path is not None else root
    if given is None:
        raise KdforgeError("npz: no file given; pass path=... (or root=...) pointing at an .npz")
    p = Path(given).expanduser()
    if not p.is_file():
        raise KdforgeError(f"npz: file {p} not found; expected an .npz holding arrays x/y (or images/labels, "
                           f"or x_train/y_train/x_test/y_test)")
    with contextlib.ExitStack() as stack:  # np.load(path) leaks its handle when the zip is bad
        handle = stack.enter_context(p.open("rb"))
        try:
            archive = np.load(handle, allow_pickle=False)
        except Exception as err:
            raise KdforgeError(f"npz: cannot read {p}: {err}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise KdforgeError(f"npz: {p} is a single .npy array, expected an .npz archive with x and y")
        stack.enter_context(archive)
        keys = list(archive.files)

        def get(key: str) -> np.ndarray:
            try:
                return archive[key]
            except Exception as err:  # corrupt member, object arrays (would need pickle), ...
                raise KdforgeError(f"npz: {p}: cannot read array '{key}': {err}") from None

        if split is not None:
            xk, yk = f"x_{split}", f"y_{split}"
        else:
            xk = next((k for k in ("x", "images") if k in keys), "x")
            yk = next((k for k in ("y", "labels") if k in keys), "y")
        missing = [k for k in (xk, yk) if k not in keys]
        if missing:
            tip = "" if split is not None or not any(k.startswith("x_") for k in keys) else \
                " (this file has per-split arrays: pass split=...)"
            raise KdforgeError(f"npz: {p} has no {' / '.join(repr(k) for k in missing)} array (found: "
                               f"{', '.join(keys)}){tip}")
        x = _npz_images(p, xk, get(xk))
        y = _npz_labels(p, yk, get(yk))
        if len(x) != len(y):
            raise KdforgeError(f"npz: {p}: '{xk}' has {len(x)} images but '{yk}' has {len(y)} labels")
        names = list(class_names) if class_names is not None else (
            [str(n) for n in get("class_names").tolist()] if "class_names" in keys else None)
        if num_classes is None:
            label_keys = [k for k in keys if k in ("y", "labels") or k.startswith("y_")]
            seen = max((int(_npz_labels(p, k, get(k)).max(initial=-1)) + 1 for k in label_keys), default=0)
            num_classes = max(seen, len(names) if names else 0)
        if y.size and y.max() >= num_classes:
            raise KdforgeError(f"npz: {p}: '{yk}' has class id {y.max()} but num_classes is {num_classes}")
        if names is not None and len(names) != num_classes:
            raise KdforgeError(f"npz: {p}: {len(names)} class names for {num_classes} classes")
        if mean is None or std is None:
            ref = x if split is None or "x_train" not in keys or xk == "x_train" else \
                _npz_images(p, "x_train", get("x_train"))
            stats = channel_stats(ref)
            mean = stats[0] if mean is None else mean
            std = stats[1] if std is None else std
    return ImageTensors(x, torch.from_numpy(y), int(num_classes), "npz", tuple(mean), tuple(std), names)
