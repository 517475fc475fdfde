"""BCKD (Yang et al., ICCV 2023): detection KD in the dense detector's own binary protocol.

A frozen teacher detector and the student share the location grid (same backbone taps and
input size). Per batch, on every location of every FPN level (card p19, official `NovelKDLoss`):

    L_cls = sum_{n,c} BCE(s_nc, sigmoid(t_nc)) |sigmoid(t_nc) - sigmoid(s_nc)|^beta / N_pos
    L_loc = sum_n max_c |sigmoid(t_nc) - sigmoid(s_nc)| (1 - GIoU(box_s_n, box_t_n)) / N_pos
    L     = L_det + w_cls L_cls + w_loc L_loc           (official weights 1 and 4, beta 1)

N_pos is the number of positive locations of the detection loss. The detector is the FCOS-style
head of `kdforge.tasks.detection` (the official students are GFL; the loss only needs sigmoid
class logits and decoded boxes, which both provide). `bckd.w_cls: 0, w_loc: 0` is the student
without KD; `bckd.softmax_kd > 0` adds softmax KL over classes (T 2), the protocol BCKD replaces.

Recipe (`configs/methods/bckd.yaml`; `kdforge train configs/methods/bckd.yaml --out runs/bckd`):
the `detector` schema (data, model = the student, train, augment, seed) plus `teacher` (its
model and loop, or `teacher.run: DIR` of a finished detector run) and `bckd` weights. Stages: the
teacher (`<run>/stages/teacher`, a detector run) then the student in `<run>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdforge.config import OptimConfig, ScheduleConfig, to_dict
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.bckd import bckd_cls_loss, bckd_loc_loss, bckd_location_weights
from kdforge.methods.detector import AugmentSpec, DetectorModelConfig, SceneDataConfig, build_detection, make_detector
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.detection.fcos import FCOS, dense_predictions, fcos_loss
from kdforge.tasks.detection.task import DetectorModule
from kdforge.train.stages import loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["BCKDArgs", "BCKDModule", "BCKDRecipe", "run_bckd"]


@dataclass
class BCKDArgs:
    w_cls: float = 1.0
    w_loc: float = 4.0
    beta: float = 1.0
    softmax_kd: float = 0.0          # comparison arm: softmax KL over classes (T 2) instead
    softmax_temperature: float = 2.0


@dataclass
class TeacherSpec:
    model: DetectorModelConfig = field(default_factory=lambda: DetectorModelConfig(backbone_args={"width": 32},
                                                                                   width=64))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=20, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5)))
    seed: int = 100
    run: str | None = None           # a finished teacher run (this recipe with teacher_only, or a bckd run)


@dataclass
class BCKDRecipe:
    method: str = "bckd"
    seed: int = 0
    data: SceneDataConfig = field(default_factory=SceneDataConfig)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=10, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5)))
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    teacher_only: bool = False
    bckd: BCKDArgs = field(default_factory=BCKDArgs)


def _detector(m: DetectorModelConfig, num_classes: int, size: int) -> FCOS:
    if m.kind != "fcos":
        raise ConfigError(f"bckd: model.kind must be fcos (dense sigmoid classification on a location grid), "
                          f"got {m.kind!r}")
    return make_detector(m, num_classes, size)


def _teacher_identity(cfg: BCKDRecipe) -> dict[str, Any]:
    return {"data": to_dict(cfg.data), "teacher": {"model": to_dict(cfg.teacher.model), "seed": cfg.teacher.seed,
                                                    "loop": to_dict(cfg.teacher.loop)}}


class BCKDModule(DetectorModule):
    """The student detector's module with BCKD's distillation terms (teacher frozen, not checkpointed)."""

    def __init__(self, student: FCOS, teacher: FCOS, args: BCKDArgs) -> None:
        super().__init__(student)
        self.args = args
        self.teachers = torch.nn.ModuleDict({"teacher": teacher.eval().requires_grad_(False)})

    def forward(self, batch: Any) -> Step:
        args = self.args
        out = self.student(batch.images)
        stats: dict[str, float] = {}
        losses = fcos_loss(self.student, out, batch.boxes, batch.labels, stats)
        groups = {k: "task" for k in losses}
        with torch.no_grad():
            t_out = self.teachers["teacher"](batch.images)
        s_cls, s_box = dense_predictions(self.student, out)
        t_cls, t_box = dense_predictions(self.teachers["teacher"], t_out)
        s_cls, t_cls = s_cls.reshape(-1, s_cls.shape[-1]), t_cls.reshape(-1, t_cls.shape[-1])
        n_pos = stats["num_pos"]
        if args.w_cls:
            losses["bckd_cls"] = args.w_cls * bckd_cls_loss(s_cls, t_cls, args.beta, n_pos)
        if args.w_loc:
            omega = bckd_location_weights(s_cls, t_cls)
            losses["bckd_loc"] = args.w_loc * bckd_loc_loss(s_box.reshape(-1, 4), t_box.reshape(-1, 4), omega, n_pos)
        if args.softmax_kd:
            tau = args.softmax_temperature
            kl = F.kl_div(F.log_softmax(s_cls / tau, 1), F.log_softmax(t_cls / tau, 1), log_target=True,
                          reduction="sum") * tau ** 2 / n_pos
            losses["softmax_kd"] = args.softmax_kd * kl
        groups.update({k: "distill" for k in losses if k not in groups})
        return Step(outputs=out["cls"][0].detach(), losses=losses, groups=groups)


def run_bckd(cfg: BCKDRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """Teacher stage (or `teacher.run`), then the student with BCKD into `run_dir`."""
    from kdforge.tasks.detection.metrics import require_pycocotools
    from kdforge.tasks.detection.task import DetectionTask

    require_pycocotools()
    if min(cfg.bckd.w_cls, cfg.bckd.w_loc, cfg.bckd.softmax_kd) < 0:
        raise ConfigError("bckd recipe: bckd weights must be >= 0")
    train, test = build_detection(cfg)
    size, k = cfg.data.size, cfg.data.num_classes
    t_strides, s_strides = _detector(cfg.teacher.model, k, size).strides, _detector(cfg.model, k, size).strides
    if t_strides != s_strides:      # checked before anything trains
        raise KdforgeError(f"bckd: teacher strides {t_strides} differ from the student's {s_strides}; "
                           "use the same backbone taps so both predict on one location grid")

    def teacher_task() -> DetectionTask:
        torch.manual_seed(cfg.teacher.seed)
        return DetectionTask(_detector(cfg.teacher.model, k, size), train, test, cfg.teacher.loop.batch_size,
                             cfg.teacher.seed, tuple(cfg.augment.scale_range), cfg.augment.flip)

    t_settings = loop_settings(cfg.teacher.loop, cfg.teacher.seed, trainer)
    if cfg.teacher_only:
        return run_stage(run_dir, None, t_settings, teacher_task(), config_text).result
    if cfg.teacher.run:
        stage = reuse_stage(cfg.teacher.run, BCKDRecipe, cfg, _teacher_identity, "bckd", "teacher.run", t_settings,
                            teacher_task(), "teacher_only=true")
    else:
        stage = run_stage(run_dir, "teacher", t_settings, teacher_task(), config_text)
        if stage.stopped:
            return stage.result
    teacher = stage.module.eval_model()
    torch.manual_seed(cfg.seed)
    student = _detector(cfg.model, k, size)
    task = DetectionTask(student, train, test, cfg.train.batch_size, cfg.seed, tuple(cfg.augment.scale_range),
                         cfg.augment.flip, module=BCKDModule(student, teacher, cfg.bckd),
                         extra_result={"teacher_test_AP": stage.result.get("test_AP")})
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class BCKD:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, BCKDRecipe, method="bckd")
        return run_bckd(cfg, run_dir, trainer, text)


METHODS.register(
    "bckd", BCKD, family="detection",
    paper="BCKD: Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object Detection (ICCV 2023)",
    summary="binary (sigmoid) classification KD weighted by the score gap + IoU-based localization KD on "
            "decoded boxes at every location", task="detection")
