"""SSD-Det: bag sampler, box coder, MIL scores, merge and SISD target against hand / plain-loop
computations; refined boxes are targets only (no gradient); clean boxes never reach a loss; the recipe."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

import kdforge.methods.ssd_det as ssd_mod
from kdforge.cli import main
from kdforge.losses.ssd_det import (
    decode_deltas,
    encode_deltas,
    image_iof,
    merge_topk,
    mil_bag_scores,
    mil_bce_loss,
    mil_gfocal_loss,
    minmax,
    neighbourhood_bags,
    sisd_target,
    spsd_l1,
)
from kdforge.tasks.detection.coco import CocoData
from kdforge.tasks.detection.task import DetectionData

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/ssd_det.yaml"
TINY = ["data.num_train=24", "data.num_test=8", "data.size=32", "data.max_objects=2", "train.epochs=1",
        "train.batch_size=8", "model.backbone_args={width: 4}", "model.width=8", "ssd.fc_dim=16", "ssd.num_neg=8",
        "trainer.threads=1"]
SCALES = (1.0, 1.2, 1.3, 0.8, 0.7)


def _loop_bag(box: list[float], h: float, w: float) -> list[tuple[list[float], bool]]:
    """The neighbourhood bag of one box written as plain loops (scale w, scale h, then the 5 shifts)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    out = []
    for sw in SCALES:
        for sh in SCALES:
            bw, bh = (x2 - x1) * sw, (y2 - y1) * sh
            for dx, dy in ((0, 0), (-0.2 * bw, 0), (0.2 * bw, 0), (0, -0.2 * bh), (0, 0.2 * bh)):
                p = [cx + dx - bw / 2, cy + dy - bh / 2, cx + dx + bw / 2, cy + dy + bh / 2]
                iw = max(0.0, min(p[2], w) - max(p[0], 0.0))
                ih = max(0.0, min(p[3], h) - max(p[1], 0.0))
                out.append((p, iw * ih / (bw * bh) > 0.7))
    return out


