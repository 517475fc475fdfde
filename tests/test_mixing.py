"""Batched mixup / cutmix: hand-checked mixing, exact soft targets, reproducibility."""

import numpy as np
import pytest
import torch

from kdforge.data.mixing import (
    MixParams,
    apply_mix,
    box_mask,
    cutmix_boxes,
    mix_batch,
    mix_params,
    mix_targets,
)
from kdforge.errors import KdforgeError


def _batch(n: int = 6, c: int = 3, h: int = 8, w: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3, 4, 0][:n])
    index = torch.tensor([17, 3, 250, 9, 41, 1000][:n])
    return x, target, index


def test_mixup_hand_checked_two_samples() -> None:
    x = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 5.0)])
    no_box = torch.zeros(2, 4, dtype=torch.long)
    params = MixParams("mixup", torch.tensor([1, 0]), torch.tensor([0.25, 0.6]), no_box)
    out = apply_mix(x, params)
    # sample 0: 0.25 * 1 + 0.75 * 5 = 4.0; sample 1: 0.6 * 5 + 0.4 * 1 = 3.4
    assert torch.allclose(out[0], torch.full((1, 2, 2), 4.0))
    assert torch.allclose(out[1], torch.full((1, 2, 2), 3.4))
    soft = mix_targets(torch.tensor([2, 0]), 3, params)
    assert torch.allclose(soft, torch.tensor([[0.75, 0.0, 0.25], [0.6, 0.0, 0.4]]))


def test_cutmix_hand_checked_box() -> None:
    x = torch.stack([torch.zeros(2, 4, 4), torch.ones(2, 4, 4)])
    box = torch.tensor([[1, 3, 0, 2], [0, 0, 0, 0]])  # rows 1-2, cols 0-1 of sample 0 from sample 1
    params = MixParams("cutmix", torch.tensor([1, 1]), torch.tensor([0.75, 1.0]), box)
    out = apply_mix(x, params)
    expected = torch.zeros(2, 4, 4)
    expected[:, 1:3, 0:2] = 1.0
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], x[1])


def test_mixup_batch_matches_formula_and_soft_targets() -> None:
    x, target, index = _batch()
    out, soft = mix_batch(x, target, 5, index, epoch=2, seed=7, mixup=0.4)
    p = mix_params(index, 2, 7, 8, 8, mixup=0.4)
    assert p.mode == "mixup"
    assert sorted(p.partner.tolist()) == list(range(6))          # a permutation of the batch
    assert ((p.lam > 0) & (p.lam < 1)).all()
    for i in range(6):
        lam, j = float(p.lam[i]), int(p.partner[i])
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
        onehot = torch.zeros(5)
        onehot[target[i]] += lam
        onehot[target[j]] += 1 - lam
        assert torch.allclose(soft[i], onehot, atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(6))


def test_cutmix_box_pixels_come_from_partner_and_lambda_is_area() -> None:
    x, target, index = _batch(h=16, w=12)
    for epoch in range(5):
        out, soft = mix_batch(x, target, 5, index, epoch=epoch, seed=3, cutmix=1.0)
        p = mix_params(index, epoch, 3, 16, 12, cutmix=1.0)
        assert p.mode == "cutmix"
        for i in range(6):
            y1, y2, x1, x2 = p.box[i].tolist()
            assert 0 <= y1 <= y2 <= 16 and 0 <= x1 <= x2 <= 12
            j = int(p.partner[i])
            inside = torch.zeros(16, 12, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert torch.equal(out[i][:, inside], x[j][:, inside])
            assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])
            kept = 1 - (y2 - y1) * (x2 - x1) / (16 * 12)
            assert abs(float(p.lam[i]) - kept) < 1e-6
            assert abs(float(soft[i, target[i]]) - (kept if target[i] != target[j] else 1.0)) < 1e-6
        assert torch.allclose(soft.sum(1), torch.ones(6))


