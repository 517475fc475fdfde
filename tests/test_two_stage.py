"""The two-stage detector: box coder, anchors and sampling by hand, a few steps learning, the recipe via the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.tasks.detection.boxes import box_iou, xywh_to_xyxy
from kdforge.tasks.detection.two_stage import (
    TwoStageDetector,
    anchors,
    decode_deltas,
    encode,
    match_labels,
    sample_rois,
)

RECIPE = Path(__file__).resolve().parents[1] / "configs/detection/faster_rcnn.yaml"
TINY = ["data.num_train=32", "data.num_test=8", "data.size=32", "train.epochs=1", "train.batch_size=8",
        "model.backbone_args={width: 4}", "model.width=8", "model.head.fc=16", "trainer.progress=false",
        "trainer.threads=1"]


def test_box_coder_hand_case_and_round_trip() -> None:
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = torch.tensor([[2.0, 1.0, 22.0, 6.0]])           # centre (12, 3.5), size 20 x 5
    d = encode(ref, target)
    # (12 - 5) / 10 / 0.1, (3.5 - 5) / 10 / 0.1, log(2) / 0.2, log(0.5) / 0.2
    assert d[0].tolist() == pytest.approx([7.0, -1.5, math.log(2) / 0.2, math.log(0.5) / 0.2], rel=1e-5)
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(50, 2, generator=g) * 30
    refs = torch.cat([refs, refs + 1 + torch.rand(50, 2, generator=g) * 20], 1)
    tgts = torch.rand(50, 2, generator=g) * 30
    tgts = torch.cat([tgts, tgts + 1 + torch.rand(50, 2, generator=g) * 20], 1)
    assert torch.allclose(decode_deltas(refs, encode(refs, tgts)), tgts, atol=1e-4)
    assert torch.allclose(decode_deltas(refs, torch.zeros(50, 4)), refs)


def test_anchor_generation_hand_case() -> None:
    a = anchors(1, 2, 4, [4.0], [1.0, 4.0])
    # locations (2, 2) and (6, 2); size 4: square 4 x 4, ratio 4 (h / w): w = 2, h = 8
    expected = [[0, 0, 4, 4], [1, -2, 3, 6], [4, 0, 8, 4], [5, -2, 7, 6]]
    assert torch.allclose(a, torch.tensor(expected, dtype=torch.float32))
    assert anchors(3, 5, 2, [2.0, 4.0], [0.5, 1.0, 2.0]).shape == (3 * 5 * 6, 4)


def test_anchor_matching_and_roi_sampling() -> None:
    iou = torch.tensor([[0.8, 0.1], [0.5, 0.2], [0.1, 0.25], [0.0, 0.0]])
    lab, idx = match_labels(iou, 0.3, 0.7, allow_best=True)
    # row 0 >= 0.7; row 1 in between (ignored); row 2 < 0.3 but box 1's best -> positive; row 3 negative
    assert lab.tolist() == [1, -1, 1, 0] and idx.tolist() == [0, 0, 1, 0]
    lab, _ = match_labels(iou, 0.3, 0.7, allow_best=False)
    assert lab.tolist() == [1, -1, 0, 0]
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 12.0],      # IoU 10/12 with box 0 -> class 2
                          [20.0, 20.0, 30.0, 40.0],    # IoU 0.5 with box 1 -> class 0
                          [40.0, 40.0, 44.0, 44.0],    # background
                          [1.0, 1.0, 3.0, 3.0]])       # IoU 0.04 -> background
    torch.manual_seed(0)
    rois, cls, matched = sample_rois(props, gt, torch.tensor([2, 0]), num_classes=3, total=100, pos_fraction=1.0)
    pairs = sorted((tuple(r.tolist()), int(c)) for r, c in zip(rois, cls))
    assert pairs == sorted([((0.0, 0.0, 10.0, 12.0), 2), ((20.0, 20.0, 30.0, 40.0), 0), ((40.0, 40.0, 44.0, 44.0), 3),
                            ((1.0, 1.0, 3.0, 3.0), 3), ((0.0, 0.0, 10.0, 10.0), 2), ((20.0, 20.0, 30.0, 30.0), 0)])
    fg = cls < 3
    assert torch.equal(box_iou(rois[fg], matched[fg]).diag() >= 0.5, torch.ones(int(fg.sum()), dtype=torch.bool))
    # the positive cap: total 4 with fraction 0.25 -> one positive, three negatives
    _, cls, _ = sample_rois(props, gt, torch.tensor([2, 0]), 3, total=4, pos_fraction=0.25)
    assert int((cls < 3).sum()) == 1 and len(cls) == 3          # only 2 negatives exist besides positives


def test_two_stage_exposes_raw_outputs_learns_and_decodes() -> None:
    from kdforge.models import create_model
    from kdforge.tasks.detection.scenes import procedural_scenes

    torch.manual_seed(0)
    images, data = procedural_scenes(4, num_classes=3, size=32, max_objects=2, min_scale=0.25, seed=0)
    x = (images.float() / 255 - 0.5) / 0.25
    boxes = [xywh_to_xyxy(torch.tensor([a["bbox"] for a in data.annotations if a["image_id"] == i + 1]))
             for i in range(4)]
    labels = [torch.tensor([a["category_id"] - 1 for a in data.annotations if a["image_id"] == i + 1])
              for i in range(4)]
    model = TwoStageDetector(create_model("convnet", num_classes=3, width=8), ["feat2", "feat3"], 3, width=16,
                             size=32, fc=32, post_nms=30)
    out = model(x)
    assert model.strides == [2, 4] and [f.shape[1:] for f in out["features"]] == [(16, 16, 16), (16, 8, 8)]
    assert len(out["proposals"]) == 4 and out["roi_cls"].shape == (sum(map(len, out["proposals"])), 4)
    assert out["roi_box"].shape[1] == 12 and out["rpn_obj"][0].shape == (4, 16 * 16 * 6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    stats: dict[str, float] = {}
    first = None
    for _ in range(40):
        losses = model.loss(model(x), boxes, labels, stats)
        assert set(losses) == {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}
        total = sum(losses.values())
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < 0.6 * first and stats["num_pos"] >= 1
    model.eval()
    dets = model.decode(model(x))
    assert len(dets) == 4 and len(dets[0]["boxes"]) > 0
    assert float(box_iou(dets[0]["boxes"], boxes[0]).max()) > 0.3
    assert all(bool((d["labels"] < 3).all()) for d in dets)


def test_recipe_trains_through_the_cli_with_coco_metrics(tmp_path: Path, capsys) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert result["detector"] == "TwoStageDetector"
    for key in ("test_AP", "test_AP50", "test_AP75"):
        assert key in result and (result[key] is None or 0.0 <= result[key] <= 100.0)
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    assert all(f"train_{k}" in header for k in ("rpn_cls", "rpn_box", "roi_cls", "roi_box"))
    assert main(["train", str(RECIPE), *TINY, "model.head.pool=0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pool" in err, err
