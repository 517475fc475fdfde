"""Detection groundwork: IoU and NMS against plain references, COCO JSON validation, COCO AP known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.tasks.detection.boxes import batched_nms, box_iou, nms, xywh_to_xyxy, xyxy_to_xywh
from kdforge.tasks.detection.coco import load_coco, save_coco, validate
from kdforge.tasks.detection.metrics import coco_ap


def _reference_nms(boxes: list[list[float]], scores: list[float], thr: float) -> list[int]:
    """Textbook greedy NMS, one box at a time in plain Python."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


def test_iou_hand_case_and_conversions() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    xywh = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(xywh_to_xyxy(xywh), torch.tensor([[1.0, 2.0, 4.0, 6.0]]))
    assert torch.equal(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)
    with pytest.raises(KdforgeError, match=r"\(N, 4\)"):
        box_iou(torch.zeros(3), b)


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_the_plain_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 20 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=g).round(decimals=1)          # ties on purpose
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == _reference_nms(boxes.tolist(), scores.tolist(), thr)


def test_batched_nms_never_suppresses_across_classes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.5, 0.5, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    classes = torch.tensor([0, 0, 1])
    assert sorted(batched_nms(boxes, scores, classes, 0.5).tolist()) == [0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def _coco(tmp_path: Path, annotations: list[dict]) -> Path:
    tree = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
            "categories": [{"id": 3, "name": "disc"}], "annotations": annotations}
    return save_coco(tree, tmp_path / "ann.json")


