"""DistillBEV: region masks and adaptive scales against hand cases, the loss against a plain loop, the false-positive
regions, the module (adapters trained, teacher frozen and cached) and the recipe on the one Trainer (tiny run, exact
resume, one-line errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.losses.distillbev import (
    box_masks,
    distillbev_terms,
    false_positive_mask,
    plain_mse,
    region_masks,
)
from kdforge.methods.distillbev import DistillBEVArgs, DistillBEVModule
from kdforge.tasks.pointcloud.camera_bev import CameraBEVDetector, CameraBEVTask, CameraConfig, lidar_taps
from kdforge.tasks.pointcloud.models import DetectorConfig, build_detector
from kdforge.tasks.pointcloud.scenes import SceneSpec, procedural_scenes
from kdforge.train.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/distillbev.yaml"
CAM = ("camera={views: 2, fov: 90.0, width: 16, height: 8, stride: 4, image_width: 4, image_depth: 2, "
       "depth_bins: 6, depth_weight: 0.5}")
TINY = ["data.num_train=6", "data.num_test=3", "data.max_objects=3", "data.extent=8.0", "teacher.loop.epochs=1",
        "teacher.loop.batch_size=3", "teacher.model={voxel: 1.0, cell: 1.0, pfn: 4, width: 8, depth: 2, head: 8}",
        "model={voxel: 2.0, cell: 1.0, pfn: 4, width: 4, depth: 2, head: 4}", CAM, "train.epochs=2",
        "train.batch_size=3", "trainer.threads=1"]


def test_box_masks_hand_case_and_axis_order() -> None:
    # grid 8 x 8 over [-4, 4]: cell (iy, ix) centre (-3.5 + ix, -3.5 + iy)
    fg, scale = box_masks(torch.tensor([[0.5, 0.5, 0.0, 2.2, 1.2, 1.5, 0.0]]), 4.0, 1.0, 8)
    assert fg.nonzero().tolist() == [[4, 3], [4, 4], [4, 5]]                 # along x = along columns
    assert torch.allclose(scale[4, 3:6], torch.full((3,), math.sqrt(1 / (2.2 * 1.2))))
    assert float(scale.sum()) == pytest.approx(3 * math.sqrt(1 / (2.2 * 1.2)), rel=1e-6)
    fg, _ = box_masks(torch.tensor([[0.5, 0.5, 0.0, 2.2, 1.2, 1.5, math.pi / 2]]), 4.0, 1.0, 8)
    assert fg.nonzero().tolist() == [[3, 4], [4, 4], [5, 4]]                 # turned 90 degrees: along rows (y)
    # two overlapping boxes: the shared cell takes the first box's scale
    fg, scale = box_masks(torch.tensor([[0.5, 0.5, 0.0, 2.2, 1.2, 1.5, 0.0], [1.5, 0.5, 0.0, 1.1, 1.1, 1.5, 0.0]]),
                          4.0, 1.0, 8)
    assert float(scale[4, 5]) == pytest.approx(math.sqrt(1 / (2.2 * 1.2))) and int(fg.sum()) == 3
    fg, bg, s = region_masks([torch.tensor([[0.5, 0.5, 0.0, 2.2, 1.2, 1.5, 0.0]]), torch.zeros(0, 7)], 4.0, 1.0, 8)
    assert fg.shape == (2, 1, 8, 8) and float(bg[0].sum()) == 61 and float(bg[1].sum()) == 64
    assert float(s[0, 0, 0, 0]) == pytest.approx(1 / 61) and float(s[1].max()) == pytest.approx(1 / 64)
    assert float(s[0, 0, 4, 4]) == pytest.approx(math.sqrt(1 / (2.2 * 1.2)))  # max(S_fg, S_bg)


def _loop_terms(f_s, f_t, fg, bg, scale, w, t_sp, t_ch, conv):
    """The card's equations by plain loops over scenes, channels and cells."""
    B, C, H, W = f_s.shape
    fg_sum = bg_sum = ch_sum = sp_sum = 0.0
    for b in range(B):
        m = [[sum(abs(float(f_t[b, c, i, j])) for c in range(C)) / C for j in range(W)] for i in range(H)]
        z = sum(math.exp(m[i][j] / t_sp) for i in range(H) for j in range(W))
        a_sp = [[H * W * math.exp(m[i][j] / t_sp) / z for j in range(W)] for i in range(H)]
        mc = [sum(abs(float(f_t[b, c, i, j])) for i in range(H) for j in range(W)) / (H * W) for c in range(C)]
        zc = sum(math.exp(x / t_ch) for x in mc)
        a_ch = [C * math.exp(x / t_ch) / zc for x in mc]
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    e = (float(f_s[b, c, i, j]) - float(f_t[b, c, i, j])) ** 2 * a_sp[i][j] * a_ch[c]
                    fg_sum += e * float(fg[b, 0, i, j] * scale[b, 0, i, j])
                    bg_sum += e * float(bg[b, 0, i, j] * scale[b, 0, i, j])
            ch_sum += abs(float(f_t[b, c].mean()) - float(f_s[b, c].mean()))
        with torch.no_grad():
            conv_s = conv(f_s[b:b + 1].mean(1, keepdim=True))[0, 0]
        sp_sum += sum(abs(float(f_t[b, :, i, j].mean()) - float(conv_s[i, j])) for i in range(H) for j in range(W))
    return {"fg": w[0] * fg_sum / B, "bg": w[1] * bg_sum / B, "ch": w[2] * ch_sum / B, "sp": w[3] * sp_sum / B}