def test_neighbourhood_bag_counts_hand_box_and_validity() -> None:
    boxes = torch.tensor([[10.0, 10.0, 20.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    bags, valid = neighbourhood_bags(boxes, 48, 48)
    assert bags.shape == (2, 125, 4) and valid.shape == (2, 125)
    assert bags[0, 0].tolist() == pytest.approx([10, 10, 20, 30])           # scale 1 x 1, no shift
    # scale w 1.2, h 0.8 (index 1 * 5 + 3), shifted left by 0.2 * 12: centre (12.6, 20), size 12 x 16
    assert bags[0, (1 * 5 + 3) * 5 + 1].tolist() == pytest.approx([6.6, 12.0, 18.6, 28.0])
    for g in range(2):
        ref = _loop_bag(boxes[g].tolist(), 48, 48)
        assert torch.allclose(bags[g], torch.tensor([p for p, _ in ref]), atol=1e-5)
        assert valid[g].tolist() == [v for _, v in ref]
    assert bool(valid[0].all()) and not bool(valid[1].all())                  # the corner box loses some
    # hand case: w x1.3, h x1.3, shifted left: (-4.1, -1.5, 8.9, 11.5), IoF = 8.9 * 11.5 / 169 = 0.606
    k = (2 * 5 + 2) * 5 + 1
    assert bags[1, k].tolist() == pytest.approx([-4.1, -1.5, 8.9, 11.5])
    assert image_iof(bags[1, k], 48, 48).item() == pytest.approx(8.9 * 11.5 / 169, rel=1e-5) and not valid[1, k]


def test_box_coder_hand_values_and_round_trip() -> None:
    p = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    t = torch.tensor([[1.0, 2.0, 11.0, 22.0]])
    d = encode_deltas(p, t)
    assert d[0].tolist() == pytest.approx([1.0, 7.0, 0.0, math.log(2) / 0.2], rel=1e-5)
    assert torch.allclose(decode_deltas(p, d), t, atol=1e-5)
    assert decode_deltas(p, d, size=(20, 48))[0].tolist() == pytest.approx([1.0, 2.0, 11.0, 20.0])


def test_merge_topk_against_hand_computation() -> None:
    boxes = torch.tensor([[[0.0, 0, 10, 10], [2, 2, 12, 12], [4, 0, 14, 10], [40, 40, 50, 50]]])
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.0]])
    w = [0.5 / 0.8 + 1e-8, 0.3 / 0.8 + 1e-8]                                # top-2: proposals 1 and 2
    expected = [w[0] * a + w[1] * b for a, b in zip([2, 2, 12, 12], [4, 0, 14, 10])]
    assert merge_topk(boxes, scores, 2)[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert merge_topk(boxes, scores, 2, size=(8, 48))[0].tolist() == pytest.approx(
        [expected[0], expected[1], expected[2], 8.0], rel=1e-6)            # clamped to the image
    zero = merge_topk(boxes, torch.zeros(1, 4), 2)                          # no evidence: uniform weights
    assert torch.isfinite(zero).all()
    s = scores.clone().requires_grad_(True)
    assert not merge_topk(boxes, s, 2).requires_grad                         # a target: no gradient


def test_mil_bag_scores_match_a_plain_loop_and_mask_invalid_proposals() -> None:
    torch.manual_seed(0)
    g, p, c = 2, 6, 3
    cls, ins = torch.randn(g, p, c), torch.randn(g, p, c)
    valid = torch.tensor([[True, True, False, True, True, True], [True, False, False, True, True, False]])
    cls_p, ins_p, bag = mil_bag_scores(cls, ins, valid, "softmax")
    for i in range(g):
        keep = [j for j in range(p) if valid[i, j]]
        for k in range(c):
            den = sum(math.exp(ins[i, j, k]) for j in keep)
            total = 0.0
            for j in keep:
                sc = math.exp(cls[i, j, k]) / sum(math.exp(cls[i, j, m]) for m in range(c))
                total += sc * math.exp(ins[i, j, k]) / den
            assert bag[i, k].item() == pytest.approx(total, rel=1e-5)
    assert torch.allclose(ins_p.sum(1), torch.ones(g, c))                     # re-normalised over valid
    assert (cls_p[~valid] == 0).all() and (ins_p[~valid] == 0).all()
    # invalid proposals' logits change nothing
    cls2, ins2 = cls.clone(), ins.clone()
    cls2[~valid], ins2[~valid] = 50.0, 50.0
    assert torch.allclose(mil_bag_scores(cls2, ins2, valid, "softmax")[2], bag)
    _, _, bag_s = mil_bag_scores(cls, ins, valid, "sigmoid")
    ins_soft = torch.where(valid[..., None], ins, torch.full_like(ins, -math.inf)).softmax(1)
    assert torch.allclose(bag_s, (cls.sigmoid() * ins_soft).sum(1), atol=1e-6)


def test_mil_losses_hand_values() -> None:
    bag = torch.tensor([[0.7, 0.2, 0.1]])
    label, valid = torch.tensor([0]), torch.ones(1, 4, dtype=torch.bool)
    bce = -(math.log(0.7) + math.log(0.8) + math.log(0.9))
    assert mil_bce_loss(bag, label, valid).item() == pytest.approx(bce, rel=1e-5)
    gf = -(0.09 * math.log(0.7 + 1e-6) + 0.04 * math.log(0.8 + 1e-6) + 0.01 * math.log(0.9 + 1e-6))
    assert mil_gfocal_loss(bag, label, valid, torch.tensor([0.5])).item() == pytest.approx(0.5 * gf, rel=1e-5)
    # an object without any valid proposal is not counted
    two = torch.cat([bag, bag])
    mask = torch.tensor([[True] * 4, [False] * 4])
    assert mil_bce_loss(two, torch.tensor([0, 0]), mask).item() == pytest.approx(bce, rel=1e-5)


def test_sisd_target_spsd_l1_and_minmax() -> None:
    bags = torch.tensor([[[0.0, 0, 10, 10], [5, 0, 15, 10]], [[0.0, 0, 4, 4], [0, 0, 2, 2]]])
    ref = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 4, 4]])
    # IoUs: 1, 50/150 = 1/3 | 1, 4/16 = 1/4  -> (IoU - 0.5) / 0.5
    assert sisd_target(bags, ref).flatten().tolist() == pytest.approx([1.0, -1 / 3, 1.0, -0.5])
    valid = torch.tensor([[True, True], [True, False]])
    pred, tgt = torch.ones(2, 2, 4), torch.zeros(2, 2, 4)
    assert spsd_l1(pred, tgt, valid).item() == pytest.approx(1.0)
    assert spsd_l1(pred, tgt, valid, torch.tensor([0.5, 1.0])).item() == pytest.approx((0.5 * 2 + 1) / 3)
    assert minmax(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[True, True, False]])).tolist() == [[0.0, 1.0, 0.0]]


