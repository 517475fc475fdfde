"""BEV 3D detection from point clouds as a Task on the one Trainer, and the recipe runner methods share.

Data: procedural scenes (`scenes.SceneSpec`; train = scenes 0..n-1 of the data seed's stream,
test = the next ones) or a user's KITTI-style folder (`kitti.load_kitti`; the last `num_test`
frames are the test split), points cropped to the square BEV extent. Every scene's CenterPoint
targets on the student's head grid are computed once; batch `k` is `stream_batch` positions (a
pure function of the run seed), so resume is exact and DDP splits a batch exactly (per-scene
normalised losses, GroupNorm). Evaluation after training on the test split (nothing is selected
on it): BEV AP at KITTI's class-wise IoU (car 0.7, pedestrian / cyclist 0.5; `bev_ap`, the mean
over classes, and per class), 3D AP at the same IoU (`ap3d`), BEV AP at IoU 0.5 (`bev_ap50`), and
false positives per scene at score >= 0.3 (`fp_per_scene`). `draw` writes BEV pictures of test
scenes: points, ground-truth boxes and predictions.

A recipe (`BEVRecipe`) holds data, the student `model`, the `teacher` (its model, loop, seed, or
`run`: a finished teacher run to reuse), `teacher_only`, the student's `train` loop and `eval`;
`run_bev(...)` trains the teacher stage when a method needs one and then the student module the
method builds (`make_module(student, teacher)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.base import SampledTask, TaskModule
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.pointcloud.metrics import KITTI_IOU, detection_ap, match_scene
from kdforge.tasks.pointcloud.models import (
    BEVDetector,
    DetectorConfig,
    build_detector,
    centerpoint_loss,
    centerpoint_targets,
    decode,
)
from kdforge.tasks.pointcloud.scenes import Scene, SceneSpec, procedural_scenes
from kdforge.train.distributed import DistEnv

__all__ = ["BEVBatch", "BEVDetectionTask", "BEVDetectorModule", "BEVRecipe", "EvalConfig", "SceneDataConfig",
           "SceneSplit", "TeacherConfig", "load_scene_data", "run_bev"]


# ------------------------------------------------------------------------------------- recipe pieces


@dataclass
class SceneDataConfig:
    format: str = "procedural"           # procedural | kitti
    root: str = ""                       # kitti: folder with velodyne/, label_2/, calib/
    num_train: int = 300
    num_test: int = 100
    categories: list[str] = field(default_factory=lambda: ["car", "pedestrian", "cyclist"])
    extent: float = 16.0                 # BEV square [-extent, extent]^2 (m)
    min_objects: int = 2
    max_objects: int = 8
    clutter: int = 3
    noise: float = 0.03
    dropout: float = 0.1
    seed: int = 0

    def spec(self) -> SceneSpec:
        return SceneSpec(categories=list(self.categories), extent=self.extent, min_objects=self.min_objects,
                         max_objects=self.max_objects, clutter=self.clutter, noise=self.noise, dropout=self.dropout)


def _teacher_model() -> DetectorConfig:
    return DetectorConfig(voxel=0.5, cell=1.0, pfn=32, width=64, depth=4, head=64)


def _loop(epochs: int) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-2),
                      schedule=ScheduleConfig(name="cosine"), grad_clip=35.0)


@dataclass
class TeacherConfig:
    model: DetectorConfig = field(default_factory=_teacher_model)
    loop: LoopConfig = field(default_factory=lambda: _loop(30))
    seed: int = 100
    run: str | None = None               # a finished teacher run (teacher_only=true) to reuse instead of training


@dataclass
class EvalConfig:
    top_k: int = 50
    score_threshold: float = 0.05
    fp_score: float = 0.3                # detections at least this confident count in fp_per_scene


@dataclass
class BEVRecipe:
    method: str = "bev"
    seed: int = 0
    data: SceneDataConfig = field(default_factory=SceneDataConfig)
    model: DetectorConfig = field(default_factory=lambda: DetectorConfig(voxel=1.0, pfn=16, width=16, depth=3,
                                                                         stride=1, head=16))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_only: bool = False           # train the teacher detector alone into the run directory
    train: LoopConfig = field(default_factory=lambda: _loop(30))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self, source: str) -> None:
        d = self.data
        if d.format not in ("procedural", "kitti"):
            raise ConfigError(f"{source}: data.format must be procedural or kitti, got {d.format!r}")
        if d.format == "kitti" and not d.root:
            raise ConfigError(f"{source}: data.format kitti needs data.root: DIR (velodyne/, label_2/, calib/)")
        if d.num_train < 1 or d.num_test < 1:
            raise ConfigError(f"{source}: data.num_train and data.num_test must be >= 1")
        try:
            d.spec().check()
            self.model.check("model")
            self.teacher.model.check("teacher.model")
        except KdforgeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if self.model.cell != self.teacher.model.cell:
            raise ConfigError(f"{source}: model.cell and teacher.model.cell must match (one head grid), got "
                              f"{self.model.cell} and {self.teacher.model.cell}")
        self.train.check(f"{source}: train")
        self.teacher.loop.check(f"{source}: teacher.loop")


# ------------------------------------------------------------------------------------- data


def _crop(scene: Scene, extent: float) -> Scene:
    keep = (scene.points[:, :2].abs() < extent).all(1)
    inside = (scene.boxes[:, :2].abs() < extent).all(1) if len(scene.boxes) else torch.zeros(0, dtype=torch.bool)
    return Scene(scene.points[keep], scene.point_labels[keep], scene.boxes[inside], scene.labels[inside],
                 scene.clutter)


def load_scene_data(d: SceneDataConfig) -> tuple[list[Scene], list[Scene]]:
    """(train, test) scenes: procedural from the data seed, or a KITTI-style folder (last num_test frames = test)."""
    if d.format == "kitti":
        from kdforge.tasks.pointcloud.kitti import load_kitti

        scenes = [_crop(s, d.extent) for s in load_kitti(d.root, list(d.categories))]
        if len(scenes) < 2:
            raise KdforgeError(f"{d.root}: need at least 2 frames (train and test), found {len(scenes)}")
        n_test = min(d.num_test, len(scenes) - 1)
        return scenes[:-n_test][:d.num_train], scenes[-n_test:]
    spec = d.spec()
    return (procedural_scenes(spec, d.num_train, d.seed), procedural_scenes(spec, d.num_test, d.seed, d.num_train))


class SceneSplit:
    """One split's points and boxes, with CenterPoint targets on a head grid computed once."""

    def __init__(self, scenes: list[Scene], num_classes: int, extent: float, cell: float) -> None:
        if not scenes:
            raise KdforgeError("a split holds no scene")
        self.scenes = scenes
        self.points = [s.points.float() for s in scenes]
        self.boxes = [s.boxes.float() for s in scenes]
        self.labels = [s.labels.long() for s in scenes]
        targets = [centerpoint_targets(b, lab, num_classes, extent, cell) for b, lab in zip(self.boxes, self.labels)]
        self.heat = torch.stack([t[0] for t in targets])
        self.reg = torch.stack([t[1] for t in targets])
        self.mask = torch.stack([t[2] for t in targets])

    def __len__(self) -> int:
        return len(self.scenes)

    def inputs(self, index: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        """(points (P, 4), scene position in the batch (P,)) of the scenes at `index`."""
        idx = index.tolist() if isinstance(index, Tensor) else list(index)
        pts = [self.points[i] for i in idx]
        batch = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([len(p) for p in pts]))
        return torch.cat(pts) if pts else torch.zeros(0, 4), batch