def test_cutmix_boxes_clip_at_border() -> None:
    rng = np.random.default_rng(0)
    lam = np.full(2000, 0.36)              # side ratio sqrt(0.64) = 0.8 -> 8 px of 10, half = 4
    boxes = cutmix_boxes(lam, 10, 10, rng)
    assert (boxes[:, 1] - boxes[:, 0] <= 8).all() and (boxes[:, 3] - boxes[:, 2] <= 8).all()
    assert (boxes[:, 1] - boxes[:, 0] == 8).any()         # unclipped boxes keep the full size
    assert (boxes[:, 0] == 0).any() and (boxes[:, 1] == 10).any()   # some are clipped
    mask = box_mask(torch.from_numpy(boxes[:3]), 10, 10)
    for k in range(3):
        y1, y2, x1, x2 = boxes[k]
        assert int(mask[k].sum()) == (y2 - y1) * (x2 - x1)


def test_same_inputs_same_outputs_and_independent_of_device_copy() -> None:
    x, target, index = _batch()
    a = mix_batch(x, target, 5, index, 4, 11, mixup=0.2, cutmix=1.0)
    b = mix_batch(x.clone(), target.clone(), 5, index.clone(), 4, 11, mixup=0.2, cutmix=1.0)
    torch.manual_seed(123)  # the global RNG plays no part
    c = mix_batch(x, target, 5, index, 4, 11, mixup=0.2, cutmix=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    rebuilt = apply_mix(x, mix_params(index, 4, 11, 8, 8, mixup=0.2, cutmix=1.0))  # from the parameters
    assert torch.equal(rebuilt, a[0])


def test_per_batch_mode_shares_lambda_and_box() -> None:
    x, target, index = _batch(h=16, w=16)
    for epoch in range(6):
        p = mix_params(index, epoch, 2, 16, 16, mixup=0.5, cutmix=0.5, per_sample=False)
        assert (p.lam == p.lam[0]).all() and (p.box == p.box[0]).all()
        if p.mode == "cutmix":
            y1, y2, x1, x2 = p.box[0].tolist()
            assert abs(float(p.lam[0]) - (1 - (y2 - y1) * (x2 - x1) / 256)) < 1e-6
        out, soft = mix_batch(x, target, 5, index, epoch, 2, mixup=0.5, cutmix=0.5, per_sample=False)
        assert torch.equal(out, apply_mix(x, p)) and torch.allclose(soft, mix_targets(target, 5, p))


def test_different_epoch_seed_or_indices_change_params() -> None:
    _, _, index = _batch()
    base = mix_params(index, 0, 5, 8, 8, mixup=1.0)
    for other in (mix_params(index, 1, 5, 8, 8, mixup=1.0), mix_params(index, 0, 6, 8, 8, mixup=1.0),
                  mix_params(index + 1, 0, 5, 8, 8, mixup=1.0)):
        assert not torch.equal(base.lam, other.lam)


def test_both_alphas_pick_one_mode_per_batch() -> None:
    _, _, index = _batch()
    modes = [mix_params(index, e, 0, 8, 8, mixup=0.8, cutmix=1.0).mode for e in range(40)]
    assert set(modes) == {"mixup", "cutmix"}
    assert 8 <= modes.count("cutmix") <= 32     # switch probability 0.5 (binomial(40, .5) range)


def test_off_returns_unmixed_onehot() -> None:
    x, target, index = _batch()
    out, soft = mix_batch(x, target, 5, index, 0, 0)
    assert torch.equal(out, x)
    assert torch.equal(soft, torch.nn.functional.one_hot(target, 5).float())


def test_bad_input_is_a_user_error() -> None:
    x, target, index = _batch()
    with pytest.raises(KdforgeError, match="alpha"):
        mix_batch(x, target, 5, index, 0, 0, mixup=-1.0)
    with pytest.raises(KdforgeError, match="same N"):
        mix_batch(x, target[:3], 5, index, 0, 0, mixup=1.0)
