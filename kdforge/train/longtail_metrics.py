"""Many / medium / few-shot accuracy, the standard long-tailed breakdown (OLTR, RIDE, SADE, MDCS).

A class is *many-shot* with more than `many` training samples, *few-shot* with fewer than
`few`, and *medium-shot* otherwise (`few <= n <= many`). The defaults 100 / 20 are the
CIFAR-100-LT / ImageNet-LT thresholds, set for a head class of 500 (CIFAR) images. On small
data use `scaled_shot_thresholds(n_max)`, which keeps the same fractions of the head size
(many > n_max/5, few < n_max/25), so a set with the CIFAR-100-LT profile splits into groups of
the same relative sizes. Group accuracy is the mean of per-class accuracies (each class counts
once), as in the reference `shot_acc` code; an empty group gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

REFERENCE_HEAD = 500   # head-class size the 100 / 20 thresholds were defined for (CIFAR-100-LT)


def scaled_shot_thresholds(n_max: int, reference_head: int = REFERENCE_HEAD) -> tuple[float, float]:
    """(many, few) thresholds 100 and 20 rescaled from a `reference_head`-image head to `n_max`."""
    if n_max < 1 or reference_head < 1:
        raise KdforgeError(f"shot thresholds need n_max >= 1 and reference_head >= 1, got {n_max}, {reference_head}")
    return 100.0 * n_max / reference_head, 20.0 * n_max / reference_head


def shot_groups(train_class_counts: Sequence[int] | Tensor, many: float = 100, few: float = 20) -> dict[str, Tensor]:
    """Boolean class masks {"many", "medium", "few"} from the training counts."""
    counts = torch.as_tensor(train_class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise KdforgeError(f"train_class_counts must be a non-empty 1-D list, got shape {tuple(counts.shape)}")
    if few > many:
        raise KdforgeError(f"the few-shot threshold ({few}) must not exceed the many-shot one ({many})")
    many_mask = counts > many
    few_mask = counts < few
    return {"many": many_mask, "medium": ~(many_mask | few_mask), "few": few_mask}


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Top-1 accuracy (%) of each class over its test samples; NaN for a class with none."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise KdforgeError(f"logits must be (N, C) with N = len(labels); got {tuple(logits.shape)} "
                           f"and {tuple(labels.shape)}")
    if logits.shape[1] != num_classes:
        raise KdforgeError(f"logits have {logits.shape[1]} classes but train_class_counts has {num_classes}")
    hit = (logits.argmax(dim=1) == labels).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=hit, minlength=num_classes)
    return torch.where(total > 0, 100.0 * correct / total.clamp_min(1), torch.full_like(total, math.nan))


def many_medium_few_accuracy(logits: Tensor, labels: Tensor, train_class_counts: Sequence[int] | Tensor,
                             many: float = 100, few: float = 20) -> dict[str, float | int]:
    """Overall top-1 (%) and the mean per-class accuracy (%) of the many/medium/few-shot classes.

    Returns {"overall", "many", "medium", "few", "n_many", "n_medium", "n_few"}; `n_*` are the
    numbers of classes in each group.
    """
    labels = labels.long()
    groups = shot_groups(train_class_counts, many, few)
    acc = per_class_accuracy(logits.detach().float(), labels, len(groups["many"]))
    out: dict[str, float | int] = {"overall": float((logits.argmax(1) == labels).double().mean() * 100.0)}
    for name, mask in groups.items():
        values = acc[mask]
        values = values[~values.isnan()]
        out[name] = float(values.mean()) if values.numel() else math.nan
        out[f"n_{name}"] = int(mask.sum())
    return out
