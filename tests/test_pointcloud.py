"""The point-cloud package against hand-worked cases: projection, voxel inverse map, rotated IoU, AP, KITTI
files (round trip and one-line errors), procedural scenes, CenterPoint targets / decoding, a tiny CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.geometry import project, scatter_max, scatter_mean, unproject, voxelize
from kdforge.tasks.pointcloud.iou import bev_corners, bev_iou, iou_3d
from kdforge.tasks.pointcloud.kitti import KittiCalib, load_bin, load_calib, load_kitti, write_kitti_frame
from kdforge.tasks.pointcloud.metrics import average_precision, detection_ap
from kdforge.tasks.pointcloud.models import centerpoint_targets, decode, gaussian_radius
from kdforge.tasks.pointcloud.scenes import SceneSpec, make_scene, semantic_names

ROOT = Path(__file__).resolve().parents[1]
K = torch.tensor([[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]], dtype=torch.float64)
# camera-from-lidar: camera x = -lidar y, camera y = -lidar z, camera z = lidar x (KITTI's axes)
T = torch.tensor([[0, -1.0, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)


# ------------------------------------------------------------------------------------- projection


def test_projection_hand_case_and_round_trip() -> None:
    uv, depth = project(torch.tensor([[10.0, 2.0, 1.0]], dtype=torch.float64), K, T)
    # camera point (-2, -1, 10): u = 100 * -2 / 10 + 50 = 30, v = 100 * -1 / 10 + 40 = 30
    assert torch.allclose(uv, torch.tensor([[30.0, 30.0]], dtype=torch.float64)) and float(depth[0]) == 10.0
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(50, 3, generator=g, dtype=torch.float64) * torch.tensor([30.0, 20, 4])
    pts = pts + torch.tensor([1.0, -10, -2])
    shift = T.clone()
    shift[:3, 3] = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    uv, depth = project(pts, K, shift)
    assert torch.allclose(unproject(uv, depth, K, shift), pts, atol=1e-9)
    with pytest.raises(KdforgeError, match="K must be"):
        project(pts, K[:2], T)


def test_kitti_calib_intrinsics_reproduce_p2() -> None:
    p2 = torch.tensor([[700.0, 0, 600, 45], [0, 700, 180, -0.3], [0, 0, 1, 0.005]], dtype=torch.float64)
    calib = KittiCalib(p2, torch.eye(3, dtype=torch.float64), T[:3])
    k, t = calib.intrinsics()
    pts = torch.tensor([[12.0, 1.5, -0.5], [30.0, -4.0, 0.3]], dtype=torch.float64)
    homog = torch.cat([pts, torch.ones(2, 1, dtype=torch.float64)], 1)
    want = (p2 @ calib.rect_from_lidar() @ homog.T).T
    uv, _ = project(pts, k, t)
    assert torch.allclose(uv, want[:, :2] / want[:, 2:], atol=1e-9)


# ------------------------------------------------------------------------------------- voxels


def test_voxelize_inverse_map_hand_case() -> None:
    pts = torch.tensor([[0.2, 0.2, 0.5], [0.7, 0.1, 0.2], [1.5, 0.5, 0.5], [0.1, 1.9, 0.1], [5.0, 0.0, 0.0],
                        [0.3, 0.3, 0.3]])
    batch = torch.tensor([0, 0, 0, 0, 0, 1])
    vox = voxelize(pts, batch, (0, 0, 0), (2, 2, 1), (1, 1, 1))
    # scene 0: voxels (x, y) (0,0) <- points 0, 1; (1,0) <- 2; (0,1) <- 3; point 4 outside; scene 1: (0,0) <- 5
    assert vox.coords.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert vox.inverse.tolist() == [0, 0, 1, 2, -1, 3]
    assert vox.counts.tolist() == [2, 1, 1, 1] and vox.grid == (1, 2, 2)
    feats = torch.tensor([[1.0, 5], [3, 2], [4, 4], [7, 0], [9, 9], [2, 8]])
    assert scatter_max(feats, vox.inverse, 4).tolist() == [[3, 5], [4, 4], [7, 0], [2, 8]]
    assert scatter_mean(feats, vox.inverse, 4).tolist() == [[2, 3.5], [4, 4], [7, 0], [2, 8]]
    centres = vox.centres(torch.zeros(3), torch.ones(3))
    assert centres.tolist()[2] == [0.5, 1.5, 0.5]
    # the inverse map gathers every in-range point back to the voxel that holds it
    g = torch.Generator().manual_seed(1)
    many = torch.rand(500, 3, generator=g) * torch.tensor([4.0, 4.0, 2.0]) - torch.tensor([0.5, 0.5, 0.0])
    vox = voxelize(many, None, (0, 0, 0), (3, 3, 1.5), (0.5, 0.5, 1.5))
    inside = vox.inverse >= 0
    cell = torch.floor(many[inside] / torch.tensor([0.5, 0.5, 1.5])).long()
    assert torch.equal(vox.coords[vox.inverse[inside]][:, [3, 2, 1]], cell)
    assert int(vox.counts.sum()) == int(inside.sum())
    with pytest.raises(KdforgeError, match="size > 0"):
        voxelize(many, None, (0, 0, 0), (1, 1, 1), (0, 1, 1))


# ------------------------------------------------------------------------------------- IoU


def _box(x=0.0, y=0.0, z=0.0, l=2.0, w=2.0, h=2.0, yaw=0.0) -> list[float]:
    return [x, y, z, l, w, h, yaw]


def test_rotated_iou_hand_cases() -> None:
    a = torch.tensor([_box()])
    b = torch.tensor([_box(), _box(x=1.0), _box(yaw=math.pi / 4), _box(x=5.0), _box(yaw=math.pi), _box(z=1.0)])
    # identical; shifted by half: 2 / (4 + 4 - 2); square vs its 45-degree turn: octagon 8 sqrt2 - 8 -> 1 / sqrt2;
    # disjoint; turned by pi (the same footprint); same footprint, half the height overlapping in 3D
    want_bev = [1.0, 1 / 3, 1 / math.sqrt(2), 0.0, 1.0, 1.0]
    assert torch.allclose(bev_iou(a, b)[0], torch.tensor(want_bev, dtype=torch.float64), atol=1e-9)
    want_3d = [1.0, 1 / 3, 1 / math.sqrt(2), 0.0, 1.0, 4 / 12]
    assert torch.allclose(iou_3d(a, b)[0], torch.tensor(want_3d, dtype=torch.float64), atol=1e-9)
    corners = bev_corners(torch.tensor([_box(x=1.0, l=4.0, w=2.0, yaw=math.pi / 2)]))[0]
    assert torch.allclose(corners, torch.tensor([[0.0, 2.0], [0.0, -2.0], [2.0, -2.0], [2.0, 2.0]]), atol=1e-6)
    assert bev_iou(torch.zeros(0, 7), b).shape == (0, 6)
    with pytest.raises(KdforgeError, match=r"\(N, 7\)"):
        bev_iou(torch.zeros(2, 5), b)


# ------------------------------------------------------------------------------------- AP


def test_average_precision_known_answers() -> None:
    # 2 ground-truth boxes; detections 0.9 TP, 0.8 FP, 0.7 TP: precision 1 up to recall 1/2, then 2/3 at recall 1
    ap = average_precision(torch.tensor([0.8, 0.9, 0.7]), torch.tensor([False, True, True]), num_gt=2)
    assert ap == pytest.approx((20 * 1.0 + 20 * (2 / 3)) / 40)
    assert average_precision(torch.tensor([0.5]), torch.tensor([True]), num_gt=4) == pytest.approx(10 / 40)
    assert average_precision(torch.zeros(0), torch.zeros(0, dtype=torch.bool), num_gt=3) == 0.0
    gt = [(torch.tensor([_box(), _box(x=6.0)]), torch.tensor([0, 1])), (torch.tensor([_box(y=5.0)]), torch.tensor([0]))]
    dets = [(torch.tensor([_box(x=0.1), _box(x=1.0), _box(x=6.0)]), torch.tensor([0.9, 0.95, 0.3]),
             torch.tensor([0, 0, 1])),
            (torch.tensor([_box(x=9.0)]), torch.tensor([0.5]), torch.tensor([0]))]
    # class 0 at IoU 0.7: 0.95 (IoU 1/3, FP), 0.9 (IoU 0.905, TP), 0.5 (FP); 2 truths -> max precision 1/2 up to
    # recall 1/2, recall 1 never reached -> AP 20 * 0.5 / 40; class 1: one exact TP -> 100
    ap = detection_ap(dets, gt, ["a", "b"], {"a": 0.7, "b": 0.7}, "bev")
    assert ap["a"] == pytest.approx(25.0) and ap["b"] == pytest.approx(100.0)
    assert ap["mean"] == pytest.approx(62.5)
    # at IoU 0.3 the 0.95 detection matches first, so 0.9 becomes the duplicate (FP): precision 1, 1/2, 1/3
    assert detection_ap(dets, gt, ["a", "b"], 0.3, "bev")["a"] == pytest.approx(100 * 20 / 40)


# ------------------------------------------------------------------------------------- KITTI files


def _calib() -> KittiCalib:
    p2 = torch.tensor([[700.0, 0, 600, 45], [0, 700, 180, -0.3], [0, 0, 1, 0.005]], dtype=torch.float64)
    r0 = torch.tensor([[0.9999, 0.0098, -0.0074], [-0.0099, 0.9999, -0.0043], [0.0074, 0.0044, 1.0]],
                      dtype=torch.float64)
    tr = torch.tensor([[0.0, -1, 0, -0.004], [0, 0, -1, -0.07], [1, 0, 0, -0.27]], dtype=torch.float64)
    return KittiCalib(p2, r0, tr)


def test_kitti_round_trip(tmp_path: Path) -> None:
    names = ["car", "pedestrian", "cyclist"]
    scenes = [make_scene(SceneSpec(), 3, i) for i in range(2)]
    for i, s in enumerate(scenes):
        write_kitti_frame(tmp_path, f"{i:06d}", s, _calib(), names)
    with (tmp_path / "label_2" / "000000.txt").open("a") as f:
        f.write("DontCare -1 -1 -10 0 0 10 10 -1 -1 -1 -1000 -1000 -1000 -10\n")      # skipped, not an error
    loaded = load_kitti(tmp_path, names)
    assert len(loaded) == 2
    for a, b in zip(scenes, loaded, strict=True):
        assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
        assert torch.allclose(a.boxes[:, :6], b.boxes[:, :6], atol=1e-4)
        dyaw = torch.atan2(torch.sin(a.boxes[:, 6] - b.boxes[:, 6]), torch.cos(a.boxes[:, 6] - b.boxes[:, 6]))
        assert dyaw.abs().max() < 1e-4


def test_bad_kitti_files_fail_in_one_line(tmp_path: Path) -> None:
    names = ["car"]
    write_kitti_frame(tmp_path, "000000", make_scene(SceneSpec(categories=["car"]), 0, 0), _calib(), names)
    label = tmp_path / "label_2" / "000000.txt"
    good = label.read_text()
    cases = []
    (tmp_path / "velodyne" / "000000.bin").write_bytes((tmp_path / "velodyne" / "000000.bin").read_bytes()[:-6])
    cases.append("not a whole number of float32")
    for message in cases:
        with pytest.raises(KdforgeError, match=message) as err:
            load_kitti(tmp_path, names)
        assert len(str(err.value).splitlines()) == 1
    assert load_bin.__name__ == "load_bin"
    write_kitti_frame(tmp_path, "000000", make_scene(SceneSpec(categories=["car"]), 0, 0), _calib(), names)
    for text, message in (("Car 0 0 0 1 2 3 4 1.5 1.6 3.9 1 2\n", r"000000.txt:1: a label line has 15 fields"),
                          (good + "Car 0 0 0 1 2 3 4 1.5 oops 3.9 1 2 3 0.1\n", r"field 'w' is not a number")):
        label.write_text(text)
        with pytest.raises(KdforgeError, match=message) as err:
            load_kitti(tmp_path, names)
        assert len(str(err.value).splitlines()) == 1
    label.write_text(good)
    calib = tmp_path / "calib" / "000000.txt"
    calib.write_text("\n".join(line for line in calib.read_text().splitlines() if not line.startswith("Tr_velo")))
    with pytest.raises(KdforgeError, match="no 'Tr_velo_to_cam' line"):
        load_calib(calib)
    calib.unlink()
    with pytest.raises(KdforgeError, match="calibration file .* not found"):
        load_kitti(tmp_path, names)
    with pytest.raises(KdforgeError, match="no velodyne/ directory"):
        load_kitti(tmp_path / "nothing", names)


def test_missing_calibration_fails_the_cli_in_one_line(tmp_path: Path, capsys) -> None:
    root = tmp_path / "kitti"
    for i in range(3):
        write_kitti_frame(root, f"{i:06d}", make_scene(SceneSpec(), 0, i), _calib(), ["car", "pedestrian", "cyclist"])
    (root / "calib" / "000001.txt").unlink()
    code = main(["train", str(ROOT / "configs/pointcloud/student.yaml"), "data.format=kitti", f"data.root={root}",
                 "train.epochs=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "000001.txt not found" in err, err


# ------------------------------------------------------------------------------------- scenes and targets


def test_procedural_scenes_follow_their_description() -> None:
    spec = SceneSpec(min_objects=4, max_objects=6, dropout=0.0, noise=0.0)
    a, b = make_scene(spec, 5, 2), make_scene(spec, 5, 2)
    assert torch.equal(a.points, b.points) and torch.equal(a.boxes, b.boxes)          # a pure function of (seed, i)
    assert not torch.equal(a.points, make_scene(spec, 5, 3).points)
    assert 4 <= len(a.boxes) <= 6 and a.boxes.shape[1] == 7 and len(a.labels) == len(a.boxes)
    names = semantic_names(spec)
    assert names == ["ground", "car", "pedestrian", "cyclist", "clutter"]
    assert len(a.point_labels) == len(a.points) and int(a.point_labels.max()) < len(names)
    ground = a.points[a.point_labels == 0]
    assert torch.allclose(ground[:, 2], torch.full((len(ground),), -spec.sensor_height))   # noise 0: on the plane
    iou = bev_iou(a.boxes, a.boxes) - torch.eye(len(a.boxes), dtype=torch.float64)
    assert iou.abs().max() < 1e-6                                                     # boxes never overlap
    for box, label in zip(a.boxes, a.labels, strict=True):
        pts = a.points[a.point_labels == 1 + label]
        local = pts[:, :2] - box[:2]
        c, s = math.cos(float(box[6])), math.sin(float(box[6]))
        u = local[:, 0] * c + local[:, 1] * s
        v = -local[:, 0] * s + local[:, 1] * c
        on = (u.abs() <= box[3] / 2 + 1e-4) & (v.abs() <= box[4] / 2 + 1e-4)
        assert on.any()
        # only the faces towards the sensor are seen: the points' mean lies nearer the sensor than the centre
        near = pts[on][:, :2].mean(0)
        assert near.norm() < box[:2].norm()


def test_targets_decode_back_to_the_boxes() -> None:
    scene = make_scene(SceneSpec(), 1, 0)
    heat, reg, mask = centerpoint_targets(scene.boxes, scene.labels, 3, 16.0, 1.0)
    assert heat.shape == (3, 32, 32) and int(mask.sum()) == len(scene.boxes)
    assert int(heat.eq(1).sum()) == len(scene.boxes)
    logits = torch.where(heat.eq(1), torch.tensor(10.0), torch.tensor(-10.0))[None]
    dets = decode({"heatmap": logits, "reg": reg[None]}, 16.0, 1.0, top_k=50, score_threshold=0.5)
    boxes, scores, labels = dets[0]
    assert len(boxes) == len(scene.boxes)
    ap = detection_ap(dets, [(scene.boxes, scene.labels)], ["car", "pedestrian", "cyclist"], 0.99, "3d")
    assert ap["mean"] == pytest.approx(100.0)
    assert gaussian_radius(4.0, 2.0) > gaussian_radius(1.0, 1.0) > 0


def test_teacher_recipe_trains_draws_and_is_reused_by_rdd(tmp_path: Path) -> None:
    out = tmp_path / "run"
    same = ["data.num_train=8", "data.num_test=4", "teacher.loop.epochs=1", "teacher.loop.batch_size=4",
            "teacher.model.width=8", "teacher.model.head=8", "teacher.model.pfn=8", "trainer.progress=false"]
    assert main(["train", str(ROOT / "configs/pointcloud/teacher.yaml"), *same, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert {"test_bev_ap", "test_ap3d", "test_bev_ap50", "test_fp_per_scene", "test_bev_ap_car"} <= set(result)
    assert (out / "predictions.png").stat().st_size > 1000
    assert not (out / "stages").exists()
    # a distillation recipe reuses the baseline recipe's teacher run (same data and teacher settings)
    student = tmp_path / "rdd"
    assert main(["train", str(ROOT / "configs/methods/rdd.yaml"), *same, f"teacher.run={out}", "train.epochs=1",
                 "train.batch_size=4", "model={voxel: 2.0, cell: 1.0, pfn: 4, width: 4, depth: 2, head: 4}",
                 "--out", str(student)]) == 0
    assert "teacher_test_bev_ap" in json.loads((student / "result.json").read_text())
    assert not (student / "stages").exists()


def test_two_processes_match_one(tmp_path: Path) -> None:
    """torchrun (2 gloo ranks) == 1 process for the teacher stage and the distilled student (per-scene losses)."""
    from recipe_checks import assert_ddp_matches

    tiny = ["data.num_train=8", "data.num_test=4", "data.max_objects=4", "teacher.loop.epochs=1",
            "teacher.loop.batch_size=4", "teacher.model={voxel: 1.0, cell: 1.0, pfn: 8, width: 8, depth: 2, head: 8}",
            "model={voxel: 2.0, cell: 1.0, pfn: 4, width: 4, depth: 2, head: 4}", "train.epochs=1",
            "train.batch_size=4", "rdd.score_threshold=0.05", "trainer.threads=1", "trainer.progress=false"]
    assert_ddp_matches(ROOT / "configs/methods/rdd.yaml", tiny, tmp_path)