@pytest.mark.parametrize(("ann", "reason", "message"), [
    ({"image_id": 1, "category_id": 3, "bbox": [15, 2, 8, 4]}, "outside_image", "outside the 20x10 image"),
    ({"image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 4]}, "bad_size", "non-positive size"),
    ({"image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}, "unknown_category", "9 is not among"),
    ({"image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2]}, "unknown_image", "7 names no image"),
    ({"image_id": 1, "category_id": 3, "bbox": [1, 1, 2]}, "bad_size", "four finite numbers"),
])
def test_bad_annotations_fail_naming_file_image_and_field_or_are_dropped_and_counted(
        tmp_path: Path, ann: dict, reason: str, message: str) -> None:
    good = {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}
    path = _coco(tmp_path, [good, ann])
    with pytest.raises(KdforgeError) as err:
        load_coco(path)
    text = str(err.value)
    assert str(path) in text and f"image {ann['image_id']}" in text and message in text and "\n" not in text
    data = load_coco(path, on_bad="drop")
    assert data.annotations == [good] and data.dropped == {reason: 1}


def test_missing_image_file_and_broken_json_fail_in_one_line(tmp_path: Path) -> None:
    path = _coco(tmp_path, [])
    with pytest.raises(KdforgeError, match=r"image 1: 'file_name' 'a.png' not found"):
        load_coco(path, image_root=tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KdforgeError, match="not valid JSON"):
        load_coco(tmp_path / "bad.json")
    with pytest.raises(KdforgeError, match="'annotations' is missing"):
        validate({"images": [], "categories": []}, "x.json")


def test_coco_ap_known_answers() -> None:
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    gt_boxes = {1: [10, 10, 40, 40], 2: [50, 50, 30, 30]}
    gt = validate({"images": images, "categories": [{"id": 1, "name": "a"}],
                   "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": b}
                                   for i, b in gt_boxes.items()]}, "gt")
    exact = [{"image_id": i, "category_id": 1, "bbox": b, "score": 0.9} for i, b in gt_boxes.items()]
    assert coco_ap(gt, exact)["AP"] == pytest.approx(100.0)
    # shifted by 10 px: IoU 30*40 / (2*1600 - 1200) = 0.6 for image 1 and 20*30/(2*900-600) = 0.5 for image 2
    shifted = [{"image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 40], "score": 0.9},
               {"image_id": 2, "category_id": 1, "bbox": [60, 50, 30, 30], "score": 0.9}]
    res = coco_ap(gt, shifted)
    assert res["AP50"] == pytest.approx(100.0) and res["AP75"] == pytest.approx(0.0)
    # image 2's box (900 px^2) is "small" (< 32^2) with IoU 0.5: 1 of the 10 thresholds 0.5:0.95 matches;
    # image 1's (1600 px^2) is "medium" with IoU 0.6: 3 of 10 (0.5, 0.55, 0.6); nothing is "large" (> 96^2)
    assert res["AP_small"] == pytest.approx(10.0) and res["AP_medium"] == pytest.approx(30.0)
    assert res["AP_large"] is None
    assert coco_ap(gt, [])["AP"] == 0.0
    assert json.dumps(res)                            # plain floats / None


def test_procedural_scenes_are_seeded_valid_coco_with_tight_boxes() -> None:
    from kdforge.tasks.detection.scenes import procedural_scenes

    images, data = procedural_scenes(12, num_classes=5, size=48, max_objects=4, seed=3)
    again, data2 = procedural_scenes(12, num_classes=5, size=48, max_objects=4, seed=3)
    assert torch.equal(images, again) and data.annotations == data2.annotations
    assert images.shape == (12, 3, 48, 48) and images.dtype == torch.uint8
    assert len(data.images) == 12 and {a["category_id"] for a in data.annotations} <= {1, 2, 3, 4, 5}
    per_image = [sum(a["image_id"] == i + 1 for a in data.annotations) for i in range(12)]
    assert min(per_image) >= 1 and max(per_image) <= 4 and not data.dropped
    areas = [a["bbox"][2] * a["bbox"][3] for a in data.annotations]
    assert min(areas) < 64 < max(areas)                  # small and larger objects
    # a one-object scene: the box is exactly the extent of the pixels that differ from the background
    img1, one = procedural_scenes(1, num_classes=3, size=32, max_objects=1, clutter=0.0, seed=5)
    x, y, w, h = (int(v) for v in one.annotations[0]["bbox"])
    background = img1[0, :, 0, 0][:, None, None].int()
    differs = ((img1[0].int() - background).abs().amax(0) > 40).nonzero()
    assert (differs[:, 1].min(), differs[:, 0].min()) == (x, y)
    assert (differs[:, 1].max() - x + 1, differs[:, 0].max() - y + 1) == (w, h)
    assert procedural_scenes(3, seed=4)[1].annotations != procedural_scenes(3, seed=5)[1].annotations


def test_noisy_boxes_and_incremental_split() -> None:
    from kdforge.tasks.detection.scenes import incremental_split, noisy_boxes, procedural_scenes

    _, data = procedural_scenes(20, num_classes=6, size=64, seed=1)
    assert noisy_boxes(data, 0.0).annotations == data.annotations
    noisy = noisy_boxes(data, 0.2, seed=2)
    assert noisy_boxes(data, 0.2, seed=2).annotations == noisy.annotations
    moved = 0
    for a, b in zip(data.annotations, noisy.annotations):
        (x, y, w, h), (nx, ny, nw, nh) = a["bbox"], b["bbox"]
        assert abs((nx + nw / 2) - (x + w / 2)) <= 0.2 * w + 1e-6 or nx == 0 or nx + nw >= 63
        assert abs((ny + nh / 2) - (y + h / 2)) <= 0.2 * h + 1e-6 or ny == 0 or ny + nh >= 63
        assert nx >= 0 and ny >= 0 and nx + nw <= 64 and ny + nh <= 64 and nw > 0 and nh > 0
        moved += (a["bbox"] != b["bbox"])
    assert moved > len(data.annotations) // 2
    old, new = incremental_split(data, 4)
    assert {c["id"] for c in old.categories} == {1, 2, 3, 4} and {c["id"] for c in new.categories} == {5, 6}
    assert len(old.annotations) + len(new.annotations) == len(data.annotations)
    assert old.images == new.images == data.images
    with pytest.raises(KdforgeError, match="old_classes"):
        incremental_split(data, 6)


def _rect_image(size: int, box: list[int]) -> torch.Tensor:
    img = torch.zeros(1, 3, size, size)
    x1, y1, x2, y2 = box
    img[:, :, y1:y2, x1:x2] = 1.0
    return img


def test_augmentation_identity_and_boxes_follow_the_pixels() -> None:
    from kdforge.tasks.detection.augment import ViewParams, augment_batch, view_params

    img = _rect_image(32, [4, 6, 20, 14])
    box = [torch.tensor([[4.0, 6.0, 20.0, 14.0]])]
    lab = [torch.tensor([2])]
    ident = ViewParams(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                       torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bool))
    out, bx, lb, dropped = augment_batch(img, box, lab, ident, 32)
    assert torch.allclose(out, img, atol=1e-5) and torch.equal(bx[0], box[0]) and dropped == 0
    for seed in range(6):       # random views: the warped box is the extent of the bright pixels
        p = view_params(torch.tensor([seed]), 0, seed, (32, 32), 32, (0.6, 1.6))
        out, bx, lb, dropped = augment_batch(img, box, lab, p, 32, min_visible=0.0)
        bright = (out[0].mean(0) > 0.5).nonzero()
        if len(bx[0]) == 0:
            assert len(bright) == 0
            continue
        x1, y1, x2, y2 = bx[0][0].tolist()
        assert abs(bright[:, 1].min().item() - x1) <= 1 and abs(bright[:, 1].max().item() + 1 - x2) <= 1
        assert abs(bright[:, 0].min().item() - y1) <= 1 and abs(bright[:, 0].max().item() + 1 - y2) <= 1
        assert lb[0].tolist() == [2]


def test_augmentation_is_a_function_of_seed_epoch_and_index_and_drops_by_rule() -> None:
    from kdforge.tasks.detection.augment import ViewParams, augment_batch, view_params

    a = view_params(torch.tensor([5, 9, 11]), 2, 7, (32, 32), 32)
    b = view_params(torch.tensor([11, 5]), 2, 7, (32, 32), 32)
    assert a.scale[2] == b.scale[0] and a.offset_x[0] == b.offset_x[1] and a.flip[2] == b.flip[0]
    c = view_params(torch.tensor([5]), 3, 7, (32, 32), 32)
    assert (c.scale[0], c.offset_x[0]) != (a.scale[0], a.offset_x[0])
    flips = view_params(torch.arange(400), 0, 1, (32, 32), 32).flip.float().mean()
    assert 0.4 < float(flips) < 0.6
    # a view shifted so a box keeps 25% of its area: dropped under min_visible 0.3, kept under 0.2
    img = _rect_image(32, [0, 0, 8, 8])
    shift = ViewParams(torch.ones(1, dtype=torch.float64), torch.tensor([-6.0], dtype=torch.float64),
                       torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bool))
    box, lab = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])], [torch.tensor([0])]
    assert augment_batch(img, box, lab, shift, 32, min_visible=0.3)[3] == 1
    kept = augment_batch(img, box, lab, shift, 32, min_visible=0.2)[1][0]
    assert torch.allclose(kept, torch.tensor([[0.0, 0.0, 2.0, 8.0]]))


