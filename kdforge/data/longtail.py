"""Long-tailed training sets (CIFAR-100-LT protocol) and the registered `procedural_cifar_lt`.

Why: long-tailed recognition methods (MDCS, ...) are judged on a train split whose class sizes
decay exponentially, n_c = n_max * (1/IF)^(c / (C-1)) for class c = 0..C-1 (class 0 is the
head), while the test split stays balanced, so its accuracy is the balanced accuracy. As in the
LDAM-DRW / CIFAR-100-LT code, counts are truncated to integers and each class keeps a random
subset of its samples; here at least one sample is always kept, so tiny sets keep every class.
"""

from __future__ import annotations

import math
import os

import torch

from kdforge.data.base import ImageTensors
from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

NAME = "procedural_cifar_lt"


def long_tailed_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sizes int(n_max * (1/IF)^(c/(C-1))), at least 1; the head class keeps n_max."""
    if imbalance_factor < 1 or not math.isfinite(imbalance_factor):
        raise KdforgeError(f"imbalance_factor must be a finite number >= 1, got {imbalance_factor}")
    if n_max < 1 or num_classes < 1:
        raise KdforgeError(f"long-tailed counts need n_max >= 1 and num_classes >= 1, got {n_max}, {num_classes}")
    if num_classes == 1:
        return [n_max]
    # float64 power, then a tiny tolerance so exact products (e.g. 500 * 0.1) do not truncate down
    return [max(1, int(n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1)) + 1e-9))
            for c in range(num_classes)]


def long_tailed_subset(data: ImageTensors, imbalance_factor: float, seed: int) -> ImageTensors:
    """Keep n_c random samples of each class c (exponential profile, class 0 largest).

    n_max is the smallest class count of `data` (the per-class size of a balanced set), so every
    class can supply its quota. Which samples are kept depends only on `seed`; the kept samples
    stay in their original order.
    """
    counts = torch.bincount(data.labels, minlength=data.num_classes)
    if int(counts.min()) < 1:
        empty = int((counts == 0).nonzero()[0])
        raise KdforgeError(f"{data.name or 'data set'}: class {empty} has no samples; cannot make it long-tailed")
    quota = long_tailed_counts(int(counts.min()), data.num_classes, imbalance_factor)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
    keep = []
    for c in range(data.num_classes):
        members = (data.labels == c).nonzero().flatten()
        keep.append(members[torch.randperm(members.numel(), generator=gen)[: quota[c]]])
    return data.subset(torch.cat(keep).sort().values)


def class_counts(data: ImageTensors) -> list[int]:
    """Training samples per class (the prior of logit-adjusted losses, the many/few split)."""
    return [int(n) for n in torch.bincount(data.labels, minlength=data.num_classes)]


def procedural_cifar_lt(split: str = "train", imbalance_factor: float = 100.0, num_train: int = 50000,
                        num_test: int = 10000, seed: int = 0, num_classes: int = 100,
                        num_superclasses: int = 20, image_size: int = 32,
                        root: str | os.PathLike[str] | None = None, cache: bool = True) -> ImageTensors:
    """procedural_cifar with a long-tailed train split (`imbalance_factor` = n_max / n_min) and the
    balanced test split. `num_train` is the size of the balanced set the train split is cut from."""
    if split not in ("train", "test"):
        raise KdforgeError(f"{NAME}: unknown split '{split}'; expected 'train' or 'test'")
    long_tailed_counts(1, 1, imbalance_factor)   # validates the factor for both splits
    data = procedural_cifar(split=split, num_train=num_train, num_test=num_test, seed=seed,
                            num_classes=num_classes, num_superclasses=num_superclasses,
                            image_size=image_size, root=root, cache=cache)
    if split == "train":
        data = long_tailed_subset(data, imbalance_factor, seed)
    data.name = NAME
    return data


DATASETS.register(NAME, procedural_cifar_lt, kind="classification", source="procedural", long_tailed=True)