def _module_and_batch(refiner: str = "ssd"):
    from kdforge.config import from_dict
    from kdforge.methods.detector import make_detector
    from kdforge.methods.ssd_det import SSDDetModule, SSDDetRecipe, SSDDetTask, build_noisy_detection
    from kdforge.train.distributed import DistEnv

    cfg = from_dict(SSDDetRecipe, {"data": {"num_train": 8, "num_test": 4, "size": 32, "max_objects": 2},
                                   "model": {"backbone_args": {"width": 4}, "width": 8},
                                   "ssd": {"refiner": refiner, "fc_dim": 16, "num_neg": 4}}, "test")
    noisy, clean, test = build_noisy_detection(cfg)
    torch.manual_seed(0)
    det = make_detector(cfg.model, cfg.data.num_classes, cfg.data.size)
    module = SSDDetModule(det, cfg.data.num_classes, cfg.data.size, cfg.ssd)
    task = SSDDetTask(det, noisy, test, 4, 0, module=module, clean=clean)
    module = task.build(torch.device("cpu"), DistEnv())
    return module, task.batch(0, 0, DistEnv())


def test_refined_boxes_are_detached_targets_and_only_refiner_losses_train_the_refiner() -> None:
    module, batch = _module_and_batch("ssd")
    step = module(batch)
    assert {"spsd1", "mil1", "spsd2", "mil2", "neg", "sisd"} <= set(step.losses)
    assert {"cls", "box", "ctr"} <= set(step.losses)
    module.student(batch.images)
    targets, _ = module.refine(batch.boxes, batch.labels)
    assert all(not t.requires_grad for t in targets)
    # the detector's loss on the refined boxes sends no gradient into the refiner heads
    det = sum(step.losses[k] for k in ("cls", "box", "ctr"))
    det.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in module.refiner.parameters())
    module.zero_grad(set_to_none=True)
    step.losses["sisd"].backward()
    assert module.refiner.fc_iou.weight.grad is not None
    assert module.refiner.cls2.weight.grad is None                     # SISD has its own fcs, not stage II's


@pytest.mark.parametrize("refiner", ["none", "mil", "spsd"])
def test_arms_have_their_terms(refiner: str) -> None:
    module, batch = _module_and_batch(refiner)
    names = set(module(batch).losses)
    expected = {"none": set(), "mil": {"mil1", "mil2", "neg"}, "spsd": {"spsd1", "mil1", "spsd2", "mil2", "neg"}}
    assert names - {"cls", "box", "ctr"} == expected[refiner]


def test_noisy_targets_control_gives_the_detector_the_noisy_boxes() -> None:
    none_module, batch = _module_and_batch("none")
    base = none_module(batch).losses
    from dataclasses import replace

    module, batch = _module_and_batch("ssd")
    assert module(batch).losses["box"].item() != pytest.approx(base["box"].item())   # refined targets differ
    module.args = replace(module.args, detector_targets="noisy")
    losses = module(batch).losses
    assert all(losses[k].item() == pytest.approx(base[k].item(), rel=1e-6) for k in ("cls", "box", "ctr"))
    assert "sisd" in losses                                                           # the refiner still trains


def _losses(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k.startswith("train_")} for r in csv.DictReader(f)]


def test_tiny_run_resumes_exactly_and_clean_boxes_never_reach_a_loss(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    result = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=2)
    assert {"test_AP", "test_AP50", "test_AP75", "refined_miou", "noisy_miou"} <= set(result)
    assert 0 < result["noisy_miou"] < 0.9 and 0 <= result["refined_miou"] <= 1
    assert "train_sisd" in (tmp_path / "full/metrics.csv").read_text().splitlines()[0]

    real = ssd_mod.build_noisy_detection

    def garbage_clean(cfg):
        noisy, clean, test = real(cfg)
        anns = [{**a, "bbox": [0.0, 0.0, 1.0, 1.0]} for a in clean.coco.annotations]
        bad = CocoData(clean.coco.images, anns, clean.coco.categories, "garbage", {})
        return noisy, DetectionData(clean.images, bad), test

    monkeypatch.setattr(ssd_mod, "build_noisy_detection", garbage_clean)
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "b")]) == 0
    other = json.loads((tmp_path / "b/result.json").read_text())
    assert _losses(tmp_path / "full") == _losses(tmp_path / "b")               # training never read them
    assert other["test_AP"] == result["test_AP"] and other["refined_miou"] != result["refined_miou"]


def test_baseline_arm_refines_nothing(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "ssd.refiner=none", "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert result["refined_miou"] == pytest.approx(result["noisy_miou"])
    assert "train_mil1" not in (tmp_path / "run/metrics.csv").read_text().splitlines()[0]


def test_bad_recipes_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    for override, message in (("ssd.refiner=oamil", "ssd.refiner must be one of"),
                              ("noise.ratio=1.5", "noise.ratio must be in [0, 1)"),
                              ("ssd.w_sisd=-1", "loss weights must be >= 0"),
                              ("ssd.detector_targets=clean", "ssd.detector_targets must be"),
                              ("ssd.tap=nope", "ssd.tap")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
