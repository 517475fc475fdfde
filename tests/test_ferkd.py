"""FerKD: region boxes/views, the region soft-label bank, label adaptation, SelfMix, the module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdforge.config import load_config
from kdforge.data.base import ImageTensors
from kdforge.data.transforms import hash_u32
from kdforge.distill.distiller import Batch
from kdforge.errors import KdforgeError
from kdforge.methods.ferkd import (
    FerKD,
    FerKDRecipe,
    RRCConfig,
    RRCTask,
    adapt_labels,
    crossmix_partner,
    cutmix_box,
    easy_region_mask,
    gt_confidence,
    hard_region_mask,
    selfmix,
    selfmix_partner,
    soft_cross_entropy,
    softened_onehot,
)
from kdforge.methods.ferkd_regions import (
    RegionBank,
    object_coverage,
    precompute_region_bank,
    recover_topk,
    region_soft_labels,
    region_views,
    rrc_boxes,
)
from kdforge.registry import METHODS
from kdforge.train.build import RunData
from kdforge.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------
# region boxes and views


def _scalar_rrc(key: int, seed: int, epoch: int, h: int, w: int, scale, ratio):
    """torchvision's RandomResizedCrop rule, one crop at a time with Python floats."""
    def u(stream: int) -> float:
        return int(hash_u32(torch.tensor([key]), seed, epoch, stream)[0]) / 2**32

    for attempt in range(10):
        b = 16 + 4 * attempt
        target = h * w * (scale[0] + (scale[1] - scale[0]) * u(b))
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u(b + 1))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return [math.floor(u(b + 2) * (h - ch + 1)), math.floor(u(b + 3) * (w - cw + 1)), ch, cw]
    return None


def test_rrc_boxes_follow_the_torchvision_rule_and_depend_only_on_the_key():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes, flips = rrc_boxes(torch.arange(12), epoch=3, seed=7, height=16, width=20, num_crops=3,
                             scale=scale, ratio=ratio)
    assert boxes.shape == (12, 3, 4) and flips.shape == (12, 3)
    for i in range(12):
        for j in range(3):
            expected = _scalar_rrc(i * 3 + j, 7, 3, 16, 20, scale, ratio)
            if expected is not None:
                assert boxes[i, j].tolist() == expected
    # a subset of images, in another order, gets the very same crops (no batch dependence)
    sub, sub_f = rrc_boxes(torch.tensor([9, 2]), epoch=3, seed=7, height=16, width=20, num_crops=3)
    assert torch.equal(sub, boxes[[9, 2]]) and torch.equal(sub_f, flips[[9, 2]])
    # another epoch or seed gives other crops
    assert not torch.equal(rrc_boxes(torch.arange(12), 4, 7, 16, 20, 3)[0], boxes)
    assert not torch.equal(rrc_boxes(torch.arange(12), 3, 8, 16, 20, 3)[0], boxes)


def test_rrc_boxes_stay_inside_the_image_with_the_requested_area():
    boxes, flips = rrc_boxes(torch.arange(4000), 0, 0, 16, 16, 1, scale=(0.25, 0.5))
    top, left, h, w = boxes[:, 0].unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 16).all() and (left + w <= 16).all())
    area = (h * w).float() / 256
    # rounding of the side lengths moves the area by at most about one pixel row/column
    assert float(area.min()) > 0.25 - 0.1 and float(area.max()) < 0.5 + 0.1
    assert 0.4 < float(flips.float().mean()) < 0.6


def test_rrc_fallback_is_a_centre_crop():
    # an aspect range that no box can satisfy inside a 4x16 image -> centre crop, ratio clamped
    boxes, _ = rrc_boxes(torch.arange(3), 0, 0, height=4, width=16, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert boxes[:, 0].tolist() == [[0, 6, 4, 4]] * 3


def test_region_views_match_interpolate_of_each_crop_and_flip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, 10, generator=gen)
    boxes, flips = rrc_boxes(torch.arange(5), 1, 2, 12, 10, num_crops=2)
    views = region_views(x, boxes, flips, size=8)
    assert views.shape == (10, 3, 8, 8)
    for i in range(5):
        for j in range(2):
            t, left, h, w = boxes[i, j].tolist()
            ref = F.interpolate(x[i:i + 1, :, t:t + h, left:left + w], size=(8, 8), mode="bilinear",
                                align_corners=False)
            if flips[i, j]:
                ref = ref.flip(-1)
            torch.testing.assert_close(views[i * 2 + j:i * 2 + j + 1], ref, atol=1e-5, rtol=1e-5)


