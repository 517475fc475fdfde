"""Counter-based, batched crop/flip augmentation: reproducible per (seed, epoch, index)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdforge.data.transforms import (
    CropFlip,
    _mix32,
    apply_crop_flip,
    crop_flip_params,
    hash_u32,
    normalize,
    random_crop_flip,
    to_float,
    to_normalized,
)
from kdforge.errors import KdforgeError


def _images(n: int = 64, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def test_same_view_regardless_of_batch_order_and_composition() -> None:
    data = _images()
    all_idx = torch.arange(64)
    full, _ = random_crop_flip(data, all_idx, epoch=3, seed=7)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled, _ = random_crop_flip(data[perm], perm, epoch=3, seed=7)
    assert torch.equal(shuffled, full[perm])
    sub = torch.tensor([5, 60, 2])
    part, _ = random_crop_flip(data[sub], sub, epoch=3, seed=7)
    assert torch.equal(part, full[sub])
    single, _ = random_crop_flip(data[9:10], [9], epoch=3, seed=7)
    assert torch.equal(single[0], full[9])


def test_matches_per_sample_slicing_reference() -> None:
    data = _images(n=16)
    idx = torch.arange(100, 116)
    out, params = random_crop_flip(data, idx, epoch=1, seed=0, padding=4)
    assert out.dtype == torch.float32 and out.shape == data.shape
    assert set(params) == {"dx", "dy", "flip"}
    for i in range(16):
        dx, dy, fl = int(params["dx"][i]), int(params["dy"][i]), bool(params["flip"][i])
        padded = F.pad(data[i].float(), (4, 4, 4, 4))
        ref = padded[:, dy:dy + 32, dx:dx + 32]
        if fl:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref / 255.0), f"sample {i}"
    # the reference covers both flip states and several shifts
    assert params["flip"].any() and (~params["flip"]).any()
    assert len(set(params["dx"].tolist())) > 3


def test_rebuild_view_from_params_and_zero_padding() -> None:
    data = _images(n=8)
    out, params = random_crop_flip(data, torch.arange(8), epoch=0, seed=3)
    rebuilt = to_float(apply_crop_flip(data, params["dx"], params["dy"], params["flip"], padding=4))
    assert torch.equal(out, rebuilt)
    # shift fully right by the padding: the left 4 columns come from zero padding
    ones = torch.full((1, 1, 6, 6), 9, dtype=torch.uint8)
    shifted = apply_crop_flip(ones, torch.tensor([0]), torch.tensor([4]), torch.tensor([False]), padding=4)
    assert shifted.dtype == torch.uint8
    assert torch.equal(shifted[0, 0, :, :4], torch.zeros(6, 4, dtype=torch.uint8))
    assert torch.equal(shifted[0, 0, :, 4:], torch.full((6, 2), 9, dtype=torch.uint8))
    centre = torch.full((8,), 4)
    identity = apply_crop_flip(data, centre, centre, torch.zeros(8, dtype=torch.bool))
    assert torch.equal(identity, data)


def test_param_distribution_roughly_uniform() -> None:
    params = crop_flip_params(torch.arange(90_000), epoch=0, seed=0, padding=4)
    for key in ("dx", "dy"):
        counts = torch.bincount(params[key], minlength=9).float()
        assert counts.numel() == 9
        assert float((counts - 10_000).abs().max()) < 500  # ~5 sigma for 10k expected per bin
    assert abs(float(params["flip"].float().mean()) - 0.5) < 0.01
    # dx and dy are not coupled: the joint histogram is also flat
    joint = torch.bincount(params["dx"] * 9 + params["dy"], minlength=81).float()
    assert float(joint.min()) > 900 and float(joint.max()) < 1330


def test_epochs_and_seeds_change_params() -> None:
    idx = torch.arange(2000)
    a = crop_flip_params(idx, epoch=0, seed=0)
    b = crop_flip_params(idx, epoch=1, seed=0)
    c = crop_flip_params(idx, epoch=0, seed=1)
    for other in (b, c):
        same = (a["dx"] == other["dx"]) & (a["dy"] == other["dy"]) & (a["flip"] == other["flip"])
        assert float(same.float().mean()) < 0.05  # chance agreement is 1/162
    again = crop_flip_params(idx, epoch=0, seed=0)
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_no_flip_and_no_padding_options() -> None:
    data = _images(n=10)
    out, params = random_crop_flip(data, torch.arange(10), epoch=0, seed=0, padding=0, flip=False)
    assert not params["flip"].any() and int(params["dx"].max()) == 0
    assert torch.equal(out, to_float(data))


def test_hash_same_on_python_ints_and_tensors_and_large_seed() -> None:
    vals = [0, 1, 12345, 2**32 - 1]
    t = _mix32(torch.tensor(vals, dtype=torch.int64))
    assert t.tolist() == [_mix32(v) for v in vals]
    h = hash_u32(torch.arange(1000), seed=2**40 + 5, epoch=2, stream=1)
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    assert not torch.equal(h, hash_u32(torch.arange(1000), seed=5, epoch=2, stream=1))


def test_to_float_and_normalize() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f.flatten(), torch.tensor([0.0, 1.0, 0.2]))
    assert to_float(f) is f
    n = normalize(f, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    assert torch.allclose(n.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    with pytest.raises(KdforgeError, match="channels"):
        normalize(f, (0.5,) * 2, (0.5,) * 2)
    with pytest.raises(KdforgeError, match="uint8 or floating"):
        to_float(torch.zeros(1, 1, 2, 2, dtype=torch.int32))


def test_crop_flip_class_and_errors() -> None:
    data = _images(n=4)
    aug = CropFlip(padding=2, seed=11)
    ref, _ = random_crop_flip(data, [0, 1, 2, 3], epoch=5, seed=11, padding=2)
    assert torch.equal(aug(data, [0, 1, 2, 3], 5), ref)
    assert int(aug.params(torch.arange(100), 0)["dx"].max()) <= 4
    with pytest.raises(KdforgeError, match="indices"):
        random_crop_flip(data, [0, 1], epoch=0, seed=0)
    with pytest.raises(KdforgeError, match="padding"):
        crop_flip_params([0], epoch=0, seed=0, padding=-1)


def test_to_normalized_is_the_fused_normalize() -> None:
    data = _images(n=6)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    expected = (data.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(to_normalized(data, mean, std), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(to_normalized(data.float() / 255.0, mean, std), expected, atol=1e-6, rtol=0)
    with pytest.raises(KdforgeError, match="3 channels but mean/std of length 2"):
        to_normalized(data, (0.5, 0.5), (0.2, 0.2))