def test_fcos_assignment_hand_case_and_smallest_box_wins() -> None:
    from kdforge.tasks.detection.fcos import fcos_targets, locations

    pts = [locations(4, 4, 8)]                         # centres 4, 12, 20, 28
    cls, ltrb = fcos_targets(pts, [8], torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([2]),
                             ranges=[(0.0, float("inf"))])
    pos = (cls >= 0).nonzero()[:, 0].tolist()
    assert pos == [0, 1, 4, 5] and set(cls[pos].tolist()) == {2}
    assert ltrb[0].tolist() == [4.0, 4.0, 12.0, 12.0]
    nested = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 16.0, 16.0]])
    cls, _ = fcos_targets(pts, [8], nested, torch.tensor([0, 1]), ranges=[(0.0, float("inf"))])
    assert cls[5].item() == 1 and cls[0].item() == 0      # (12, 12) is in both: the small box wins


def test_giou_loss_and_focal_loss_hand_cases() -> None:
    from kdforge.tasks.detection.fcos import giou_loss, sigmoid_focal_loss

    t = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert giou_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # half-size box at the same point: IoU 1/4, enclosing box = target -> loss 0.75
    assert giou_loss(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), t).item() == pytest.approx(0.75)
    logits, targets = torch.tensor([0.0]), torch.tensor([1.0])
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(0.25 * 0.25 * math.log(2))


def test_fcos_exposes_raw_outputs_learns_and_decodes() -> None:
    from kdforge.models import create_model
    from kdforge.tasks.detection.fcos import FCOS, decode, fcos_loss
    from kdforge.tasks.detection.scenes import procedural_scenes

    torch.manual_seed(0)
    images, data = procedural_scenes(4, num_classes=3, size=32, max_objects=2, min_scale=0.25, seed=0)
    x = images.float() / 255
    boxes = [xywh_to_xyxy(torch.tensor([a["bbox"] for a in data.annotations if a["image_id"] == i + 1]))
             for i in range(4)]
    labels = [torch.tensor([a["category_id"] - 1 for a in data.annotations if a["image_id"] == i + 1])
              for i in range(4)]
    model = FCOS(create_model("convnet", num_classes=3, width=8), ["feat2", "feat3"], 3, width=16,
                 probe_size=32)
    out = model(x)
    assert [t.shape[1] for t in out["cls"]] == [3, 3] and model.strides == [2, 4]
    assert all(bool((t >= 0).all()) for t in out["box"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        losses = fcos_loss(model, model(x), boxes, labels)
        total = sum(losses.values())
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < 0.6 * first
    dets = decode(model.eval(), model(x), score_threshold=0.05)
    assert len(dets) == 4 and all(d["boxes"].shape[1] == 4 for d in dets)
    assert len(dets[0]["boxes"]) > 0 and float(box_iou(dets[0]["boxes"], boxes[0]).max()) > 0.3


def test_scene_noise_split_and_augmentation_options_fail_in_one_line() -> None:
    from kdforge.tasks.detection.augment import view_params
    from kdforge.tasks.detection.scenes import noisy_boxes, procedural_scenes

    for kwargs, match in (({"num_classes": 21}, "num_classes <= 20"), ({"size": 8}, "size >= 16"),
                          ({"min_scale": 0.6, "max_scale": 0.5}, "min_scale <= max_scale")):
        with pytest.raises(KdforgeError, match=match):
            procedural_scenes(2, **kwargs)
    _, data = procedural_scenes(2, seed=0)
    with pytest.raises(KdforgeError, match=r"ratio must be in \[0, 1\)"):
        noisy_boxes(data, 1.5)
    with pytest.raises(KdforgeError, match="scale_range"):
        view_params(torch.tensor([0]), 0, 0, (32, 32), 32, (1.2, 0.8))