def test_region_views_hand_case():
    # row [0, 1] of a 1x2 crop resized to width 4: sources -0.25->0, 0.25, 0.75, 1.25->1
    x = torch.tensor([[[[5.0, 0.0, 1.0, 7.0]]]])
    out = region_views(x, torch.tensor([[0, 1, 1, 2]]), torch.tensor([False]), size=(1, 4))
    assert out.flatten().tolist() == [0.0, 0.25, 0.75, 1.0]
    flipped = region_views(x, torch.tensor([[0, 1, 1, 2]]), torch.tensor([True]), size=(1, 4))
    assert flipped.flatten().tolist() == [1.0, 0.75, 0.25, 0.0]


def test_region_views_reject_boxes_outside_the_image():
    with pytest.raises(KdforgeError, match="outside"):
        region_views(torch.zeros(1, 1, 4, 4), torch.tensor([[2, 0, 3, 2]]))


# ---------------------------------------------------------------------------------------------
# the soft-label bank


def _teacher(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))


def _images(n: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8), torch.arange(n) % 3


def test_bank_labels_are_the_teacher_on_the_rebuilt_regions():
    teacher = _teacher()
    images, labels = _images()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    bank = precompute_region_bank(teacher, images, labels, 3, epochs=2, num_crops=3, seed=5, mean=mean,
                                  std=std, batch_size=4)
    assert bank.probs is not None and bank.probs.shape == (2, 6, 3, 3)
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for e in range(2):
        boxes, flips = rrc_boxes(torch.arange(6), e, 5, 8, 8, 3)
        assert torch.equal(bank.boxes[e].long(), boxes) and torch.equal(bank.flips[e], flips)
        # rebuild the views from the stored boxes alone and run the teacher again
        with torch.no_grad():
            again = F.softmax(teacher(region_views(x, bank.boxes[e], bank.flips[e])), dim=1)
        torch.testing.assert_close(bank.probs[e].reshape(-1, 3), again, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bank.confidence[e], again.reshape(6, 3, 3)[torch.arange(6), :, labels])
    # region_soft_labels is the same computation
    torch.testing.assert_close(region_soft_labels(teacher, x, bank.boxes[0], bank.flips[0]),
                               bank.probs[0].reshape(-1, 3), atol=1e-5, rtol=1e-5)


def test_bank_save_load_roundtrip_and_mismatch(tmp_path):
    images, labels = _images()
    bank = precompute_region_bank(_teacher(), images, labels, 3, epochs=1, num_crops=2)
    bank.save(tmp_path / "b.pt")
    again = RegionBank.load(tmp_path / "b.pt")
    assert torch.equal(again.boxes, bank.boxes) and torch.equal(again.probs, bank.probs)
    assert again.size == (8, 8) and again.slot(5) == 0
    again.check_matches(labels)
    with pytest.raises(KdforgeError, match="region bank"):
        again.check_matches(labels.flip(0))


def test_recover_topk_spreads_the_leftover_mass_evenly():
    values = torch.tensor([[0.5, 0.3]])
    indices = torch.tensor([[3, 0]])
    out = recover_topk(values, indices, 5)
    rest = 0.2 / 3
    torch.testing.assert_close(out, torch.tensor([[0.3, rest, rest, 0.5, rest]]))


def test_topk_bank_recovers_the_quantised_labels():
    images, labels = _images()
    bank = precompute_region_bank(_teacher(), images, labels, 3, epochs=1, num_crops=2, topk=1)
    full = precompute_region_bank(_teacher(), images, labels, 3, epochs=1, num_crops=2)
    soft = bank.soft_labels(0, torch.arange(6))
    top = full.probs[0].max(-1)
    torch.testing.assert_close(soft.max(-1).values, top.values)
    torch.testing.assert_close(soft.sum(-1), torch.ones(6, 2))
    torch.testing.assert_close(bank.confidence, full.confidence)     # ranking uses the exact value


# ---------------------------------------------------------------------------------------------
# label adaptation