def test_distillbev_terms_match_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = 2 * torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    boxes = [torch.tensor([[0.0, 0.0, 0, 2.0, 1.0, 1, 0.3]]), torch.tensor([[1.0, -1.0, 0, 1.0, 1.0, 1, 0.0]])]
    fg, bg, scale = region_masks(boxes, 2.5, 1.0, 5)
    fg, bg, scale = fg[:, :, :4].double(), bg[:, :, :4].double(), scale[:, :, :4].double()    # a 4 x 5 map
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    w = (1.5e-3, 4e-2, 0.25, 2.5e-3)
    got = distillbev_terms(f_s, f_t, fg, bg, scale, w_fg=w[0], w_bg=w[1], w_ch=w[2], w_sp=w[3], t_sp=0.5, t_ch=0.7,
                           spatial_conv=conv)
    want = _loop_terms(f_s.detach(), f_t, fg, bg, scale, w, 0.5, 0.7, conv)
    assert set(got) == set(want)
    for k in want:
        assert float(got[k].detach()) == pytest.approx(want[k], rel=1e-9), k
    sum(got.values()).backward()
    assert f_s.grad.abs().sum() > 0
    off = distillbev_terms(f_s, f_t, fg, bg, scale, w_fg=1.0, w_bg=1.0, w_ch=1.0, w_sp=1.0, t_sp=0.5, t_ch=0.5,
                           spatial_conv=conv, use_spatial=False, use_channel=False)
    err = ((f_s - f_t) ** 2).detach()
    assert set(off) == {"fg", "bg"}
    assert float((off["fg"] + off["bg"]).detach()) == pytest.approx(float((err * scale).sum() / 2), rel=1e-9)
    assert float(plain_mse(f_s, f_t, 0.1).detach()) == pytest.approx(0.1 * float(err.sum()) / (2 * 4 * 5), rel=1e-9)