@dataclass
class BEVBatch:
    points: Tensor
    batch: Tensor
    size: int
    heat: Tensor
    reg: Tensor
    mask: Tensor
    index: Tensor


# ------------------------------------------------------------------------------------- module and task


class BEVDetectorModule(TaskModule):
    """A student detector (trained) and an optional frozen teacher (`teachers`); methods add `extra_losses`.

    `teacher_outputs(batch)` gives a method the frozen teacher's outputs (`teacher_taps`) on the
    batch's scenes: the task binds its fixed training split (`bind_training_data`) and, while
    `cache_teacher` is true, they are computed once over it in fixed chunks (identical values,
    never dependent on the batches) and indexed; otherwise the teacher runs on the batch.
    """

    cache_teacher = True

    def __init__(self, student: BEVDetector, teacher: BEVDetector | None = None) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleDict({} if teacher is None else {"teacher": teacher.requires_grad_(False)})
        self._teacher_cache: dict[str, Tensor] | None = None
        self._train_inputs: Any = None

    def bind_training_data(self, split: Any) -> None:
        """The training split whose teacher outputs the cache holds (no weights, not saved)."""
        self._train_inputs = split

    def teacher_taps(self, points: Tensor, batch: Tensor, size: int) -> dict[str, Tensor]:
        """The teacher outputs a method reads (all of them here)."""
        return self.teacher(points, batch, size)

    @torch.no_grad()
    def teacher_outputs(self, batch: BEVBatch) -> dict[str, Tensor]:
        if not (self.cache_teacher and self._train_inputs is not None):
            return self.teacher_taps(batch.points, batch.batch, batch.size)
        device = batch.points.device
        if self._teacher_cache is None or next(iter(self._teacher_cache.values())).device != device:
            split, parts = self._train_inputs, []
            for start in range(0, len(split), 32):       # fixed chunks: the cache never depends on the batches
                idx = list(range(start, min(start + 32, len(split))))
                points, scene = split.inputs(idx)
                parts.append(self.teacher_taps(points.to(device), scene.to(device), len(idx)))
            self._teacher_cache = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v[batch.index] for k, v in self._teacher_cache.items()}

    def eval_model(self) -> nn.Module:
        return self.student

    @property
    def teacher(self) -> BEVDetector | None:
        return self.teachers["teacher"] if "teacher" in self.teachers else None

    def extra_losses(self, batch: BEVBatch, student: dict[str, Tensor], teacher: dict[str, Tensor] | None
                     ) -> dict[str, Tensor]:
        """Method terms (name -> weighted loss), in the `distill` group."""
        return {}

    def uses_teacher(self) -> bool:
        return self.teacher is not None

    def forward(self, batch: BEVBatch) -> Step:
        out = self.student(batch.points, batch.batch, batch.size)
        losses = centerpoint_loss(out, batch.heat, batch.reg, batch.mask)
        groups = {k: "task" for k in losses}
        t_out = None
        if self.uses_teacher():
            with torch.no_grad():
                t_out = self.teacher(batch.points, batch.batch, batch.size)
        extra = self.extra_losses(batch, out, t_out)
        losses.update(extra)
        groups.update({k: "distill" for k in extra})
        return Step(outputs=out["heatmap"].detach(), losses=losses, groups=groups)

    def report(self, task: BEVDetectionTask) -> dict[str, Any]:
        """Extra result.json entries measured after training (diagnostics of a method)."""
        return {}