def test_hard_region_mask_ranks_within_each_image():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.3],
                         [0.02, 0.6, 0.7, 0.8]])
    # rho_h = 0.5 -> the 2 least-confident crops of *each* image
    assert hard_region_mask(conf, rho_h=0.5).tolist() == [[False, True, False, True],
                                                           [True, True, False, False]]
    # absolute threshold
    assert hard_region_mask(conf, tau_h=0.2).tolist() == [[False, True, False, False],
                                                          [True, False, False, False]]
    # both: in the hardest half of its image and below 0.4
    assert hard_region_mask(conf, rho_h=0.5, tau_h=0.4).tolist() == [[False, True, False, True],
                                                                     [True, False, False, False]]
    # floor(0.3 * 4) = 1 crop; ties go to the earlier crop
    assert hard_region_mask(torch.tensor([[0.2, 0.1, 0.1, 0.5]]), rho_h=0.3).tolist() == [
        [False, True, False, False]]
    assert easy_region_mask(conf, 0.25).tolist() == [[True, False, False, False],
                                                     [False, False, False, True]]
    with pytest.raises(KdforgeError):
        hard_region_mask(conf)


def test_softened_onehot_and_adaptation_hand_case():
    torch.testing.assert_close(softened_onehot(torch.tensor([2]), 4, 0.2),
                               torch.tensor([[0.05, 0.05, 0.85, 0.05]]))
    soft = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]])       # one image, two crops, K = 3
    labels = torch.tensor([[0, 0]])
    hard = torch.tensor([[False, True]])
    out = adapt_labels(soft, labels, hard, eps=0.3)
    torch.testing.assert_close(out, torch.tensor([[[0.7, 0.2, 0.1], [0.8, 0.1, 0.1]]]))
    torch.testing.assert_close(gt_confidence(soft, torch.tensor([2])), torch.tensor([[0.1, 0.8]]))


# ---------------------------------------------------------------------------------------------
# SelfMix and the loss


def test_selfmix_partner_stays_within_the_image_and_never_itself():
    idx = torch.tensor([4, 11, 2, 7, 30])
    partner = selfmix_partner(idx, 4, epoch=0, seed=3)
    rows = torch.arange(20)
    assert torch.equal(partner // 4, rows // 4)      # same image
    assert bool((partner != rows).all())             # never the crop itself
    # two crops: always the other one
    assert selfmix_partner(torch.tensor([0, 9]), 2, 0, 0).tolist() == [1, 0, 3, 2]
    with pytest.raises(KdforgeError):
        selfmix_partner(idx, 1, 0, 0)


def test_selfmix_mixup_hand_case():
    views = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])   # (2, 1, 2, 2)
    targets = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    weights = torch.tensor([1.0, 0.0])
    x, t, w, lam = selfmix(views, targets, torch.tensor([1, 0]), 0.25, "mixup", weights=weights)
    assert lam == 0.25
    torch.testing.assert_close(x[0], torch.full((1, 2, 2), 0.25 * 1 + 0.75 * 5))
    torch.testing.assert_close(x[1], torch.full((1, 2, 2), 0.25 * 5 + 0.75 * 1))
    torch.testing.assert_close(t, torch.tensor([[0.4, 0.6], [0.8, 0.2]]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))


def test_selfmix_cutmix_hand_case():
    views = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x, t, _, lam = selfmix(views, targets, torch.tensor([1, 0]), 0.9, "cutmix", box=(0, 2, 1, 4))
    # a 2x3 box of 16 pixels is pasted: kept fraction 10/16
    assert lam == pytest.approx(10 / 16)
    expected0 = torch.zeros(1, 4, 4)
    expected0[:, 0:2, 1:4] = 1.0
    torch.testing.assert_close(x[0], expected0)
    torch.testing.assert_close(x[1], 1.0 - expected0)
    torch.testing.assert_close(t, torch.tensor([[10 / 16, 6 / 16], [6 / 16, 10 / 16]]))


def test_cutmix_box_area():
    import random

    y0, y1, x0, x1 = cutmix_box(0.75, 8, 8, random.Random(0))
    assert 0 <= y0 <= y1 <= 8 and 0 <= x0 <= x1 <= 8
    assert (y1 - y0) <= 4 and (x1 - x0) <= 4       # side sqrt(0.25) * 8 = 4 before clipping


