"""Long-tailed subsets (CIFAR-100-LT profile), the procedural_cifar_lt data set and the
many/medium/few-shot accuracy, against hand-worked counts and a hand-checked split."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.data import load_split
from kdforge.data.base import ImageTensors
from kdforge.data.longtail import class_counts, long_tailed_counts, long_tailed_subset
from kdforge.errors import KdforgeError
from kdforge.train.longtail_metrics import many_medium_few_accuracy, scaled_shot_thresholds, shot_groups


def test_counts_by_hand() -> None:
    # 100 * (1/100)^(c/2): 100, 10, 1
    assert long_tailed_counts(100, 3, 100) == [100, 10, 1]
    # 500 * 10^(-c/4): 500, 281.17, 158.11, 88.91, 50 (truncated)
    assert long_tailed_counts(500, 5, 10) == [500, 281, 158, 88, 50]
    # at least one sample per class: 10 * 0.001 = 0.01 -> 1
    assert long_tailed_counts(10, 2, 1000) == [10, 1]
    assert long_tailed_counts(7, 4, 1) == [7, 7, 7, 7]


def test_counts_match_published_cifar_lt_sizes() -> None:
    # CIFAR-100-LT train sizes from the LDAM-DRW / MDCS papers: IR100 10,847, IR50 12,608, IR10 19,573;
    # CIFAR-10-LT IR100 12,406.
    assert sum(long_tailed_counts(500, 100, 100)) == 10847
    assert sum(long_tailed_counts(500, 100, 50)) == 12608
    assert sum(long_tailed_counts(500, 100, 10)) == 19573
    assert sum(long_tailed_counts(5000, 10, 100)) == 12406


def _toy(per_class: list[int]) -> ImageTensors:
    """Sample i has label y_i and every pixel equal to i (so kept samples are identifiable)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageTensors(images, labels, len(per_class), name="toy")


def test_subset_counts_membership_and_order() -> None:
    data = _toy([10, 10, 10])
    lt = long_tailed_subset(data, 10, seed=3)
    # n_max = 10: 10, 10 * 10^-0.5 = 3.16 -> 3, 10 * 0.1 = 1
    assert class_counts(lt) == [10, 3, 1]
    ids = lt.images[:, 0, 0, 0].long()
    assert torch.equal(lt.labels, data.labels[ids])            # each kept image keeps its own label
    assert bool((ids[1:] > ids[:-1]).all())                    # original order, no duplicates
    again = long_tailed_subset(data, 10, seed=3)
    assert torch.equal(again.images, lt.images)
    others = [long_tailed_subset(data, 10, seed=s).images[:, 0, 0, 0] for s in range(4, 10)]
    assert any(not torch.equal(o, ids.to(o.dtype)) for o in others)   # the seed picks the samples


def test_subset_unbalanced_input_uses_smallest_class() -> None:
    lt = long_tailed_subset(_toy([12, 9, 30]), 9, seed=0)
    # n_max = 9: 9, 9 * 9^-0.5 = 3, 9 / 9 = 1
    assert class_counts(lt) == [9, 3, 1]


def test_subset_errors() -> None:
    with pytest.raises(KdforgeError, match="imbalance_factor"):
        long_tailed_subset(_toy([4, 4]), 0.5, seed=0)
    data = _toy([4, 4])
    empty = ImageTensors(data.images, torch.zeros_like(data.labels), 2, name="toy")
    with pytest.raises(KdforgeError, match="class 1 has no samples"):
        long_tailed_subset(empty, 10, seed=0)


def test_registered_procedural_cifar_lt() -> None:
    args = dict(num_train=60, num_test=30, num_classes=6, num_superclasses=3, image_size=8, cache=False)
    train = load_split("procedural_cifar_lt", "train", imbalance_factor=10, **args)
    test = load_split("procedural_cifar_lt", "test", imbalance_factor=10, **args)
    # 10 per class: 10 * 10^(-c/5) = 10, 6.3, 3.98, 2.51, 1.58, 1
    assert class_counts(train) == [10, 6, 3, 2, 1, 1]
    assert class_counts(test) == [5] * 6
    full_train = load_split("procedural_cifar", "train", **args)
    full_test = load_split("procedural_cifar", "test", **args)
    assert torch.equal(test.images, full_test.images)
    flat = full_train.images.flatten(1)
    for img, y in zip(train.images.flatten(1), train.labels):   # each LT image is a balanced-set image
        match = (flat == img).all(dim=1).nonzero().flatten()
        assert match.numel() == 1 and int(full_train.labels[match[0]]) == int(y)
    assert train.name == "procedural_cifar_lt" and train.mean == full_train.mean
    with pytest.raises(KdforgeError, match="imbalance_factor"):
        load_split("procedural_cifar_lt", "test", imbalance_factor=0, **args)


def test_many_medium_few_hand_checked() -> None:
    counts = [150, 100, 50, 20, 19, 5]
    # many: n > 100 -> {0}; few: n < 20 -> {4, 5}; medium: 20 <= n <= 100 -> {1, 2, 3}
    groups = shot_groups(counts)
    assert groups["many"].tolist() == [True, False, False, False, False, False]
    assert groups["medium"].tolist() == [False, True, True, True, False, False]
    assert groups["few"].tolist() == [False, False, False, False, True, True]
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])
    preds = torch.tensor([0, 1, 1, 0, 3, 3, 4, 4, 4, 0, 4])
    logits = torch.nn.functional.one_hot(preds, 6).float()
    out = many_medium_few_accuracy(logits, labels, counts)
    # per class: 0 -> 1/2, 1 -> 1/1, 2 -> 0/2, 3 -> 1/1, 4 -> 3/4, 5 -> 0/1
    assert out["many"] == pytest.approx(50.0)
    assert out["medium"] == pytest.approx((100.0 + 0.0 + 100.0) / 3)
    assert out["few"] == pytest.approx((75.0 + 0.0) / 2)
    assert out["overall"] == pytest.approx(100.0 * 6 / 11)
    assert (out["n_many"], out["n_medium"], out["n_few"]) == (1, 3, 2)


def test_scaled_thresholds_and_empty_group() -> None:
    assert scaled_shot_thresholds(500) == (100.0, 20.0)
    assert scaled_shot_thresholds(100) == pytest.approx((20.0, 4.0))
    # IF=10 profile from a head of 100: tail 10 >= 4, so there are no few-shot classes
    counts = long_tailed_counts(100, 5, 10)
    many, few = scaled_shot_thresholds(100)
    labels = torch.arange(5)
    out = many_medium_few_accuracy(torch.eye(5), labels, counts, many, few)
    assert math.isnan(out["few"]) and out["n_few"] == 0
    assert out["overall"] == 100.0 and out["many"] == 100.0


def test_metric_errors() -> None:
    with pytest.raises(KdforgeError, match="few-shot threshold"):
        shot_groups([5, 6], many=10, few=20)
    with pytest.raises(KdforgeError, match="classes"):
        many_medium_few_accuracy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), [5, 5, 5])
