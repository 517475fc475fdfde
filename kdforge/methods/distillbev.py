"""DistillBEV (Wang et al., ICCV 2023): a LiDAR BEV teacher's features taught to a multi-camera BEV student.

A camera detector lifts image features into bird's-eye view with a guessed depth; a LiDAR detector's BEV
features carry the true geometry. DistillBEV trains the camera student's BEV features to imitate the
frozen LiDAR teacher's at one or more BEV positions, balanced so that background cells and large
objects do not swamp the signal (official `bevdet_distill.py::fgd_distill_loss`, card p26). Per position,
with F_S' = Conv1x1(F_S) (C_S -> C_T) and F_T the teacher's feature on the same grid:

    A_sp = H W softmax_hw(mean_c |F_T| / T_sp),  A_ch = C softmax_c(mean_hw |F_T| / T_ch)   (detached)
    M_fg = cells whose centre lies in a GT box (rotated test), M_bg = 1 - M_fg
    S    = max(S_fg, S_bg),  S_fg = sqrt(cell area / (l_k w_k)) in box k,  S_bg = 1 / N_bg
    L_fg = w_fg sum((F_S' - F_T)^2 M_fg S A_sp A_ch) / B,   L_bg likewise with w_bg, M_bg
    L_ch = w_ch sum_c |mean_hw F_T - mean_hw F_S'| / B,   L_sp = w_sp sum_hw |mean_c F_T - Conv3x3(mean_c F_S')| / B
    L    = L_det + sum_positions (L_fg + L_bg + L_ch + L_sp)

`distill.fp: teacher` adds the paper's false-positive region (teacher class-max probability >
`fp_threshold` where the GT heatmap is < `fp_gt_threshold`; its own weight w_fp, scale 1 / component
size ("dfs") or 1 / fp cells ("average"); the background loses those cells); off in the released configs
and here by default. `distill.mode: mse` is the plain full-map imitation arm (w_mse sum_c mean_hw
(F_S' - F_T)^2, the background term's scale with no regions, scaling or attention); `none` trains the
camera student alone (the paper's baseline).

Adapting to another scale (not in the paper, a practitioner's knobs, chosen on a development draw):
`distill.kd_scale` multiplies every KD term (the MSE arm's too), `distill.kd_norm` rescales the KD sum
to kd_scale x the detection loss (heatmap + box; the ratio is detached, so only the direction of the
KD gradient survives), and `distill.warmup` ramps the KD terms linearly from 0 over that many epochs
(the batch's `progress`). Defaults (1, false, 0) are the released behaviour.

Positions (`distill.positions`, "student_tap:teacher_tap"): student taps `lss` (the view transformer's
splatted BEV), `block1..`, `neck` (fed to the head: the released config's "head" position); teacher
taps `block1..`, `neck` of the LiDAR pillar detector. A student feature on another grid is resampled
(bilinear) to the teacher's before the adapter's output is compared; masks and scales are computed on
the teacher's (distillation) grid. The default is the released CenterPoint -> BEVDepth config: one
position, neck -> neck, w_fg 1.5e-3, w_bg 4e-2, w_ch 0.25, w_sp 2.5e-3, T 0.5, fp off.

Deviations (documented): the teacher is the repo's pillar CenterPoint-style detector on procedural LiDAR
scenes, the student a Lift-Splat camera detector on their renderings (kdforge.tasks.pointcloud.camera_bev),
not BEVDepth4D on nuScenes (no temporal fusion, so the 4D-fused position does not exist); the foreground
test uses cell centres (the official code tests cell corners i * size + range_min); teacher outputs on the
fixed training scenes are cached once (identical values). The paper's fp-region and temporal variants are
not in the released configs.

Recipe (`configs/methods/distillbev.yaml`): the pointcloud `BEVRecipe` (data, model = the camera student's
BEV side, teacher, teacher_only, train, eval, seed) plus `camera:` (kdforge.tasks.pointcloud.camera_bev.
CameraConfig: rig, rendering, image CNN, depth bins, depth supervision) and `distill:` (DistillBEVArgs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.distillbev import distillbev_terms, false_positive_mask, plain_mse, region_masks
from kdforge.registry import METHODS
from kdforge.tasks.pointcloud.camera_bev import (
    CameraBEVBatch,
    CameraBEVDetector,
    CameraBEVModule,
    CameraBEVTask,
    CameraConfig,
)
from kdforge.tasks.pointcloud.models import BEVDetector
from kdforge.tasks.pointcloud.task import BEVDetectionTask, BEVRecipe, run_bev
from kdforge.train.stages import parse_recipe

__all__ = ["DistillBEVArgs", "DistillBEVModule", "DistillBEVRecipe"]


@dataclass
class DistillBEVArgs:
    mode: str = "distillbev"             # distillbev | mse | none
    positions: list[str] = field(default_factory=lambda: ["neck:neck"])     # student_tap:teacher_tap
    w_fg: float = 1.5e-3
    w_bg: float = 4e-2
    w_ch: float = 0.25
    w_sp: float = 2.5e-3
    t_sp: float = 0.5
    t_ch: float = 0.5
    spatial: bool = True                 # spatial attention + the spatial-mean term
    channel: bool = True                 # channel attention + the channel-mean term
    scale: bool = True                   # adaptive scaling S = max(S_fg, S_bg); false: every cell 1 / N_bg
    fp: str = "none"                     # none | teacher (false-positive regions)
    w_fp: float = 0.0
    fp_threshold: float = 0.3
    fp_gt_threshold: float = 0.3
    fp_scale: str = "dfs"                # dfs | average
    w_mse: float = 4e-2                  # mode mse
    cache_teacher: bool = True
    # adapting the released weights to another scale (not in the paper; all arms that distil, mse included):
    kd_scale: float = 1.0                # every KD term times this
    kd_norm: bool = False                # true: the KD sum rescaled to kd_scale x the detection loss (detached ratio)
    warmup: float = 0.0                  # epochs of linear KD warm-up from 0 (0: none)


@dataclass
class DistillBEVRecipe(BEVRecipe):
    method: str = "distillbev"
    camera: CameraConfig = field(default_factory=CameraConfig)
    distill: DistillBEVArgs = field(default_factory=DistillBEVArgs)


def _taps(positions: list[str]) -> list[tuple[str, str]]:
    return [tuple(p.split(":", 1)) for p in positions]          # type: ignore[misc]


class DistillBEVModule(CameraBEVModule):
    """Camera student + per-position 1x1 adapters and 3x3 spatial adapters (trained), frozen LiDAR teacher."""

    def __init__(self, student: CameraBEVDetector, teacher: BEVDetector | None, args: DistillBEVArgs) -> None:
        super().__init__(student, teacher)
        self.args = args
        self.distilling = teacher is not None and args.mode != "none"
        self.adapters = nn.ModuleList()
        self.spatial = nn.ModuleList()
        if self.distilling:
            for s_tap, _ in _taps(args.positions):
                c_s = student.encoder.channels if s_tap == "lss" else student.channels
                self.adapters.append(nn.Conv2d(c_s, teacher.channels, 1))
                self.spatial.append(nn.Conv2d(1, 1, 3, padding=1))
        self._stats: dict[str, Tensor] = {}

    def uses_teacher(self) -> bool:
        return self.distilling

    def teacher_keys(self) -> tuple[str, ...]:
        keys = {t for _, t in _taps(self.args.positions)}
        if self.args.fp != "none":
            keys.add("heatmap")
        return tuple(sorted(keys))

    def adapted(self, index: int, f_s: Tensor, size: tuple[int, int]) -> Tensor:
        if f_s.shape[-2:] != size:
            f_s = F.interpolate(f_s, size=size, mode="bilinear", align_corners=False)
        return self.adapters[index](f_s)

    def kd_factor(self, progress: float, det: Tensor, kd: Tensor) -> Tensor:
        """The factor on every KD term: kd_scale, times det / kd (detached) when kd_norm, times min(1, progress /
        warmup) when warming up."""
        a = self.args
        f = torch.tensor(a.kd_scale, device=kd.device)
        if a.kd_norm:
            f = f * det.detach() / kd.detach().clamp_min(1e-12)
        if a.warmup > 0:
            f = f * min(1.0, progress / a.warmup)
        return f

    def forward(self, batch: CameraBEVBatch):
        step = super().forward(batch)
        a = self.args
        kd_names = [k for k, g in step.groups.items() if g == "distill"]
        if kd_names and (a.kd_scale != 1.0 or a.kd_norm or a.warmup > 0):
            det = sum(step.losses[k].float() for k in ("heatmap", "box") if k in step.losses)
            kd = sum(step.losses[k].float() for k in kd_names)
            f = self.kd_factor(batch.progress, det, kd)
            for k in kd_names:
                step.losses[k] = step.losses[k] * f
        return step

    def extra_losses(self, batch: CameraBEVBatch, student: dict[str, Tensor], teacher: dict[str, Tensor] | None
                     ) -> dict[str, Tensor]:
        if not self.distilling or teacher is None:
            return {}
        a, extent = self.args, self.student.extent
        out: dict[str, Tensor] = {}
        for i, (s_tap, t_tap) in enumerate(_taps(a.positions)):
            f_t = teacher[t_tap]
            g = f_t.shape[-1]
            f_s = self.adapted(i, student[s_tap], tuple(f_t.shape[-2:]))
            suffix = "" if len(a.positions) == 1 else f"_{s_tap}"
            if a.mode == "mse":
                out[f"mse{suffix}"] = plain_mse(f_s, f_t, a.w_mse)
                continue
            fp = fp_scale = None
            if a.fp != "none":
                fg0, _, _ = region_masks(batch.boxes, extent, 2 * extent / g, g)
                heat = teacher["heatmap"].sigmoid()
                gt = batch.heat
                if heat.shape[-1] != g:
                    heat = F.interpolate(heat, size=(g, g), mode="nearest")
                    gt = F.interpolate(gt, size=(g, g), mode="nearest")
                fp, fp_scale = false_positive_mask(gt, heat, fg0[:, 0].to(gt.device), a.fp_threshold,
                                                   a.fp_gt_threshold, a.fp_scale)
            fg, bg, scale = region_masks(batch.boxes, extent, 2 * extent / g, g, fp)
            fg, bg, scale = fg.to(f_s.device), bg.to(f_s.device), scale.to(f_s.device)
            if not a.scale:
                scale = (1.0 / bg.flatten(1).sum(1).clamp_min(1))[:, None, None, None].expand_as(scale)
            terms = distillbev_terms(f_s, f_t, fg, bg, scale, w_fg=a.w_fg, w_bg=a.w_bg, w_ch=a.w_ch, w_sp=a.w_sp,
                                     t_sp=a.t_sp, t_ch=a.t_ch, spatial_conv=self.spatial[i], use_spatial=a.spatial,
                                     use_channel=a.channel, fp=fp, fp_scale=fp_scale, w_fp=a.w_fp)
            out.update({f"kd_{k}{suffix}": v for k, v in terms.items()})
        return out

    @torch.no_grad()
    def report(self, task: BEVDetectionTask) -> dict[str, Any]:
        """The teacher's centre-distance AP on the test scenes (`teacher_cd_ap`) and, for a distilled student, the mean
        squared imitation error of the adapted student per foreground / background cell at each position."""
        if self.teacher is None or not isinstance(task, CameraBEVTask):
            return {}
        was = self.training
        self.eval()
        out: dict[str, Any] = {"teacher_cd_ap": task.centre_ap(self.teacher, "test")["cd_ap"]}
        if self.distilling:
            fg_err = [0.0] * len(self.adapters)
            bg_err = [0.0] * len(self.adapters)
            fg_n = bg_n = 0.0
            for start in range(0, len(task.test), 32):
                idx = list(range(start, min(start + 32, len(task.test))))
                s_out = task.outputs(self.student, task.test, idx)
                points, scene = task.test.inputs(idx)
                from kdforge.tasks.pointcloud.camera_bev import lidar_taps

                self.teacher.cpu()
                t_out = lidar_taps(self.teacher, points, scene, len(idx))
                first = True
                for i, (s_tap, t_tap) in enumerate(_taps(self.args.positions)):
                    f_t = t_out[t_tap]
                    g = f_t.shape[-1]
                    self.adapters[i].cpu()
                    err = ((self.adapted(i, s_out[s_tap], tuple(f_t.shape[-2:])) - f_t) ** 2).mean(1, keepdim=True)
                    fg, bg, _ = region_masks([task.test.boxes[j] for j in idx], self.student.extent,
                                             2 * self.student.extent / g, g)
                    fg_err[i] += float((err * fg).sum())
                    bg_err[i] += float((err * bg).sum())
                    if first:
                        fg_n += float(fg.sum())
                        bg_n += float(bg.sum())
                        first = False
            for i, (s_tap, _) in enumerate(_taps(self.args.positions)):
                out[f"imitation_fg_{s_tap}"] = fg_err[i] / max(1.0, fg_n)
                out[f"imitation_bg_{s_tap}"] = bg_err[i] / max(1.0, bg_n)
        self.to(task.device)
        self.train(was)
        return out


# ------------------------------------------------------------------------------------- recipe


STUDENT_TAPS = ("lss", "neck")
TEACHER_TAPS = ("neck",)


def check_args(cfg: DistillBEVRecipe, source: str) -> None:
    a = cfg.distill
    if a.mode not in ("distillbev", "mse", "none"):
        raise ConfigError(f"{source}: distill.mode must be distillbev, mse or none, got {a.mode!r}")
    if not a.positions:
        raise ConfigError(f"{source}: distill.positions needs at least one 'student_tap:teacher_tap'")
    s_blocks = {f"block{k}" for k in range(1, cfg.model.depth + 1)}
    t_blocks = {f"block{k}" for k in range(1, cfg.teacher.model.depth + 1)}
    for p in a.positions:
        parts = str(p).split(":")
        if len(parts) != 2 or parts[0] not in {*STUDENT_TAPS, *s_blocks} or parts[1] not in {*TEACHER_TAPS, *t_blocks}:
            raise ConfigError(f"{source}: distill.positions entry {p!r} must be student_tap:teacher_tap with student "
                              f"taps {sorted({*STUDENT_TAPS, *s_blocks})} and teacher taps "
                              f"{sorted({*TEACHER_TAPS, *t_blocks})}")
    if min(a.w_fg, a.w_bg, a.w_ch, a.w_sp, a.w_fp, a.w_mse) < 0 or min(a.t_sp, a.t_ch) <= 0:
        raise ConfigError(f"{source}: distill weights must be >= 0 and temperatures t_sp, t_ch > 0")
    if a.fp not in ("none", "teacher") or a.fp_scale not in ("dfs", "average"):
        raise ConfigError(f"{source}: distill.fp must be none or teacher and distill.fp_scale dfs or average, got "
                          f"{a.fp!r}, {a.fp_scale!r}")
    if not (a.kd_scale >= 0 and a.warmup >= 0):
        raise ConfigError(f"{source}: distill.kd_scale and distill.warmup must be >= 0, got {a.kd_scale}, {a.warmup}")
    if not (0 < a.fp_threshold < 1 and 0 < a.fp_gt_threshold <= 1):
        raise ConfigError(f"{source}: distill.fp_threshold must be in (0, 1) and fp_gt_threshold in (0, 1]")
    if cfg.data.format != "procedural":
        raise ConfigError(f"{source}: the camera student needs rendered views: data.format must be procedural")
    try:
        cfg.camera.check("camera")
    except KdforgeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


class DistillBEV:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, DistillBEVRecipe, method="distillbev")
        cfg.check(source)
        check_args(cfg, source)
        names, extent, spec = list(cfg.data.categories), cfg.data.extent, cfg.data.spec()
        key = (repr(asdict(cfg.data)), repr(asdict(cfg.camera)))

        def build_student() -> CameraBEVDetector:
            return CameraBEVDetector(len(names), extent, cfg.model, cfg.camera)

        def make_task(module, train, test, class_names, ext, batch_size, seed, eval_cfg, extra) -> CameraBEVTask:
            return CameraBEVTask(module, train, test, class_names, ext, batch_size, seed, eval_cfg, extra, spec=spec,
                                 cam=cfg.camera, data_key=key)

        def make_module(student, teacher) -> DistillBEVModule:
            module = DistillBEVModule(student, teacher, cfg.distill)
            module.cache_teacher = cfg.distill.cache_teacher
            return module

        return run_bev(cfg, DistillBEVRecipe, run_dir, trainer, text, make_module,
                       needs_teacher=cfg.distill.mode != "none", method="distillbev", build_student=build_student,
                       make_task=make_task)


METHODS.register(
    "distillbev", DistillBEV, family="3d-detection",
    paper="DistillBEV: Boosting Multi-Camera 3D Object Detection with Cross-Modal Knowledge Distillation (ICCV 2023)",
    summary="LiDAR BEV teacher -> Lift-Splat camera student: BEV feature imitation balanced by fg/bg regions, "
            "sqrt(cell/box area) scaling, teacher spatial + channel attention, multi-position", task="pointcloud")
