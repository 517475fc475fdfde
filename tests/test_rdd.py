"""RDD: the inner weights and the region losses against hand values / a plain loop, the bilateral regions, the
module's gradients and teacher cache, and the recipe on the one Trainer (tiny run, exact resume, one-line errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.methods.rdd import (
    RDDArgs,
    RDDModule,
    channel_softmax,
    inner_weights,
    peak_regions,
    rdd_losses,
    region_features,
    region_rois,
)
from kdforge.tasks.detection.roi import roi_align
from kdforge.tasks.pointcloud.models import DetectorConfig, build_detector
from kdforge.tasks.pointcloud.scenes import SceneSpec, procedural_scenes
from kdforge.tasks.pointcloud.task import BEVBatch, SceneSplit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/rdd.yaml"
TINY = ["data.num_train=8", "data.num_test=4", "data.max_objects=4", "teacher.loop.epochs=1",
        "teacher.loop.batch_size=4", "teacher.model={voxel: 1.0, cell: 1.0, pfn: 8, width: 8, depth: 2, head: 8}",
        "model={voxel: 2.0, cell: 1.0, pfn: 4, width: 4, depth: 2, head: 4}", "train.epochs=1", "train.batch_size=4",
        "rdd.score_threshold=0.05", "trainer.threads=1"]


def test_inner_weights_hand_case() -> None:
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.1, 0.3])
    scene = torch.tensor([0, 0, 0, 1, 2, 2])
    # scene means 2, 4, 0.2 -> d~ = 0.5, 1, 1.5 | 1 | 0.5, 1.5; m = 1[d~ > lam]
    assert inner_weights(d, scene, 0.9).tolist() == [0, 1, 1, 1, 0, 1]
    assert inner_weights(d, scene, 0.0).tolist() == [1] * 6                  # lam 0 weights every pair
    assert inner_weights(d, scene, 1.6).tolist() == [0] * 6                  # too large a lam selects nothing
    g = d.clone().requires_grad_(True)
    assert not inner_weights(g, scene, 0.5).requires_grad                   # the inner problem carries no gradient


def test_channel_softmax_hand_case() -> None:
    r = torch.tensor([[[[0.0]], [[4.0 * math.log(3)]]]])           # (1, 2, 1, 1), tau 4 -> softmax(0, ln 3) = 1/4, 3/4
    assert torch.allclose(channel_softmax(r, 4.0).flatten(), torch.tensor([0.25, 0.75]))


def _loop_losses(f_s, f_t, p_s, p_t, rois, scene, batch, tau, lam, roi):
    """RDD's terms by plain loops over scenes and pairs (RoIAlign from the detection package)."""
    feat_total, logit_total, active = 0.0, 0.0, []
    for b in range(batch):
        pairs = [i for i in range(len(rois)) if int(scene[i]) == b]
        if not pairs:
            continue
        ds, ls = [], []
        for i in pairs:
            rs = roi_align(f_s, rois[i:i + 1], roi, sampling_ratio=1)[0]
            rt = roi_align(f_t, rois[i:i + 1], roi, sampling_ratio=1)[0]
            ns = torch.exp(rs / tau) / torch.exp(rs / tau).sum(0, keepdim=True)
            nt = torch.exp(rt / tau) / torch.exp(rt / tau).sum(0, keepdim=True)
            ds.append(float(((ns - nt) ** 2).sum().sqrt()))
            qs = roi_align(p_s, rois[i:i + 1], roi, sampling_ratio=1)[0]
            qt = roi_align(p_t, rois[i:i + 1], roi, sampling_ratio=1)[0]
            ls.append(float((qs - qt).abs().sum(0).mean()))
        mean = sum(ds) / len(ds)
        m = [1.0 if x / mean > lam else 0.0 for x in ds]
        active += m
        feat_total += sum(mi * x for mi, x in zip(m, ds)) / len(pairs)
        logit_total += sum(mi * x for mi, x in zip(m, ls)) / len(pairs)
    return feat_total / batch, logit_total / batch, sum(active) / len(active)