class BEVDetectionTask(SampledTask):

    stream = 31
    name = "pointcloud_bev"

    def __init__(self, module: BEVDetectorModule, train: list[Scene], test: list[Scene], class_names: list[str],
                 extent: float, batch_size: int, seed: int, eval_cfg: EvalConfig | None = None,
                 extra_result: dict[str, Any] | None = None) -> None:
        self.module, self.class_names, self.extent = module, list(class_names), extent
        self.cell = module.student.cell
        k = len(class_names)
        self.train, self.test = SceneSplit(train, k, extent, self.cell), SceneSplit(test, k, extent, self.cell)
        self.batch_size, self.seed = batch_size, seed
        self.eval_cfg = eval_cfg or EvalConfig()
        self.extra_result = dict(extra_result or {})
        self.device = torch.device("cpu")

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        bind = getattr(self.module, "bind_training_data", None)
        if callable(bind):
            bind(self.train)
        return self.module.to(device)

    def batch(self, epoch: int, step: int, env: DistEnv) -> BEVBatch:
        idx = self.batch_index(epoch, step, env)
        points, batch = self.train.inputs(idx)
        d = self.device
        return BEVBatch(points.to(d), batch.to(d), len(idx), self.train.heat[idx].to(d), self.train.reg[idx].to(d),
                        self.train.mask[idx].to(d), idx.to(d))

    def train_counts(self, out: Step, batch: BEVBatch) -> dict[str, Tensor]:
        """The Step's `extras` (sums over the batch's scenes, e.g. a method's pair counts) and the scene count."""
        return {**{k: v.detach().float() for k, v in out.extras.items()},
                "scenes": torch.tensor(float(batch.size), device=batch.points.device)}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        """Per-scene means of the summed extras (exact under DDP), plus the module's own ratios (`train_metrics`)."""
        scenes = max(1.0, counts.get("scenes", 0.0))
        out = {f"train_{k}": v / scenes for k, v in counts.items() if k != "scenes"}
        own = getattr(self.module, "train_metrics", None)
        return {**out, **(own(counts) if callable(own) else {})}

    def split(self, name: str) -> SceneSplit:
        return {"train": self.train, "test": self.test}[name]

    @torch.no_grad()
    def outputs(self, model: nn.Module, split: SceneSplit, index: list[int]) -> dict[str, Tensor]:
        """Raw outputs of `model` (eval mode) on the scenes at `index`."""
        was = model.training
        model.eval()
        points, batch = split.inputs(index)
        out = model(points.to(self.device), batch.to(self.device), len(index))
        model.train(was)
        return {k: v.cpu() for k, v in out.items()}

    def predictions(self, model: nn.Module, split: SceneSplit) -> list[tuple[Tensor, Tensor, Tensor]]:
        e = self.eval_cfg
        dets = []
        for start in range(0, len(split), 32):
            idx = list(range(start, min(start + 32, len(split))))
            dets += decode(self.outputs(model, split, idx), self.extent, self.cell, e.top_k, e.score_threshold)
        return dets

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = self.split(split)
        dets = self.predictions(module.eval_model(), data)
        gts = list(zip(data.boxes, data.labels, strict=True))
        thr = {c: KITTI_IOU.get(c, 0.5) for c in self.class_names}
        bev = detection_ap(dets, gts, self.class_names, thr, "bev")
        out = {"bev_ap": bev.pop("mean"), **{f"bev_ap_{c}": v for c, v in bev.items()}}
        out["ap3d"] = detection_ap(dets, gts, self.class_names, thr, "3d")["mean"]
        out["bev_ap50"] = detection_ap(dets, gts, self.class_names, 0.5, "bev")["mean"]
        out["fp_per_scene"] = self._false_positives(dets, gts, thr)
        return out

    def _false_positives(self, dets: list, gts: list, thr: dict[str, float]) -> float:
        from kdforge.tasks.pointcloud.iou import bev_iou

        fp = 0
        for (boxes, scores, labels), (gb, gl) in zip(dets, gts, strict=True):
            for c, name in enumerate(self.class_names):
                d = (labels == c) & (scores >= self.eval_cfg.fp_score)
                fp += int((~match_scene(boxes[d], scores[d], gb[gl == c], thr[name], bev_iou)).sum())
        return fp / max(1, len(dets))

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        report = getattr(module, "report", None)
        return {**out, **(report(self) if callable(report) else {}), **self.extra_result}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "train_scenes": len(self.train), "test_scenes": len(self.test),
                "classes": self.class_names, "extent_m": self.extent, "cell_m": self.cell}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """BEV of six test scenes: points (ground light, the rest dark), ground truth (green), predictions >= fp_score
        (red, class and score)."""
        from kdforge.plotting import pyplot, save_png
        from kdforge.tasks.pointcloud.iou import bev_corners

        pick = list(range(min(6, len(self.test))))
        dets = decode(self.outputs(module.eval_model(), self.test, pick), self.extent, self.cell,
                      self.eval_cfg.top_k, self.eval_cfg.score_threshold)
        plt = pyplot()
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.2), squeeze=False)
        for ax, i, (boxes, scores, labels) in zip(axes.flat, pick, dets, strict=False):
            pts, sem = self.test.points[i], self.test.scenes[i].point_labels
            ground = sem <= 0                    # ground (0) or unknown (-1, KITTI): light; objects, clutter: dark
            ax.scatter(pts[ground, 0], pts[ground, 1], s=0.3, c="0.7", linewidths=0)
            ax.scatter(pts[~ground, 0], pts[~ground, 1], s=0.8, c="0.1", linewidths=0)
            for corner in bev_corners(self.test.boxes[i]):
                ax.fill(corner[:, 0], corner[:, 1], fill=False, ec="tab:green", lw=1.2)
            keep = scores >= self.eval_cfg.fp_score
            for corner, s, lab in zip(bev_corners(boxes[keep]), scores[keep], labels[keep], strict=True):
                ax.fill(corner[:, 0], corner[:, 1], fill=False, ec="tab:red", lw=0.9)
                ax.text(float(corner[:, 0].mean()), float(corner[:, 1].max()) + 0.3,
                        f"{self.class_names[int(lab)][:3]} {float(s):.2f}", fontsize=5, color="tab:red")
            ax.set_xlim(-self.extent, self.extent)
            ax.set_ylim(-self.extent, self.extent)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"test scene {i}: {len(self.test.boxes[i])} objects", fontsize=8)
        fig.suptitle("BEV: ground truth (green) and predictions with score >= "
                     f"{self.eval_cfg.fp_score} (red)", fontsize=9)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True