def test_soft_cross_entropy_hand_case():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # row 0: p = (1/4, 3/4); row 1: p = (1/2, 1/2)
    l0 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    l1 = math.log(2.0)
    assert float(soft_cross_entropy(logits, target)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert float(soft_cross_entropy(logits, target, weights=torch.tensor([1.0, 0.0]))) == pytest.approx(
        l0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the training module


def _data(n: int = 6) -> RunData:
    images, labels = _images(n)
    split = ImageTensors(images, labels, 3, "toy", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return RunData(split, split, split, "test")


def _student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_ferkd_forward_uses_adapted_stored_labels():
    data = _data()
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=2, num_crops=2,
                                  mean=data.train.mean, std=data.train.std)
    module = FerKD(_student(), bank, rho_h=0.5, eps=0.3, selfmix=False)
    module.setup(torch.zeros(2, 3, 8, 8), 6)
    # per image, the 2 least-confident of its 4 stored crops (2 epochs x 2 crops) are relabelled
    conf = bank.confidence.permute(1, 0, 2).reshape(6, 4)
    flat = torch.zeros(6, 4, dtype=torch.bool)
    for i in range(6):
        for j in sorted(range(4), key=lambda j: (float(conf[i, j]), j))[:2]:
            flat[i, j] = True
    expected_hard = flat.reshape(6, 2, 2).permute(1, 0, 2)
    assert torch.equal(module.hard, expected_hard)
    assert module.relabel_stats()["relabelled_fraction"] == pytest.approx(0.5)

    idx = torch.tensor([4, 1, 3])
    x = (data.train.images[idx].float() / 255 - 0.5) / 0.25
    batch = Batch(images=x, target=data.train.labels[idx], index=idx, epoch=3, step=0)
    step = module(batch)
    # independent computation: bank epoch 3 % 2 = 1, rebuild the crops, adapt by hand
    views = region_views(x, bank.boxes[1, idx], bank.flips[1, idx])
    soft = bank.probs[1, idx].clone()
    for r, i in enumerate(idx.tolist()):
        for j in range(2):
            if expected_hard[1, i, j]:
                soft[r, j] = 0.1
                soft[r, j, int(data.train.labels[i])] = 0.7 + 0.1
    logits = module.student(views)
    ref = -(soft.reshape(-1, 3) * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(step.losses["ferkd"], ref)
    assert step.outputs.shape == (3, 3)
    torch.testing.assert_close(step.outputs, logits.detach().reshape(3, 2, 3).mean(1))


def test_ferkd_selfmix_step_is_deterministic_and_differs_from_plain():
    data = _data()
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=1, num_crops=2,
                                  mean=data.train.mean, std=data.train.std)
    idx = torch.arange(6)
    x = (data.train.images.float() / 255 - 0.5) / 0.25
    batch = Batch(images=x, target=data.train.labels, index=idx, epoch=0, step=3)
    losses = []
    for mix in (True, True, False):
        m = FerKD(_student(), bank, rho_h=0.5, selfmix=mix, mix="mixup")
        m.setup(x[:2], 6)
        losses.append(float(m(batch).losses["ferkd"].detach()))
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_build_module_rejects_bad_setups(tmp_path):
    data = _data()
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=1, num_crops=2)
    bank.save(tmp_path / "bank.pt")
    off = ["data.augment.crop_padding=0", "data.augment.flip=false", "method.name=ferkd"]

    def build(overrides, **kw):
        return FerKD.build_module(cfg=load_config(overrides=overrides), student=_student(), teachers={},
                                  terms=[], data=data, **kw)

    with pytest.raises(KdforgeError, match="crop_padding=0"):
        build(["method.name=ferkd"], bank=str(tmp_path / "bank.pt"))
    with pytest.raises(KdforgeError, match="remove `terms`"):
        build([*off, "terms=[{loss: ce, teacher: null, group: task}]"], bank=str(tmp_path / "bank.pt"))
    with pytest.raises(KdforgeError, match="needs `teacher`"):
        build(off)
    with pytest.raises(KdforgeError, match="unexpected keyword"):
        build(off, bank=str(tmp_path / "bank.pt"), rho=0.3)
    other = _data(7)
    with pytest.raises(KdforgeError, match="region bank was built"):
        FerKD.build_module(cfg=load_config(overrides=off), student=_student(), teachers={}, terms=[],
                           data=other, bank=str(tmp_path / "bank.pt"))
    module = build(off, bank=str(tmp_path / "bank.pt"), rho_h=0.5)
    assert isinstance(module, FerKD) and module.bank.num_crops == 2
    assert METHODS.get("ferkd") is FerKD


def test_trainer_runs_ferkd_without_any_teacher_forward(tmp_path):
    data = _data(8)
    teacher = _teacher()
    bank = precompute_region_bank(teacher, data.train.images, data.train.labels, 3, epochs=2, num_crops=2,
                                  mean=data.train.mean, std=data.train.std)
    bank.save(tmp_path / "bank.pt")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    cfg = load_config(overrides=[
        "student.name=convnet", "data.batch_size=4", "data.augment.crop_padding=0", "data.augment.flip=false",
        "trainer.epochs=2", "trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false",
        "method.name=ferkd", f"method.args.bank={tmp_path / 'bank.pt'}", "method.args.rho_h=0.25"])
    trainer = Trainer(cfg, tmp_path / "run", data=data, quiet=True)
    assert isinstance(trainer.distiller, FerKD)
    before = {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}
    result = trainer.fit()
    assert calls == []                                   # no teacher pass during training
    assert result["steps"] == 4
    after = trainer.distiller.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(k.startswith("bank") for k in trainer.distiller.checkpoint_state())


def test_ferkd_run_resumes_exactly(tmp_path):
    data = _data(8)
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=2, num_crops=2,
                                  mean=data.train.mean, std=data.train.std)
    bank.save(tmp_path / "bank.pt")
    base = ["student.name=convnet", "data.batch_size=4", "data.augment.crop_padding=0", "data.augment.flip=false",
            "trainer.epochs=2", "trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false",
            "method.name=ferkd", f"method.args.bank={tmp_path / 'bank.pt'}", "method.args.rho_h=0.25",
            "method.args.mix=switch"]
    full = Trainer(load_config(overrides=base), tmp_path / "full", data=data, quiet=True)
    full.fit()
    part = Trainer(load_config(overrides=[*base, "trainer.stop_after_steps=3"]), tmp_path / "part", data=data,
                   quiet=True)
    assert part.fit() == {"stopped_at_step": 3}
    resumed = Trainer(load_config(overrides=base), tmp_path / "part", resume=True, data=data, quiet=True)
    resumed.fit()
    a, b = full.distiller.student.state_dict(), resumed.distiller.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ferkd_forward_relabels_before_selfmix():
    data = _data()
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=1, num_crops=3,
                                  mean=data.train.mean, std=data.train.std)
    module = FerKD(_student(), bank, rho_h=0.34, eps=0.2, selfmix=True, mix="cutmix", seed=4)
    module.setup(torch.zeros(2, 3, 8, 8), 6)
    idx = torch.tensor([5, 0, 2])
    x = (data.train.images[idx].float() / 255 - 0.5) / 0.25
    step = module(Batch(images=x, target=data.train.labels[idx], index=idx, epoch=0, step=7))
    # by hand: relabel the least-confident of each image's 3 crops, then paste the partner's box
    views = region_views(x, bank.boxes[0, idx], bank.flips[0, idx])
    soft = bank.probs[0, idx].clone()
    for r, i in enumerate(idx.tolist()):
        j = int(bank.confidence[0, i].argmin())
        soft[r, j] = 0.2 / 3
        soft[r, j, int(data.train.labels[i])] += 0.8
    soft = soft.reshape(9, 3)
    partner = selfmix_partner(idx, 3, 0, 4)
    _, lam, (y0, y1, x0, x1) = module._mix_params(0, 7, 8, 8)
    mixed = views.clone()
    mixed[:, :, y0:y1, x0:x1] = views[partner][:, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / 64
    target = kept * soft + (1 - kept) * soft[partner]
    ref = -(target * F.log_softmax(module.student(mixed), 1)).sum(1).mean()
    torch.testing.assert_close(step.losses["ferkd"], ref)


# ---------------------------------------------------------------------------------------------
# issue 11: a fair demo (RandomResizedCrop teacher, object masks, FKD + cross-image CutMix arm)


def test_crossmix_partner_is_a_seeded_permutation_across_images():
    p = crossmix_partner(24, epoch=2, step=5, seed=3)
    assert sorted(p.tolist()) == list(range(24))
    assert torch.equal(p, crossmix_partner(24, 2, 5, 3))                  # resumes mix the same pairs
    assert not torch.equal(p, crossmix_partner(24, 2, 6, 3))
    image = torch.arange(24) // 4                                          # 6 images x 4 crops
    assert float((image[p] != image).float().mean()) > 0.5                 # mostly other images


def test_ferkd_crossmix_step_mixes_crops_of_other_images_like_fkd():
    data = _data()
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=1, num_crops=2,
                                  mean=data.train.mean, std=data.train.std)
    with pytest.raises(KdforgeError, match="exclude each other"):
        FerKD(_student(), bank, selfmix=True, crossmix=True)
    module = FerKD(_student(), bank, adapt=False, selfmix=False, crossmix=True, mix="cutmix", seed=2)
    module.setup(torch.zeros(2, 3, 8, 8), 6)
    idx = torch.tensor([5, 0, 2])
    x = (data.train.images[idx].float() / 255 - 0.5) / 0.25
    step = module(Batch(images=x, target=data.train.labels[idx], index=idx, epoch=1, step=4))
    views = region_views(x, bank.boxes[0, idx], bank.flips[0, idx])
    soft = bank.probs[0, idx].reshape(6, 3)                                # raw FKD labels (adapt off)
    partner = crossmix_partner(6, 1, 4, 2)
    _, lam, (y0, y1, x0, x1) = module._mix_params(1, 4, 8, 8)
    mixed = views.clone()
    mixed[:, :, y0:y1, x0:x1] = views[partner][:, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / 64
    target = kept * soft + (1 - kept) * soft[partner]
    ref = -(target * F.log_softmax(module.student(mixed), 1)).sum(1).mean()
    torch.testing.assert_close(step.losses["ferkd"], ref)


def test_object_coverage_counts_object_pixels_inside_each_region():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 9, 7, generator=gen) < 0.3
    masks[2] = False                                                       # no object: coverage 0
    boxes, _ = rrc_boxes(torch.arange(3), 0, 1, 9, 7, num_crops=5)
    cov = object_coverage(masks, boxes)
    assert cov.shape == (3, 5)
    for i in range(2):
        for j in range(5):
            t, left, h, w = boxes[i, j].tolist()
            expected = masks[i, t:t + h, left:left + w].sum() / masks[i].sum()
            assert float(cov[i, j]) == pytest.approx(float(expected))
    assert torch.equal(cov[2], torch.zeros(5))
    full = torch.tensor([[[0, 0, 9, 7]]]).expand(3, 1, 4)
    assert torch.allclose(object_coverage(masks, full)[:2], torch.ones(2, 1))