def test_region_features_equal_roi_align_with_one_sample_per_bin() -> None:
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 4, 7, 9, generator=g, requires_grad=True)
    xy = torch.rand(11, 2, generator=g) * torch.tensor([11.0, 9.0]) - 1.5       # some boxes leave the map
    wh = torch.rand(11, 2, generator=g) * 4 + 0.5
    rois = torch.cat([torch.tensor([0, 2, 2, 0, 1, 2, 0, 0, 2, 2, 0.0])[:, None], xy, xy + wh], 1)
    for size in (1, 3):
        want = roi_align(feats, rois, size, spatial_scale=1.0, sampling_ratio=1)
        got = region_features(feats, rois, size, 1.0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    region_features(feats, rois, 2, 1.0).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert region_features(feats, torch.zeros(0, 5), 3, 1.0).shape == (0, 4, 3, 3)


def test_rdd_losses_match_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(3, 5, 8, 8, generator=g).double(), 3 * torch.randn(3, 5, 8, 8, generator=g).double()
    p_s, p_t = torch.rand(3, 2, 8, 8, generator=g).double(), torch.rand(3, 2, 8, 8, generator=g).double()
    regions = [torch.tensor([[0.0, 0.0, 2.0, 3.0], [4.0, 4.0, 7.5, 6.0], [1.0, 5.0, 3.0, 8.0]]),
               torch.zeros(0, 4), torch.tensor([[2.0, 2.0, 4.0, 4.0], [5.0, 1.0, 8.0, 3.0]])]
    rois, scene = region_rois(regions, extent=0.0)
    rois = rois.double()
    for lam in (0.1, 0.95):
        feat, logit, stats = rdd_losses(f_s, f_t, p_s, p_t, rois, scene, 3, 1.0, 4.0, lam, 2)
        want_feat, want_logit, want_active = _loop_losses(f_s, f_t, p_s, p_t, rois, scene, 3, 4.0, lam, 2)
        assert float(feat) == pytest.approx(want_feat, rel=1e-9)
        assert float(logit) == pytest.approx(want_logit, rel=1e-9)
        assert float(stats["active"]) == pytest.approx(want_active)
    assert float(stats["active"]) < 1.0          # lam 0.95 drops the low-disparity pairs
    uniform, _, s2 = rdd_losses(f_s, f_t, p_s, p_t, rois, scene, 3, 1.0, 4.0, 0.95, 2, weighting="uniform")
    assert float(s2["active"]) == 1.0 and float(uniform) > float(feat)
    empty, _, _ = rdd_losses(f_s, f_t, p_s, p_t, torch.zeros(0, 5).double(), torch.zeros(0, dtype=torch.long), 3,
                             1.0, 4.0, 0.1, 2)
    assert float(empty) == 0.0


def test_peak_regions_are_the_decoded_boxes_extent() -> None:
    heat = torch.full((1, 2, 8, 8), -10.0)
    heat[0, 1, 2, 5] = 5.0              # class 1 peak at row 2 (y), column 5 (x)
    reg = torch.zeros(1, 8, 8, 8)
    reg[0, :, 2, 5] = torch.tensor([0.5, 0.5, 0.0, math.log(4.0), math.log(1.0), 0.0, 0.0, 1.0])   # l 4, w 1, yaw 0
    regions = peak_regions({"heatmap": heat, "reg": reg}, extent=4.0, cell=1.0, top_k=10, score_threshold=0.1,
                           min_region=2.0)
    # centre x = -4 + 5.5 = 1.5, y = -4 + 2.5 = -1.5; extent 4 x 1, the width widened to min_region 2
    assert torch.allclose(regions[0], torch.tensor([[-0.5, -2.5, 3.5, -0.5]]), atol=1e-5)
    rois, scene = region_rois(regions, 4.0)
    assert torch.allclose(rois, torch.tensor([[0.0, 3.5, 1.5, 7.5, 3.5]]), atol=1e-5) and scene.tolist() == [0]


def _module(args: RDDArgs) -> tuple[RDDModule, SceneSplit]:
    torch.manual_seed(0)
    teacher = build_detector(3, 8.0, DetectorConfig(voxel=0.5, cell=1.0, pfn=8, width=16, depth=2, head=8))
    student = build_detector(3, 8.0, DetectorConfig(voxel=1.0, cell=1.0, pfn=4, width=4, depth=2, head=4))
    split = SceneSplit(procedural_scenes(SceneSpec(extent=8.0, max_objects=3), 6, 0), 3, 8.0, 1.0)
    module = RDDModule(student, teacher.requires_grad_(False), args)
    module.bind_training_data(split)
    return module, split


def _batch(split: SceneSplit, idx: list[int]) -> BEVBatch:
    points, scene = split.inputs(idx)
    t = torch.tensor(idx)
    return BEVBatch(points, scene, len(idx), split.heat[t], split.reg[t], split.mask[t], t)


def test_module_terms_gradients_and_teacher_cache() -> None:
    module, split = _module(RDDArgs(score_threshold=0.0, top_k=5))
    batch = _batch(split, [4, 1, 2])
    step = module(batch)
    assert set(step.losses) == {"heatmap", "box", "rdd_feat", "rdd_logit"}
    assert step.groups["rdd_feat"] == "distill" and step.groups["heatmap"] == "task"
    assert float(step.extras["rdd_pairs"]) == 3 * 2 * 5        # top-5 teacher + top-5 student peaks per scene
    step.total().backward()
    assert module.adapter[0].weight.grad is not None and module.adapter[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teachers.parameters())
    params = {id(p) for p in module.trainable_parameters()}
    assert id(module.adapter[0].weight) in params and not any(id(p) in params for p in module.teachers.parameters())
    cached = module.teacher_outputs(batch)
    direct = module.teacher(batch.points, batch.batch, batch.size)
    for k in ("neck", "heatmap", "reg"):
        torch.testing.assert_close(cached[k], direct[k], atol=1e-5, rtol=1e-5)
    assert not any("cache" in k for k in module.checkpoint_state())
    plain, _ = _module(RDDArgs(alpha_feat=0.0, alpha_logit=0.0))
    assert set(plain(batch).losses) == {"heatmap", "box"} and plain.adapter is None


def test_rdd_recipe_trains_reports_and_resumes(tmp_path: Path) -> None:
    result = assert_resume_exact(RECIPE, [*TINY, "train.epochs=2"], tmp_path, stop_after=3)
    assert (tmp_path / "full/stages/teacher/result.json").is_file()
    assert {"test_bev_ap", "teacher_test_bev_ap", "disparity_p90", "feat_disparity_mean"} <= set(result)
    header = (tmp_path / "full/metrics.csv").read_text().splitlines()[0]
    assert "train_rdd_feat" in header and "train_rdd_active" in header and "train_rdd_pairs" in header
    import csv

    rows = list(csv.DictReader((tmp_path / "full/metrics.csv").open()))
    assert all(0 < float(r["train_rdd_active"]) <= 1 and float(r["train_rdd_pairs"]) >= 1 for r in rows)
    assert (tmp_path / "full/predictions.png").is_file()
    from kdforge.methods.catalog import SEED_METHODS
    from kdforge.registry import METHODS

    assert "rdd" in SEED_METHODS and "rdd" in METHODS


def test_no_kd_student_reuses_the_teacher_run_for_diagnostics_only(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    assert main(["train", str(RECIPE), *TINY, "teacher_only=true", "--out", str(teacher)]) == 0
    out = tmp_path / "no_kd"
    assert main(["train", str(RECIPE), *TINY, "rdd.alpha_feat=0", "rdd.alpha_logit=0", f"teacher.run={teacher}",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert "disparity_p50" in result and "feat_disparity_mean" not in result and not (out / "stages").exists()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "rdd" not in header
    bad = tmp_path / "other"
    assert main(["train", str(RECIPE), *TINY, "data.seed=3", f"teacher.run={teacher}", "--out", str(bad)]) == 2


def test_bad_rdd_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("rdd.tau=0", "rdd.tau > 0"), ("rdd.lam=-1", "must be >= 0"),
                              ("rdd.weighting=soft", "rdd.weighting must be rdd or uniform"),
                              ("rdd.lamda=0.2", "lamda"), ("model.cell=0.5", "model.cell and teacher.model.cell"),
                              ("data.categories=[truck]", "scene categories"),
                              ("teacher.run=/nonexistent", "holds no finished run")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