# ------------------------------------------------------------------------------------- runner


def _teacher_identity(cfg: BEVRecipe) -> dict[str, Any]:
    from dataclasses import asdict

    return {"data": asdict(cfg.data), "teacher": {k: v for k, v in asdict(cfg.teacher).items() if k != "run"}}


def run_bev(cfg: BEVRecipe, schema: type, run_dir: str | Path, trainer: Any, config_text: str,
            make_module: Callable[[BEVDetector, BEVDetector | None], BEVDetectorModule], needs_teacher: bool,
            method: str, build_student: Callable[[], nn.Module] | None = None,
            make_task: Callable[..., BEVDetectionTask] | None = None) -> dict[str, Any]:
    """Teacher stage (trained, reused from `teacher.run`, or skipped when not needed), then the student.

    `build_student` (default: the LiDAR detector of `cfg.model`) and `make_task` (default: `BEVDetectionTask`, same
    arguments) let a method train another kind of student on the same data, e.g. a camera student
    (`camera_bev`)."""
    from kdforge.extras import require
    from kdforge.train.stages import loop_settings, reuse_stage, run_stage

    require("shapely", "pointcloud", "BEV AP needs shapely")
    train, test = load_scene_data(cfg.data)
    names, extent = list(cfg.data.categories), cfg.data.extent

    def detector_task(model_cfg: DetectorConfig, seed: int, loop: LoopConfig) -> BEVDetectionTask:
        torch.manual_seed(seed)
        det = build_detector(len(names), extent, model_cfg)
        return BEVDetectionTask(BEVDetectorModule(det), train, test, names, extent, loop.batch_size, seed, cfg.eval)

    t = cfg.teacher
    t_settings = loop_settings(t.loop, t.seed, trainer)
    if cfg.teacher_only:
        return run_stage(run_dir, None, t_settings, detector_task(t.model, t.seed, t.loop), config_text).result
    teacher, extra = None, {}
    if needs_teacher or t.run:
        if t.run:
            stage = reuse_stage(t.run, schema, cfg, _teacher_identity, method, "teacher.run", t_settings,
                                detector_task(t.model, t.seed, t.loop), "teacher_only=true")
        else:
            stage = run_stage(run_dir, "teacher", t_settings, detector_task(t.model, t.seed, t.loop), config_text)
            if stage.stopped:
                return stage.result
        teacher = stage.module.eval_model()
        extra = {f"teacher_{k}": v for k, v in stage.result.items() if k.startswith("test_") and k != "test_scenes"}
    torch.manual_seed(cfg.seed)
    student = build_detector(len(names), extent, cfg.model) if build_student is None else build_student()
    module = make_module(student, teacher)
    task = (make_task or BEVDetectionTask)(module, train, test, names, extent, cfg.train.batch_size, cfg.seed,
                                           cfg.eval, extra)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result