def test_region_stats_measure_the_mining_rule_also_for_plain_fkd():
    data = _data()
    bank = precompute_region_bank(_teacher(), data.train.images, data.train.labels, 3, epochs=2, num_crops=2,
                                  mean=data.train.mean, std=data.train.std)
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    fkd = FerKD(_student(), bank, adapt=False, rho_h=0.5, selfmix=False)
    stats = fkd.region_stats(masks)
    assert fkd.relabel_stats()["relabelled_fraction"] == 0.0
    assert stats["mined_fraction"] == pytest.approx(0.5)                   # what FerKD would relabel
    conf = bank.confidence
    mined = FerKD(_student(), bank, rho_h=0.5, selfmix=False).hard
    assert stats["mined_mean_conf"] == pytest.approx(float(conf[mined].mean()))
    right = (bank.probs.argmax(-1) == bank.labels[None, :, None]).float()
    assert stats["teacher_region_top1"] == pytest.approx(100 * float(right.mean()))
    cov = object_coverage(masks, bank.boxes.permute(1, 0, 2, 3)).permute(1, 0, 2)
    assert stats["mined_object_coverage"] == pytest.approx(float(cov[mined].mean()))
    assert stats["miss_fraction"] == pytest.approx(float((cov < 0.25).float().mean()))