def test_false_positive_regions_hand_case() -> None:
    teacher = torch.zeros(1, 2, 6, 6)
    teacher[0, 0, 1, 1:4] = 0.9              # a 3-cell component
    teacher[0, 1, 4, 4] = 0.8                # a 1-cell component (another class: the class max counts)
    teacher[0, 0, 5, 0] = 0.9                # where the GT heatmap is high: not a false positive
    teacher[0, 1, 0, 5] = 0.9                # inside the foreground: not a false positive
    gt = torch.zeros(1, 2, 6, 6)
    gt[0, 1, 5, 0] = 0.6
    fg = torch.zeros(1, 6, 6)
    fg[0, 0, 5] = 1
    fp, s = false_positive_mask(gt, teacher, fg, 0.5, 0.5, "dfs")
    assert fp[0].nonzero().tolist() == [[1, 1], [1, 2], [1, 3], [4, 4]]
    assert torch.allclose(s[0][fp[0] > 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert float(s[0][fp[0] == 0].abs().sum()) == 0
    _, s_avg = false_positive_mask(gt, teacher, fg, 0.5, 0.5, "average")
    assert torch.allclose(s_avg[0][fp[0] > 0], torch.full((4,), 0.25))
    _, bg, scale = region_masks([torch.zeros(0, 7)], 3.0, 1.0, 6, fp)
    assert float(bg.sum()) == 32 and float(scale[0, 0, 0, 0]) == pytest.approx(1 / 32)


def _module(args: DistillBEVArgs, cache: bool = True) -> tuple[DistillBEVModule, CameraBEVTask]:
    torch.manual_seed(0)
    cam = CameraConfig(views=2, fov=90.0, width=16, height=8, stride=4, image_width=4, image_depth=2, depth_bins=6)
    teacher = build_detector(3, 8.0, DetectorConfig(voxel=0.5, cell=1.0, pfn=4, width=8, depth=2, head=8))
    student = CameraBEVDetector(3, 8.0, DetectorConfig(voxel=2.0, cell=1.0, pfn=4, width=4, depth=2, head=4), cam)
    spec = SceneSpec(extent=8.0, max_objects=3)
    scenes = procedural_scenes(spec, 6, 0)
    module = DistillBEVModule(student, teacher.requires_grad_(False), args)
    task = CameraBEVTask(module, scenes[:4], scenes[4:], ["car", "pedestrian", "cyclist"], 8.0, 3, 0, spec=spec,
                         cam=cam)
    if cache:
        task.build(torch.device("cpu"), DistEnv())
    return module, task


def test_module_terms_gradients_and_teacher_cache() -> None:
    module, task = _module(DistillBEVArgs(positions=["neck:neck", "lss:block1"], fp="teacher", w_fp=0.1,
                                          fp_threshold=0.01, fp_gt_threshold=0.5))
    batch = task.batch(0, 0, DistEnv())
    step = module(batch)
    names = {f"kd_{t}_{p}" for t in ("fg", "bg", "ch", "sp", "fp") for p in ("neck", "lss")}
    assert names <= set(step.losses) and step.groups["kd_fg_neck"] == "distill" and step.groups["heatmap"] == "task"
    step.total().backward()
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in module.adapters)
    assert module.spatial[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teachers.parameters())
    params = {id(p) for p in module.trainable_parameters()}
    assert id(module.adapters[0].weight) in params and not any(id(p) in params for p in module.teachers.parameters())
    cached = module.teacher_outputs(batch)
    direct = lidar_taps(module.teacher, batch.points, batch.batch, batch.size)
    assert set(cached) == {"neck", "block1", "heatmap"}
    for k in cached:
        torch.testing.assert_close(cached[k], direct[k], atol=1e-5, rtol=1e-5)
    assert not any("cache" in k for k in module.checkpoint_state())
    mse, task2 = _module(DistillBEVArgs(mode="mse"))
    assert {k for k in mse(task2.batch(0, 0, DistEnv())).losses} == {"heatmap", "box", "mse"}
    alone, task3 = _module(DistillBEVArgs(mode="none"))
    assert set(alone(task3.batch(0, 0, DistEnv())).losses) == {"heatmap", "box"} and len(alone.adapters) == 0


def test_kd_scale_normalisation_and_warmup_by_hand() -> None:
    """kd_scale, kd_norm and warmup rescale every KD term by the hand-computed factor; detection terms untouched."""
    base, task = _module(DistillBEVArgs())
    batch = task.batch(0, 2, DistEnv())             # 4 training scenes, batch 3: 1 step an epoch -> progress 2.0
    assert task.steps_per_epoch() == 1 and batch.progress == pytest.approx(2.0)
    ref = base(batch).losses
    kd = [k for k in ref if k.startswith("kd_")]
    det = float((ref["heatmap"] + ref["box"]).detach())
    kd_sum = float(sum(ref[k] for k in kd).detach())
    cases = ((DistillBEVArgs(kd_scale=0.3), 0.3), (DistillBEVArgs(kd_scale=0.5, warmup=4.0), 0.5 * 2.0 / 4.0),
             (DistillBEVArgs(kd_scale=0.5, warmup=1.5), 0.5),
             (DistillBEVArgs(kd_norm=True, kd_scale=0.2), 0.2 * det / kd_sum))
    for args, factor in cases:
        module, task_k = _module(args)
        got = module(task_k.batch(0, 2, DistEnv())).losses
        for k in ref:
            want = float(ref[k].detach()) * (factor if k in kd else 1.0)
            assert float(got[k].detach()) == pytest.approx(want, rel=1e-5), (args, k)
    module, task_k = _module(DistillBEVArgs(kd_norm=True, kd_scale=0.2))
    got = module(task_k.batch(0, 2, DistEnv())).losses
    kd_total = float(sum(got[k] for k in kd).detach())
    assert kd_total == pytest.approx(0.2 * det, rel=1e-5)                   # the KD sum is 0.2 x the detection loss
    mse, task_m = _module(DistillBEVArgs(mode="mse", kd_scale=0.1, warmup=2.0))
    ref_m, _ = _module(DistillBEVArgs(mode="mse"))
    b = task_m.batch(0, 1, DistEnv())
    want = 0.1 * 0.5 * float(ref_m(b).losses["mse"].detach())
    assert float(mse(b).losses["mse"].detach()) == pytest.approx(want, rel=1e-5)


def test_distillbev_recipe_trains_reports_and_resumes(tmp_path: Path) -> None:
    result = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=3)
    assert (tmp_path / "full/stages/teacher/result.json").is_file()
    assert {"test_bev_ap", "test_cd_ap", "teacher_test_bev_ap", "teacher_cd_ap", "imitation_fg_neck"} <= set(result)
    header = (tmp_path / "full/metrics.csv").read_text().splitlines()[0]
    assert all(f"train_kd_{k}" in header for k in ("fg", "bg", "ch", "sp")) and "train_depth" in header
    assert (tmp_path / "full/predictions.png").is_file() and (tmp_path / "full/predictions_views.png").is_file()
    from kdforge.methods.catalog import SEED_METHODS
    from kdforge.registry import METHODS

    assert "distillbev" in SEED_METHODS and "distillbev" in METHODS


def test_bad_distillbev_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("distill.mode=fgd", "distill.mode must be"),
                              ("distill.positions=[neck]", "student_tap:teacher_tap"),
                              ("distill.positions=['neck:block9']", "teacher taps"),
                              ("distill.t_sp=0", "temperatures"), ("distill.fp=student", "distill.fp must be"),
                              ("camera.stride=3", "stride must be"), ("camera.splat=max", "splat must be"),
                              ("data.format=kitti", "data.format kitti needs data.root"),
                              ("camera.fovv=3", "fovv"), ("distill.kd_scale=-1", "kd_scale"),
                              ("distill.warmup=-2", "warmup")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
