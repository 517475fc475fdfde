"""PointDC: masked normalised MSE, super-voxel pseudo-labels, back-projection, teachers, the recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.cli import main
from kdforge.methods.pointdc import (
    PointDCData,
    PrototypeTeacher,
    TeacherSpec,
    back_project,
    back_project_views,
    build_data,
    cmd_loss,
    cosine_logits,
    pseudo_labels,
)
from kdforge.methods.pointdc import SuperVoxelSpec as SV

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/pointdc.yaml"
TINY = ["data.num_train=4", "data.num_test=2", "data.cameras=3", "data.fov=120", "data.width=32", "data.height=16",
        "data.max_objects=4", "teacher.steps=3", "teacher.dim=4", "model.width=8", "model.out=6", "cmd.epochs=2",
        "cmd.batch_size=2", "svc.epochs=3", "svc.batch_size=2", "pointdc.warmup_epochs=1",
        "pointdc.recluster_every=1", "eval.fit_points=500", "eval.kmeans_init=1", "trainer.threads=1"]


def test_cmd_loss_matches_a_hand_loop():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    t[[1, 4]] = 0.0                                            # no target
    loss, n = cmd_loss(s, t)
    total, count = 0.0, 0
    for i in range(7):
        if float(t[i].abs().sum()) == 0:
            continue
        a, b = s[i] / s[i].norm(), t[i] / t[i].norm()
        for d in range(3):
            total += float(a[d] - b[d]) ** 2
            count += 1
    assert int(n) == 5 and float(loss) == pytest.approx(total / count, rel=1e-5)
    zero, n0 = cmd_loss(s, torch.zeros_like(t))
    assert float(zero) == 0.0 and int(n0) == 0


def test_cosine_logits_and_pseudo_labels_match_plain_math():
    f = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 3.0], [0.1, 1.0], [-1.0, 0.0], [-2.0, -0.2]])
    w = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    logits = cosine_logits(f, w, 3.0)
    assert logits[2].tolist() == pytest.approx([0.0, 3.0]) and logits[0].tolist() == pytest.approx([3.0, 0.0])
    sv = torch.tensor([0, 0, 1, 1, 2, 2])
    labels, centroids = pseudo_labels(f, sv, 3, seed=0)
    # every point takes its super-voxel's label; the three super-voxels point three different ways
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5]
    assert len(labels.unique()) == 3
    means = torch.stack([F.normalize(F.normalize(f[sv == s], dim=1).mean(0), dim=0) for s in range(3)])
    for s in range(3):
        assert int((means[s] @ centroids.T).argmax()) == int(labels[2 * s])


def test_back_project_reads_the_pixel_feature_and_zeroes_the_unseen():
    V, C, H, W = 2, 3, 4, 6
    feats = torch.arange(V * C * H * W, dtype=torch.float32).reshape(V, C, H, W)
    view = torch.tensor([0, 1, 1, 0])
    uv = torch.tensor([[2, 1], [5, 3], [0, 0], [0, 0]])          # (col, row)
    visible = torch.tensor([True, True, True, False])
    out = back_project(feats, view, uv, visible, H, W)
    assert out[0].tolist() == feats[0, :, 1, 2].tolist()
    assert out[1].tolist() == feats[1, :, 3, 5].tolist()
    assert out[2].tolist() == feats[1, :, 0, 0].tolist()
    assert out[3].tolist() == [0.0, 0.0, 0.0]
    half = back_project(torch.ones(V, C, H // 2, W // 2) * 2.5, view, uv, visible, H, W)   # coarser map: bilinear
    assert half[:3].flatten().tolist() == pytest.approx([2.5] * 9)


def test_multi_view_targets_are_the_mean_over_the_views_that_see_the_point():
    V, C, H, W = 3, 2, 4, 6
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(V, C, H, W, generator=g) + 0.1                  # no zero feature anywhere
    feats[2, :, :2, :2] = 0.0                                         # view 2, top-left pixels: no feature (sky)
    # points: 0 seen by views 0 and 2; 1 by view 1 only; 2 by none; 3 by all three; 4 by views 1 and 2, but
    # view 2's pixel has no feature
    visible = torch.tensor([[True, False, False, True, False],
                            [False, True, False, True, True],
                            [True, False, False, True, True]])
    uv = torch.zeros(V, 5, 2, dtype=torch.long)
    uv[0, 0], uv[2, 0] = torch.tensor([1, 2]), torch.tensor([5, 3])
    uv[1, 1] = torch.tensor([4, 0])
    uv[0, 3], uv[1, 3], uv[2, 3] = torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([3, 3])
    uv[1, 4], uv[2, 4] = torch.tensor([5, 1]), torch.tensor([0, 0])
    out, n = back_project_views(feats, uv, visible, H, W)

    def px(v, p):                                                    # (col, row) -> the feature, by hand
        c, r = uv[v, p].tolist()
        return feats[v, :, r, c]

    assert n.tolist() == [2, 1, 0, 3, 1]
    assert torch.allclose(out[0], (px(0, 0) + px(2, 0)) / 2)
    assert torch.allclose(out[1], px(1, 1))
    assert out[2].tolist() == [0.0, 0.0]
    assert torch.allclose(out[3], (px(0, 3) + px(1, 3) + px(2, 3)) / 3)
    assert torch.allclose(out[4], px(1, 4))                           # the featureless view does not count
    first, n1 = back_project_views(feats, uv, visible, H, W, average=False)   # the old behaviour: first view
    assert n1.tolist() == [1, 1, 0, 1, 1]
    for p, v in ((0, 0), (1, 1), (3, 0), (4, 1)):
        assert torch.allclose(first[p], px(v, p))
    assert first[2].tolist() == [0.0, 0.0]
    assert not torch.allclose(out[0], first[0])


def test_scene_targets_average_every_seeing_view_or_take_the_first():
    from kdforge.tasks.pointcloud.cameras import camera_rig, render_views, visibility
    from kdforge.tasks.pointcloud.scenes import procedural_scenes, semantic_names

    d = PointDCData(num_train=1, num_test=1, cameras=4, fov=120, width=32, height=16, max_objects=4, seed=3)
    t = TeacherSpec(kind="prototype", dim=4, noise=0.2)
    avg, _, info = build_data(d, t, SV(), False)
    first, _, info1 = build_data(PointDCData(**{**d.__dict__, "views_average": False}), t, SV(), False)
    assert 0 < info["target_fraction_multiview"] == info1["target_fraction_multiview"] < 1
    # an independent recomputation for the training scene: the teacher is seeded per call, so re-render and
    # re-draw its features in the same order (one call per scene) and average by hand at the integer pixel centres
    spec = d.spec()
    scene = procedural_scenes(spec, 1, d.seed)[0]
    views = render_views(scene, camera_rig(4, 120, 32, 16, d.pitch), spec, seed=d.seed * 100003)
    feats = PrototypeTeacher(len(semantic_names(spec)), t).features(views.rgb, views.semantic)
    uv, seen = visibility(scene.points.float(), views, d.tolerance)
    multi = 0
    for p in range(len(scene.points)):
        vals = [feats[v, :, uv[v, p, 1], uv[v, p, 0]] for v in range(4) if seen[v, p]]
        vals = [x for x in vals if float(x.abs().sum()) > 0]
        if not vals:
            assert avg.targets[0][p].abs().sum() == 0
            continue
        multi += len(vals) > 1
        assert torch.allclose(avg.targets[0][p], torch.stack(vals).mean(0), atol=1e-5)
        first_v = int(seen[:, p].float().argmax())
        want = feats[first_v, :, uv[first_v, p, 1], uv[first_v, p, 0]]
        assert torch.allclose(first.targets[0][p], want, atol=1e-5)
    assert multi > 0


def test_prototype_teacher_is_the_class_embedding_plus_noise():
    sem = torch.tensor([[[0, 1], [-1, 2]]])
    t = PrototypeTeacher(3, TeacherSpec(kind="prototype", dim=4, noise=0.0))
    f = t.features(torch.zeros(1, 3, 2, 2), sem)
    assert f.shape == (1, 4, 2, 2)
    assert f[0, :, 0, 1].tolist() == pytest.approx(t.protos[1].tolist())
    assert f[0, :, 1, 0].abs().sum() == 0                         # sky: no feature
    noisy = PrototypeTeacher(3, TeacherSpec(kind="prototype", dim=4, noise=0.3)).features(torch.zeros(1, 3, 2, 2), sem)
    assert not torch.allclose(noisy, f)


def test_targets_are_visible_features_averaged_within_super_voxels():
    d = PointDCData(num_train=2, num_test=1, cameras=3, fov=120, width=32, height=16, max_objects=4, seed=3)
    t = TeacherSpec(kind="prototype", dim=4, noise=0.2)
    plain, _, info = build_data(d, t, SV(), False)
    pooled, _, info2 = build_data(d, t, SV(), True)
    assert 0 < info["target_fraction_point"] == info["target_fraction"] <= info2["target_fraction"] <= 1
    assert info["target_fraction_point"] <= info["target_fraction_visible"]
    for i in range(2):
        vis, tgt = plain.seen[i], plain.targets[i]
        assert bool((tgt[~plain.visible[i]] == 0).all()) and bool((tgt[vis].abs().sum(1) > 0).all())
        sv = pooled.sv[i]
        for s in sv[vis].unique().tolist()[:20]:                 # pooled target = mean of the visible points' ones
            members = sv == s
            want = tgt[members & vis].mean(0)
            assert torch.allclose(pooled.targets[i][members], want.expand(int(members.sum()), -1), atol=1e-5)


def test_full_recipe_trains_both_stages_reports_and_resumes(tmp_path: Path):
    from recipe_checks import assert_resume_exact

    result = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=5)    # inside the SVC stage (cmd: 4 steps)
    assert {"test_miou", "test_miou_point", "test_miou_supervoxel", "teacher_miou", "raw_miou_targeted",
            "target_fraction", "cmd_test_miou"} <= set(result)
    assert 0 <= result["test_miou"] <= 100 and 0 < result["target_fraction"] <= 1
    assert (tmp_path / "full/stages/cmd/result.json").is_file() and (tmp_path / "full/predictions.png").is_file()
    header = (tmp_path / "full/metrics.csv").read_text().splitlines()[0]
    assert "train_svc" in header and "train_pseudo_agree" in header
    assert "train_cmd" in (tmp_path / "full/stages/cmd/metrics.csv").read_text()
    from kdforge.methods.catalog import SEED_METHODS
    from kdforge.registry import METHODS

    assert "pointdc" in SEED_METHODS and "pointdc" in METHODS


def test_raw_and_cmd_arms_and_cmd_run_reuse(tmp_path: Path):
    raw, cmd, full = tmp_path / "raw", tmp_path / "cmd", tmp_path / "full"
    assert main(["train", str(RECIPE), *TINY, "pointdc.mode=raw", "--out", str(raw)]) == 0
    assert main(["train", str(RECIPE), *TINY, "pointdc.mode=cmd", "--out", str(cmd)]) == 0
    assert main(["train", str(RECIPE), *TINY, f"pointdc.cmd_run={cmd}", "--out", str(full)]) == 0
    r_raw, r_cmd, r_full = (json.loads((p / "result.json").read_text()) for p in (raw, cmd, full))
    assert r_raw["steps"] == 1 and r_raw["stage"] == "raw" and r_cmd["stage"] == "cmd"
    assert not (full / "stages").exists() and r_full["cmd_test_miou"] == r_cmd["test_miou"]
    # the raw arm's k-means is on the inputs: the same for any seed
    assert main(["train", str(RECIPE), *TINY, "pointdc.mode=raw", "seed=1", "--out", str(tmp_path / "raw1")]) == 0
    assert json.loads((tmp_path / "raw1/result.json").read_text())["test_miou_point"] == pytest.approx(
        r_raw["test_miou_point"], abs=5.0)
    other = tmp_path / "other"
    assert main(["train", str(RECIPE), *TINY, "model.width=4", f"pointdc.cmd_run={cmd}", "--out", str(other)]) == 2


def test_bad_pointdc_recipes_fail_in_one_line(tmp_path: Path, capsys):
    out = tmp_path / "run"
    for override, message in (("pointdc.mode=half", "pointdc.mode must be raw, cmd or full"),
                              ("teacher.kind=dino", "teacher.kind must be autoencoder or prototype"),
                              ("pointdc.supervoxel.voxel=0", "pointdc.supervoxel needs voxel > 0"),
                              ("pointdc.scale=0", "scale > 0"),
                              ("pointdc.mode=cmd pointdc.cmd_run=/x", "only read by mode full"),
                              ("pointdc.cmd_run=/nonexistent", "holds no finished run"),
                              ("eval.level=scene", "eval.level must be"),
                              ("model.pillar_blocks=[true]", "pillar_blocks"),
                              ("pointdc.clusters=3", "clusters")):
        assert main(["train", str(RECIPE), *TINY, *override.split(), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