def test_teacher_is_trained_on_random_resized_crop_views():
    """The old demo's teacher saw only pad-crop/flip views of whole images (issue 11)."""
    data = _data(8)
    cfg = load_config(overrides=["student.name=convnet", "data.batch_size=4", "data.augment.crop_padding=0",
                                 "data.augment.flip=false", "trainer.device=cpu"])
    task = RRCTask(cfg, data, RRCConfig(scale=[0.08, 1.0]), rrc_seed=5)
    task.build(torch.device("cpu"), __import__("kdforge.train.distributed", fromlist=["DistEnv"]).DistEnv())
    idx = torch.tensor([6, 1, 3])
    batch = task.make_batch(idx, epoch=2, step=0)
    x = task.prepare(data.train.images[idx])
    boxes, flips = rrc_boxes(idx, 2, 5, 8, 8, 1, (0.08, 1.0), (3 / 4, 4 / 3), True)
    torch.testing.assert_close(batch.images, region_views(x, boxes, flips, (8, 8)))
    assert (boxes[:, 0, 2] * boxes[:, 0, 3] < 64).any()                   # real crops, not whole images


def _tiny_recipe(tmp_path: Path) -> dict:
    return {"method": "ferkd", "seed": 1,
            "data": {"name": "objects_clutter", "args": {"num_train": 48, "num_test": 16, "num_classes": 4,
                                                         "image_size": 12},
                     "root": str(tmp_path / "cache"), "val_fraction": 0.25},
            "teacher": {"model": {"name": "convnet", "args": {"width": 4, "depth": 2}},
                        "loop": {"epochs": 1, "batch_size": 12}},
            "student": {"name": "convnet", "args": {"width": 4, "depth": 2}},
            "bank": {"epochs": 3, "num_crops": 2},
            "train": {"epochs": 1, "batch_size": 6},
            "trainer": {"progress": False, "threads": 1}}


