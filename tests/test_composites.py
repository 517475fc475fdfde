"""Harmonization composites (procedural + iHarmony4 loader) and the harmonization metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.dense.composites import draw_illuminant, load_iharmony4, procedural_composites, shift_foreground
from kdforge.tasks.dense.metrics import harmony_fmse, harmony_metrics, harmony_mse, harmony_psnr
from kdforge.tasks.dense.scenes import render


@pytest.fixture(scope="module")
def data():
    return procedural_composites(6, seed=3, size=32)


def test_composites_differ_only_inside_the_mask(data):
    assert data.real.shape == data.composite.shape == (6, 3, 32, 32) and data.mask.shape == (6, 1, 32, 32)
    assert data.real.dtype == data.composite.dtype == data.mask.dtype == torch.uint8
    assert set(data.mask.unique().tolist()) == {0, 1}
    changed = (data.real != data.composite).any(dim=1, keepdim=True)
    assert not (changed & (data.mask == 0)).any()                       # == outside the mask
    diff = (data.real.float() - data.composite.float()).abs().mean(dim=1, keepdim=True)
    for i in range(6):
        inside = data.mask[i].bool()
        assert diff[i][inside].mean() >= 3.0                            # != inside (a real shift)
        assert changed[i][inside].float().mean() > 0.5


def test_mask_is_one_rendered_instance_and_real_is_the_render(data):
    for i, scene in enumerate(data.scenes):
        maps = render(scene, 32)
        assert torch.equal(maps["image"], data.real[i])
        ids = maps["instance"][data.mask[i, 0].bool()].unique()
        assert ids.numel() == 1 and ids.item() > 0
        assert torch.equal(data.mask[i, 0].bool(), maps["instance"] == ids.item())


def test_composites_are_seeded(data):
    again = procedural_composites(6, seed=3, size=32)
    other = procedural_composites(6, seed=4, size=32)
    for field in ("real", "composite", "mask"):
        assert torch.equal(getattr(data, field), getattr(again, field))
    assert not torch.equal(data.composite, other.composite)
    with pytest.raises(KdforgeError, match="count >= 1"):
        procedural_composites(0, seed=0)


def test_shift_foreground_keeps_the_background_and_hue_keeps_grey():
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 3:6] = True
    out = shift_foreground(image, mask, seeded_generator(0), strength=1.0)
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    assert torch.equal(shift_foreground(image, torch.zeros(8, 8, dtype=torch.bool), seeded_generator(0)), image)


# ---------------------------------------------------------------- iHarmony4 loader


def _rgb(seed: int, w: int = 8, h: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _layout(root, w: int = 8, h: int = 6):
    for sub in ("composite_images", "masks", "real_images"):
        (root / sub).mkdir(parents=True)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[1:4, 2:6] = 255
    for img_id in ("a1", "a2"):
        Image.fromarray(_rgb(len(img_id) + int(img_id[1]), w, h)).save(root / "real_images" / f"{img_id}.jpg",
                                                                        quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{img_id}_1.png")
        for j in (1, 2):
            Image.fromarray(_rgb(10 * j + int(img_id[1]), w, h)).save(
                root / "composite_images" / f"{img_id}_1_{j}.jpg", quality=95)
    (root / f"{root.name}_test.txt").write_text("composite_images/a2_1_2.jpg\ncomposite_images/a1_1_1.jpg\n")
    return mask


def test_iharmony4_layout_loads(tmp_path):
    root = tmp_path / "HCOCO"
    mask = _layout(root)
    data = load_iharmony4(root)
    assert data.names == ["a1_1_1.jpg", "a1_1_2.jpg", "a2_1_1.jpg", "a2_1_2.jpg"]
    assert data.real.shape == data.composite.shape == (4, 3, 6, 8) and data.mask.shape == (4, 1, 6, 8)
    assert torch.equal(data.mask[3, 0], torch.from_numpy(mask // 255))
    real_a2 = np.array(Image.open(root / "real_images" / "a2.jpg").convert("RGB"))
    assert torch.equal(data.real[2], torch.from_numpy(real_a2).permute(2, 0, 1))
    assert torch.equal(data.real[2], data.real[3])
    comp = np.array(Image.open(root / "composite_images" / "a1_1_2.jpg").convert("RGB"))
    assert torch.equal(data.composite[1], torch.from_numpy(comp).permute(2, 0, 1))
    test = load_iharmony4(root, split="test", size=4)
    assert test.names == ["a2_1_2.jpg", "a1_1_1.jpg"] and test.real.shape == (2, 3, 4, 4)
    assert set(test.mask.unique().tolist()) <= {0, 1}


def _error(root, **kwargs) -> str:
    with pytest.raises(KdforgeError) as info:
        load_iharmony4(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_iharmony4_bad_layouts_fail_in_one_line(tmp_path):
    root = tmp_path / "HFlickr"
    _layout(root)
    (root / "masks" / "a2_1.png").unlink()
    assert "has no mask" in _error(root) and "a2_1.png" in _error(root)
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "masks" / "a2_1.png")
    (root / "real_images" / "a1.jpg").unlink()
    assert "has no real image" in _error(root)
    Image.fromarray(_rgb(0, 9, 6)).save(root / "real_images" / "a1.jpg")
    assert "9x6" in _error(root) and "8x6" in _error(root)
    Image.fromarray(_rgb(0)).save(root / "real_images" / "a1.jpg")
    grey = np.full((6, 8), 128, np.uint8)
    grey[0, 0] = 0
    Image.fromarray(grey).save(root / "masks" / "a1_1.png")
    assert "not binary" in _error(root)
    assert "split list" in _error(root, split="train")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "masks" / "a1_1.png")
    (root / "composite_images" / "bad.jpg").write_bytes(b"")
    assert "<id>_<k>_<j>" in _error(root)
    assert "folder" in _error(tmp_path / "missing")


def test_iharmony4_mixed_sizes_need_size(tmp_path):
    root = tmp_path / "HAdobe5k"
    _layout(root)
    Image.fromarray(_rgb(1, 10, 6)).save(root / "real_images" / "a9.jpg")
    Image.fromarray(np.zeros((6, 10), np.uint8)).save(root / "masks" / "a9_1.png")
    Image.fromarray(_rgb(2, 10, 6)).save(root / "composite_images" / "a9_1_1.jpg")
    assert "pass size" in _error(root)
    assert load_iharmony4(root, size=5).composite.shape == (5, 3, 5, 5)


# ---------------------------------------------------------------- metrics


def test_mse_hand_worked():
    target = torch.zeros(2, 3, 2, 2)
    pred = target.clone()
    pred[0, 1, 0, 0] = 4.0                       # image 0: 16 / 12
    pred[1] = 2.0                                # image 1: 4
    assert harmony_mse(pred, target) == pytest.approx((16 / 12 + 4) / 2)
    assert harmony_mse(target.to(torch.uint8), target.to(torch.uint8)) == 0.0


def test_psnr_is_the_mean_of_per_image_psnr():
    target = torch.zeros(2, 3, 4, 4)
    pred = torch.stack([torch.full((3, 4, 4), 25.5), torch.full((3, 4, 4), 2.55)])   # MSE 255^2/100, 255^2/1e4
    assert harmony_psnr(pred, target) == pytest.approx(30.0, abs=1e-6)             # (20 + 40) / 2 dB
    pooled = 10 * math.log10(255 ** 2 / ((650.25 + 6.5025) / 2))
    assert abs(harmony_psnr(pred, target) - pooled) > 5                             # not the pooled PSNR


def test_fmse_hand_worked_and_matches_the_iharmony_formula():
    target = torch.zeros(2, 3, 2, 2)
    pred = target.clone()
    pred[0, 0, 0, 0] = 3.0                       # pixel (0, 0): channel mean of squares 9 / 3 = 3
    pred[0, 2, 0, 1] = 6.0                       # pixel (0, 1): 36 / 3 = 12
    pred[0, :, 1, 1] = 100.0                     # outside the mask: ignored
    pred[1, :, 1, 0] = 1.0                       # image 1: 1
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, :] = 1
    mask[1, 0, 1, 0] = 1
    assert harmony_fmse(pred, target, mask) == pytest.approx(((3 + 12) / 2 + 1) / 2)
    # DoveNet / IntrinsicHarmony evaluation: mse_loss(fake * mask, real * mask) * w * h / fore_area, per image
    ref = [float(F.mse_loss(pred[i] * mask[i], target[i] * mask[i]) * 4 / mask[i].sum()) for i in range(2)]
    assert harmony_fmse(pred, target, mask[:, 0].to(torch.uint8)) == pytest.approx(sum(ref) / 2)
    scores = harmony_metrics(pred, target, mask)
    assert set(scores) == {"mse", "fmse", "psnr"} and scores["fmse"] == pytest.approx(4.25)
    with pytest.raises(KdforgeError, match="empty foreground"):
        harmony_fmse(pred, target, torch.zeros(2, 1, 2, 2))
    with pytest.raises(KdforgeError, match="0/1 mask"):
        harmony_fmse(pred, target, mask * 2)
    with pytest.raises(KdforgeError, match="one shape"):
        harmony_mse(pred, target[:1])


# --- scene illuminant option (illuminant > 0) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lit():
    return procedural_composites(6, seed=3, size=32, illuminant=1.0, strength=0.0)


def _ratio(lit_img: Tensor, base: Tensor, where: Tensor) -> Tensor:
    """Per-channel mean ratio lit / base over `where` pixels that are neither clipped nor dark."""
    out = []
    for c in range(3):
        ok = where & (lit_img[c] < 250) & (base[c] >= 40)
        assert ok.sum() >= 10
        out.append(lit_img[c][ok].double().mean() / base[c][ok].double().mean())
    return torch.stack(out)


def test_illuminant_background_carries_the_real_gain_and_foreground_another(lit):
    assert lit.illuminants is not None and lit.illuminants.shape == (6, 2, 3)
    for i, scene in enumerate(lit.scenes):
        base = render(scene, 32)["image"]                           # the scene under white light
        fg = lit.mask[i, 0].bool()
        g_real, g_fg = lit.illuminants[i]
        # the real image's background (and foreground) colour ratio to the white-light render is the drawn gain
        assert torch.allclose(_ratio(lit.real[i], base, ~fg), g_real.double(), rtol=0.02)
        assert torch.allclose(_ratio(lit.real[i], base, fg), g_real.double(), rtol=0.03)
        # the composite's foreground is the object under the other illuminant; outside it, composite == real
        assert torch.allclose(_ratio(lit.composite[i], base, fg), g_fg.double(), rtol=0.03)
        assert torch.equal(lit.composite[i][:, ~fg], lit.real[i][:, ~fg])
        assert (g_real - g_fg).abs().max() > 0.01
        diff = (lit.real[i].float() - lit.composite[i].float()).abs()[:, fg].mean()
        assert diff >= 3.0


def test_illuminant_gains_span_brightness_and_colour_temperature():
    g = seeded_generator(0)
    gains = torch.stack([draw_illuminant(g) for _ in range(400)])
    brightness = gains.prod(dim=1) ** (1 / 3)                    # exp(t) exp(-t) cancel: b exp(u / 3)
    assert brightness.min() < 0.8 and brightness.max() > 1.1
    warmth = 0.5 * torch.log(gains[:, 0] / gains[:, 2])          # t exactly
    assert warmth.min() > -0.25 - 1e-6 and warmth.max() < 0.25 + 1e-6 and warmth.std() > 0.1
    assert torch.allclose(draw_illuminant(seeded_generator(0), 0.0), torch.ones(3))


def test_illuminant_bias_and_shift_on_top():
    biased = procedural_composites(4, seed=5, size=32, illuminant=1.0, strength=0.0, bias=0.1)
    for i, scene in enumerate(biased.scenes):
        base = render(scene, 32)["image"].double() / 255
        fg = biased.mask[i, 0].bool()
        comp = biased.composite[i].double() / 255
        gain_fg = biased.illuminants[i, 1].double().view(3, 1, 1)
        offset = (comp - base * gain_fg)[:, fg]                    # one constant offset per channel (unclipped)
        ok = (comp[:, fg] > 0.02) & (comp[:, fg] < 0.98)
        for c in range(3):
            vals = offset[c][ok[c]]
            assert vals.abs().max() <= 0.1 + 1 / 255 and vals.max() - vals.min() <= 1.5 / 255
        assert torch.equal(biased.composite[i][:, ~fg], biased.real[i][:, ~fg])
    shifted = procedural_composites(4, seed=5, size=32, illuminant=1.0, strength=0.5)
    plain = procedural_composites(4, seed=5, size=32, illuminant=1.0, strength=0.0)
    # one shared generator: the first triplet is the same scene and illuminant; the shift re-lights its foreground
    assert torch.equal(shifted.real[0], plain.real[0]) and torch.equal(shifted.illuminants[0], plain.illuminants[0])
    assert not torch.equal(shifted.composite[0], plain.composite[0])
    again = procedural_composites(4, seed=5, size=32, illuminant=1.0, strength=0.5)
    assert torch.equal(shifted.composite, again.composite) and torch.equal(shifted.illuminants, again.illuminants)


def test_illuminant_off_is_the_first_setting_and_bad_arguments_fail():
    data = procedural_composites(3, seed=3, size=32)
    assert data.illuminants is None
    for i, scene in enumerate(data.scenes):
        assert torch.equal(data.real[i], render(scene, 32)["image"])    # no illuminant: the plain render
    for kwargs in ({"strength": 0.0}, {"bias": 0.1}, {"illuminant": -1.0}, {"illuminant": 1.0, "bias": -0.1}):
        with pytest.raises(KdforgeError, match="illuminant"):
            procedural_composites(2, seed=0, size=32, **kwargs)
