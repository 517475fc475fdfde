"""UP-VL: tracking, amodal box fitting, auto-labels (motion vs motion + semantics), the synthetic VL teacher, the
masked feature loss and point sampling against hand computations, the detector's feature-head option, the recipe on
the one Trainer (tiny run with the distilled stage, exact resume) and one-line config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.methods.upvl import (
    AutoLabelConfig,
    SyntheticVL,
    auto_label,
    feature_loss,
    fit_box,
    gather_point_features,
    recall_flags,
    track_clusters,
)
from kdforge.tasks.pointcloud.iou import bev_iou
from kdforge.tasks.pointcloud.models import DetectorConfig, build_detector
from kdforge.tasks.pointcloud.scenes import SceneSpec, semantic_names
from kdforge.tasks.pointcloud.sequences import make_sequence

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/upvl.yaml"
TINY = ["data.num_train=4", "data.num_test=3", "data.max_objects=4", "upvl.sequence.frames=3",
        "model={voxel: 1.0, cell: 1.0, pfn: 4, width: 8, depth: 2, stride: 1, head: 8}", "train.epochs=2",
        "train.batch_size=2", "upvl.vl.cameras=[{yaw: 0.0, fov: 90.0, width: 48, height: 24}]", "upvl.cache=false",
        "trainer.threads=1"]


def test_track_clusters_follows_constant_velocity_and_skips_distractors() -> None:
    # key-frame clusters: A at (0, 0) moving +1.5 m per frame in x, B parked at (5, 5); frame 2 loses B,
    # a distractor appears 3 m from everything
    c = [torch.tensor([[0.0, 0.0], [5.0, 5.0]]), torch.tensor([[5.1, 5.0], [1.5, 0.1]]),
         torch.tensor([[3.0, 0.0], [10.0, -10.0]]), torch.tensor([[4.4, 0.0], [5.0, 4.9]])]
    match = track_clusters(c, dt=0.1, gate=2.0)
    assert match.tolist() == [[0, 1, 0, 0], [1, 0, -1, 1]]


def test_fit_box_recovers_a_corner_seen_box_and_a_given_heading() -> None:
    yaw, (x, y, l, w) = math.radians(30), (6.0, 4.0, 4.0, 1.6)
    c, s = math.cos(yaw), math.sin(yaw)
    u = torch.linspace(-l / 2, l / 2, 40)
    v = torch.linspace(-w / 2, w / 2, 20)
    # the two faces facing the sensor at the origin (the -u face and the -v face) + a top point for the height
    local = torch.cat([torch.stack([u, torch.full_like(u, -w / 2)], 1),
                       torch.stack([torch.full_like(v, -l / 2), v], 1)])
    world = torch.stack([x + local[:, 0] * c - local[:, 1] * s, y + local[:, 0] * s + local[:, 1] * c], 1)
    pts = torch.cat([world, torch.full((len(world), 1), -1.7)], 1)
    pts[0, 2] = -0.2                                    # the highest return: h = 1.5 above the ground
    box = fit_box(pts, ground_z=-1.7, heading=None, min_size=0.4)
    assert box[:2].tolist() == pytest.approx([x, y], abs=0.1)
    assert box[3:6].tolist() == pytest.approx([l, w, 1.5], abs=0.15)
    assert math.cos(2 * (float(box[6]) - yaw)) > math.cos(math.radians(6))      # heading modulo pi, 3 deg grid
    given = fit_box(pts, -1.7, yaw + math.pi, 0.4)       # a motion heading: only its axis matters for the extent
    assert given[3:5].tolist() == pytest.approx([l, w], abs=0.02)
    thin = fit_box(pts[:40], -1.7, yaw, 0.4)            # one face seen: width clamped at min_size
    assert float(thin[4]) == pytest.approx(0.4)


def test_auto_labels_motion_misses_parked_objects_semantics_recovers_them() -> None:
    spec = SceneSpec(categories=["car"], extent=12.0, min_objects=5, max_objects=6, clutter=2, dropout=0.0)
    seq = make_sequence(spec, 11, 0, frames=5)
    cfg = AutoLabelConfig()
    gt, static = seq.frames[0].boxes, seq.static
    assert static.sum() >= 2 and (~static).sum() >= 2
    boxes, moving = auto_label(seq, -spec.sensor_height, cfg, None)
    assert moving.all() and len(boxes) == int((~static).sum())
    near = bev_iou(boxes, gt).max(0).values            # per GT box, the best auto-label overlap
    assert (near[static] < 0.1).all()                 # motion-only: no parked car is labelled
    assert (near[~static] > 0.7).all()                # moving cars: amodal boxes from the aggregated frames
    # oracle semantics: score 1 on object points, 0 elsewhere (clutter poles stay out) -> parked cars come in
    semantic = torch.where(seq.frames[0].point_track >= 0, 1.0, 0.0)
    boxes2, moving2 = auto_label(seq, -spec.sensor_height, cfg, semantic)
    near2 = bev_iou(boxes2, gt).max(0).values
    assert (near2 > 0.7).all() and len(boxes2) == len(gt) and int((~moving2).sum()) == int(static.sum())
    # unknown semantics (NaN: outside every camera) add nothing
    boxes3, _ = auto_label(seq, -spec.sensor_height, cfg, torch.full_like(semantic, math.nan))
    assert torch.equal(boxes3, boxes)


def test_synthetic_vl_features_text_and_visibility() -> None:
    from kdforge.tasks.pointcloud.cameras import CameraSpec

    spec = SceneSpec(min_objects=6, max_objects=8)
    seq = make_sequence(spec, 2, 0, frames=1)
    vl = SyntheticVL(semantic_names(spec), dim=16, noise=0.5, seed=0)
    feat, visible = vl.point_features(seq.scene(0), [CameraSpec(yaw=0.0, fov=90.0)], spec, key=5)
    pts = seq.frames[0].points
    angle = torch.atan2(pts[:, 1], pts[:, 0]).abs()
    assert not visible[angle > math.radians(46)].any() and visible.any()
    assert (feat[~visible] == 0).all() and torch.allclose(feat[visible].norm(dim=1), torch.ones(int(visible.sum())))
    text = vl.text([vl.prompt(n) for n in semantic_names(spec)])
    right = (feat[visible] @ text.T).argmax(1) == seq.frames[0].point_labels[visible]
    assert right.float().mean() > 0.85                  # noise 0.5, D 16: the class vector dominates
    again, _ = vl.point_features(seq.scene(0), [CameraSpec(yaw=0.0, fov=90.0)], spec, key=5)
    assert torch.equal(feat, again)
    with pytest.raises(Exception, match="knows"):
        vl.text(["a photo of a tree"])


def test_feature_loss_and_point_sampling_match_hand_computations() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    per_scene = []
    for b in range(3):
        vals = [1 - float(pred[i] @ target[i]) / float(pred[i].norm() * target[i].norm())
                for i in range(7) if batch[i] == b and mask[i]]
        per_scene.append(sum(vals) / len(vals) if vals else 0.0)
    assert float(feature_loss(pred, target, mask, batch, 3)) == pytest.approx(sum(per_scene) / 3, abs=1e-6)
    fmap = torch.randn(2, 3, 8, 8, generator=g)        # extent 4 m, 1 m cells: cell (iy, ix) centre at
    pts = torch.tensor([[-3.5, -3.5, 0.0], [0.5, -1.5, 0.0], [2.5, 3.5, 0.0], [-0.5, 0.5, 0.0]])   # x = ix - 3.5
    scene = torch.tensor([0, 0, 1, 1])
    out = gather_point_features(fmap, pts, scene, extent=4.0)
    hand = torch.stack([fmap[0, :, 0, 0], fmap[0, :, 2, 4], fmap[1, :, 7, 6], fmap[1, :, 4, 3]])
    assert torch.allclose(out, hand, atol=1e-6)
    mid = gather_point_features(fmap, torch.tensor([[0.0, 0.5, 0.0]]), torch.tensor([0]), 4.0)   # between x cells 3, 4
    assert torch.allclose(mid[0], (fmap[0, :, 4, 3] + fmap[0, :, 4, 4]) / 2, atol=1e-6)


def test_recall_flags_hand_case() -> None:
    gt = torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], [10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    det = torch.tensor([[0.2, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], [0.0, 0.1, 0.0, 4.0, 2.0, 1.5, 0.0],
                        [12.5, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    # IoU(det0, gt0) = 3.8*2 / (16 - 7.6) = 0.905; det1 would match gt0 too but it is used; det2 vs gt1: 1.5*2/13
    assert recall_flags(det, torch.tensor([0.9, 0.8, 0.7]), gt, 0.5).tolist() == [True, False]
    assert recall_flags(det, torch.tensor([0.9, 0.8, 0.7]), gt, 0.2).tolist() == [True, True]


def test_detector_feature_head_is_optional_and_backwards_compatible() -> None:
    torch.manual_seed(0)
    plain = build_detector(3, 8.0, DetectorConfig(voxel=1.0, pfn=4, width=8, depth=2, head=8))
    torch.manual_seed(0)
    with_feat = build_detector(3, 8.0, DetectorConfig(voxel=1.0, pfn=4, width=8, depth=2, head=8, feature_dim=5))
    extra = set(with_feat.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("feature.") for k in extra)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, with_feat.state_dict()[k])      # same initialisation of everything else
    pts = torch.tensor([[1.0, 2.0, -1.0, 0.5], [-3.0, 1.0, -1.5, 0.2]])
    a, b = plain(pts, torch.tensor([0, 0]), 1), with_feat(pts, torch.tensor([0, 0]), 1)
    assert set(a) == {"neck", "heatmap", "reg"} and b["feature"].shape == (1, 5, 16, 16)
    assert torch.equal(a["heatmap"], b["heatmap"]) and torch.equal(a["reg"], b["reg"])


def test_upvl_recipe_distilled_stage_trains_and_resumes(tmp_path: Path) -> None:
    result = assert_resume_exact(RECIPE, [*TINY, "upvl.semantics=distilled"], tmp_path, stop_after=3)
    assert (tmp_path / "full/stages/features/result.json").is_file()
    assert {"test_static_recall", "test_moving_recall", "test_ap50", "test_ov_acc_out", "autolabel_static_recall",
            "features_autolabel_static_recall", "features_test_static_recall"} <= set(result)
    assert (tmp_path / "full/predictions.png").is_file()
    header = (tmp_path / "full/metrics.csv").read_text().splitlines()[0]
    assert "train_upvl_feat" in header
    from kdforge.registry import METHODS

    assert "upvl" in METHODS


@pytest.mark.parametrize(("override", "message"), [
    ("upvl.labels=semantic", "upvl.labels must be motion or motion_semantic"),
    ("upvl.semantics=lidar", "upvl.semantics must be projected or distilled"),
    ("upvl.vl.kind=clip", "upvl.vl.kind must be synthetic"),
    ("upvl.vl.cameras=[{yaw: 0.0, zoom: 2.0}]", "unknown field"),
    ("upvl.sequence.frames=2", "frames must be >= upvl.autolabel.min_frames"),
    ("upvl.sequence.speeds={car: [1.0, 2.0]}", "speeds"),
    ("model.feature_dim=7", "model.feature_dim is set by upvl"),
    ("teacher_only=true", "upvl trains no detector teacher"),
])
def test_bad_upvl_recipes_fail_in_one_line(tmp_path: Path, capsys, override: str, message: str) -> None:
    assert main(["train", str(RECIPE), *TINY, override, "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
