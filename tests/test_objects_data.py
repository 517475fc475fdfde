"""objects_clutter: the FerKD card's object-on-clutter images (one shape per class, masks, caching)."""

from __future__ import annotations

import pytest
import torch

from kdforge.data import load_split
from kdforge.data.objects import NAME, SHAPES, class_hues, generate, objects_clutter, shape_field
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS


def test_registered_and_loadable_by_name(tmp_path):
    assert DATASETS.get(NAME) is objects_clutter
    split = load_split(NAME, "test", root=str(tmp_path), num_train=20, num_test=30, image_size=12)
    assert split.images.shape == (30, 3, 12, 12) and split.images.dtype == torch.uint8
    assert split.num_classes == 10 and split.class_names == list(SHAPES)
    assert split.extra["mask"].shape == (30, 12, 12) and split.extra["mask"].dtype == torch.bool


def test_deterministic_balanced_and_independent_splits():
    a, b = generate(40, 20, seed=3, image_size=12), generate(40, 20, seed=3, image_size=12)
    assert torch.equal(a["train"]["images"], b["train"]["images"]) and torch.equal(a["test"]["mask"], b["test"]["mask"])
    assert torch.bincount(a["train"]["labels"]).tolist() == [4] * 10
    other = generate(40, 20, seed=4, image_size=12)
    assert not torch.equal(a["train"]["images"], other["train"]["images"])
    assert not torch.equal(a["train"]["images"][:20], a["test"]["images"])
    assert torch.allclose(a["train"]["mean"], a["test"]["mean"])           # statistics from train only


def test_every_image_has_an_object_of_the_requested_size():
    d = generate(200, 10, image_size=24, object_scale=(0.2, 0.32))["train"]
    area = d["mask"].flatten(1).float().sum(1)
    assert bool((area > 0).all())
    frac = area / 24**2
    assert 0.03 < float(frac.min()) and float(frac.max()) < 0.4          # about pi r^2 for r in 0.2-0.32


def test_shapes_are_mirror_symmetric_so_a_flip_keeps_the_class():
    u, v = torch.meshgrid(torch.linspace(-1.3, 1.3, 41), torch.linspace(-1.3, 1.3, 41), indexing="xy")
    inside = []
    for s in range(len(SHAPES)):
        f = shape_field(s, u, v) < 0
        assert torch.equal(f, shape_field(s, -u, v) < 0), SHAPES[s]
        inside.append(f)
    for i in range(len(SHAPES)):              # and no two classes share an outline
        for j in range(i + 1, len(SHAPES)):
            assert (inside[i] ^ inside[j]).float().mean() > 0.05, (SHAPES[i], SHAPES[j])


def _hue_guess_accuracy(d: dict, seed: int = 0) -> float:
    """Top-1 of guessing the class whose hue is nearest to the mean object colour's hue."""
    x, m, y = d["images"].float() / 255, d["mask"], d["labels"]
    rgb = (x * m[:, None]).sum((2, 3)) / m[:, None].sum((2, 3)).clamp(min=1)
    mx, idx = rgb.max(1)
    delta = (mx - rgb.min(1).values).clamp(min=1e-6)
    r, g, b = rgb.unbind(1)
    hue = torch.where(idx == 0, ((g - b) / delta) % 6, torch.where(idx == 1, (b - r) / delta + 2, (r - g) / delta + 4))
    hue = hue / 6
    dist = (hue[:, None] - class_hues(seed, 10)[None]).abs()
    dist = torch.minimum(dist, 1 - dist)
    return float((dist.argmin(1) == y).float().mean())


def test_colour_is_a_partial_cue_and_the_outline_decides():
    cued = _hue_guess_accuracy(generate(600, 10, image_size=16)["train"])
    assert 0.35 < cued < 0.9                                   # neighbouring class hues overlap (jitter 0.05)
    random = _hue_guess_accuracy(generate(600, 10, image_size=16, hue_jitter=None)["train"])
    assert random < 0.2                                        # chance is 0.1


def test_cache_roundtrip_and_bad_options(tmp_path):
    first = objects_clutter("train", num_train=16, num_test=8, image_size=10, root=str(tmp_path))
    assert list(tmp_path.glob(f"{NAME}-v*-train.pt"))
    again = objects_clutter("train", num_train=16, num_test=8, image_size=10, root=str(tmp_path))
    assert torch.equal(first.images, again.images) and torch.equal(first.extra["mask"], again.extra["mask"])
    with pytest.raises(KdforgeError, match="num_classes"):
        objects_clutter(num_classes=11, cache=False)
    with pytest.raises(KdforgeError, match="object_scale"):
        objects_clutter(object_scale=(0.3, 0.6), cache=False)
    with pytest.raises(KdforgeError, match="unknown split"):
        objects_clutter("val", cache=False)
