"""Semi-supervised learning under class distribution mismatch: the split and a vector data set.

`mismatch_split` follows the WAD code (`datasets.py::Get_mismatch_unlabeled_dataset`): from a
labelled pool, `labelled_per_class` samples of each *known* class keep their labels; every
other known-class sample goes to the unlabelled set, which is then polluted with
n_unknown = ceil(m * n_known_unlabelled / (1 - m)) samples of the *unknown* classes, so the
mismatch ratio m is the unknown fraction of the unlabelled set. Known classes are relabelled
0..K-1; unknown samples carry label -1 in the task (their true class stays in `true_labels`).
The known-class part of the unlabelled set may be capped per class (`unlabelled_per_class`).

`gaussian_blobs` is the card's CPU data set: anisotropic Gaussian classes in `dim` dimensions
(random means, a random low-rank covariance per class plus isotropic noise), train and test
drawn from independent streams of the seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["SSLData", "gaussian_blobs", "mismatch_split"]


@dataclass
class SSLData:
    """Pool inputs (N, ...), labels for the labelled part, and the test set (known classes only).

    `labels` holds 0..K-1 for known-class samples and -1 for unknown ones (the learner only reads
    it at `labelled`); `true_labels` keeps the original classes for diagnostics.
    """

    x: Tensor
    labels: Tensor
    true_labels: Tensor
    labelled: Tensor  # indices into x of the labelled set
    unlabelled: Tensor  # indices into x of the unlabelled set (known + unknown classes)
    x_test: Tensor
    y_test: Tensor  # 0..K-1 (test samples of known classes only)
    num_known: int
    known_classes: list[int]
    mismatch: float

    @property
    def unknown_mask(self) -> Tensor:
        """Bool (len(unlabelled),): which unlabelled samples belong to unknown classes."""
        return self.labels[self.unlabelled] < 0


def _derive_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def mismatch_split(
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    known_classes: Sequence[int],
    labelled_per_class: int,
    mismatch: float,
    seed: int = 0,
    unlabelled_per_class: int | None = None,
) -> SSLData:
    """Labelled set, unlabelled set polluted with unknown classes at ratio `mismatch`, known-class test set.

    `unlabelled_per_class` caps the known-class samples that enter the unlabelled set (None: all
    the rest, as the official code), so high mismatch ratios fit a small pool.
    """
    known = [int(c) for c in known_classes]
    if not known or len(set(known)) != len(known):
        raise KdforgeError(f"mismatch_split: known_classes must be distinct and non-empty, got {known}")
    if not 0.0 <= mismatch < 1.0:
        raise KdforgeError(f"mismatch_split: mismatch must be in [0, 1), got {mismatch}")
    if labelled_per_class < 1:
        raise KdforgeError(f"mismatch_split: labelled_per_class must be >= 1, got {labelled_per_class}")
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise KdforgeError("mismatch_split: inputs and labels must have the same length")
    gen = torch.Generator().manual_seed(_derive_seed("mismatch_split", seed))
    num_classes = int(max(int(y.max()), max(known))) + 1
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(known)] = torch.arange(len(known))
    labels = remap[y.long()]
    labelled, unl_known = [], []
    for c in known:
        idx = (y == c).nonzero().flatten()
        if len(idx) <= labelled_per_class:
            raise KdforgeError(
                f"mismatch_split: class {c} has {len(idx)} samples, need more than "
                f"{labelled_per_class} labelled ones"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        labelled.append(idx[:labelled_per_class])
        stop = None if unlabelled_per_class is None else labelled_per_class + unlabelled_per_class
        unl_known.append(idx[labelled_per_class:stop])
    unl_known_t = torch.cat(unl_known)
    pool_unknown = (labels < 0).nonzero().flatten()
    n_unknown = math.ceil(mismatch * len(unl_known_t) / (1 - mismatch)) if mismatch > 0 else 0
    if n_unknown > len(pool_unknown):
        raise KdforgeError(
            f"mismatch_split: mismatch {mismatch} needs {n_unknown} unknown-class samples, the pool "
            f"has {len(pool_unknown)}"
        )
    chosen = pool_unknown[torch.randperm(len(pool_unknown), generator=gen)[:n_unknown]]
    unlabelled = torch.cat([unl_known_t, chosen])
    unlabelled = unlabelled[torch.randperm(len(unlabelled), generator=gen)]
    if int(y_test.max()) >= num_classes:
        raise KdforgeError("mismatch_split: the test split has classes the training pool lacks")
    keep_test = remap[y_test.long()] >= 0
    return SSLData(
        x,
        labels,
        y.long(),
        torch.cat(labelled),
        unlabelled,
        x_test[keep_test],
        remap[y_test.long()][keep_test],
        len(known),
        known,
        float(mismatch),
    )


def gaussian_blobs(
    num_classes: int = 8,
    dim: int = 16,
    per_class: int = 500,
    per_class_test: int = 200,
    separation: float = 2.0,
    rank: int = 3,
    spread: float = 1.0,
    noise: float = 0.6,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): class c ~ N(mu_c, A_c A_c^T spread^2 / rank + noise^2 I).

    Means are N(0, separation^2 I); A_c (dim x rank) is standard normal, so each class is an
    elongated cloud in its own random directions.
    """
    if min(num_classes, dim, per_class, per_class_test, rank) < 1:
        raise KdforgeError("gaussian_blobs: sizes must be >= 1")
    gen = torch.Generator().manual_seed(_derive_seed("gaussian_blobs", seed, "classes"))
    means = torch.randn((num_classes, dim), generator=gen) * separation
    axes = torch.randn((num_classes, dim, rank), generator=gen) * (spread / math.sqrt(rank))

    def draw(n: int, stream: str) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(_derive_seed("gaussian_blobs", seed, stream))
        y = torch.arange(num_classes).repeat_interleave(n)
        z = torch.randn((len(y), rank, 1), generator=g)
        x = means[y] + (axes[y] @ z).squeeze(-1) + torch.randn((len(y), dim), generator=g) * noise
        order = torch.randperm(len(y), generator=g)
        return x[order], y[order]

    x_tr, y_tr = draw(per_class, "train")
    x_te, y_te = draw(per_class_test, "test")
    return x_tr, y_tr, x_te, y_te