def test_task_recipe_trains_an_rrc_teacher_builds_one_bank_and_shares_it(tmp_path):
    from kdforge.train.stages import run_recipe

    tree = _tiny_recipe(tmp_path)
    res = run_recipe(tree, out=tmp_path / "run")
    teacher = tmp_path / "run" / "stages" / "teacher"
    assert (teacher / "result.json").is_file() and "test_region_top1" in json.loads(
        (teacher / "result.json").read_text())
    banks = list((teacher / "banks").glob("bank-*.pt"))
    assert len(banks) == 1 and res["bank_time_s"] > 0
    for key in ("test_top1", "teacher_region_top1", "mined_fraction", "mined_miss_fraction", "kept_miss_fraction",
                "relabelled_fraction"):
        assert key in res
    assert res["relabelled_fraction"] == pytest.approx(1 / 6) == res["mined_fraction"]   # 1 of 6 regions
    # another arm of the experiment: a given teacher, plain FKD; the bank is reused, not rebuilt
    fkd = run_recipe(tree, [f"teacher.run={teacher}", "ferkd.adapt=false", "ferkd.selfmix=false",
                            "ferkd.crossmix=true"], out=tmp_path / "fkd")
    assert fkd["bank_time_s"] == 0.0 and fkd["relabelled_fraction"] == 0.0
    assert fkd["mined_fraction"] == res["mined_fraction"]                 # same bank, same mining statistics
    assert not (tmp_path / "fkd" / "stages" / "teacher").exists()
    # a teacher trained for other data or with other settings is refused in one line
    from kdforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"other settings \(data.args.image_size\)"):
        run_recipe(tree, [f"teacher.run={teacher}", "data.args.image_size=14"], out=tmp_path / "other")
    # only the teacher: its run is the recipe's run directory (an experiment's shared stage)
    only = run_recipe(tree, ["final_stage=teacher"], out=tmp_path / "teacher_only")
    assert "test_region_top1" in only and (tmp_path / "teacher_only" / "checkpoints" / "last.safetensors").is_file()


def test_shipped_recipe_validates_and_bad_recipes_fail_in_one_line(tmp_path):
    from kdforge.config import load_yaml
    from kdforge.errors import ConfigError
    from kdforge.tasks.common import load_task_config
    from kdforge.train.stages import run_recipe

    root = Path(__file__).resolve().parent.parent
    tree = load_yaml(root / "configs" / "methods" / "ferkd.yaml")
    tree.pop("trainer")
    cfg = load_task_config(FerKDRecipe, tree, name="ferkd.yaml")
    cfg.check("ferkd.yaml")
    assert cfg.data.name == "objects_clutter" and cfg.teacher.rrc is not None
    with pytest.raises(ConfigError, match="final_stage"):
        run_recipe(_tiny_recipe(tmp_path), ["final_stage=bank"], out=tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown key 'ferkd.rho'"):
        run_recipe(_tiny_recipe(tmp_path), ["ferkd.rho=0.3"], out=tmp_path / "b")
    with pytest.raises(KdforgeError, match="does not exist"):
        run_recipe(_tiny_recipe(tmp_path), [f"teacher.run={tmp_path / 'nope'}"], out=tmp_path / "c")
