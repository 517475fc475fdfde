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
