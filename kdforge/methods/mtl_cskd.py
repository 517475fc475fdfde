"""MTL-CSKD (ICCV 2023): one multi-task teacher -> a multi-task student, Cauchy-Schwarz divergence within and
across tasks, on the dense-prediction package (`kdforge.tasks.dense`).

One frozen multi-task teacher (trained once, as the `teacher` stage or `teacher.run`) teaches the
multi-task student; the student keeps its supervised task losses and adds

    beta * T^2 * (L_intra + L_inter)

(`kdforge.losses.cs`, T = 8, beta = 0.5 as the paper's ablation). L_intra: per task, D_CS between
the teacher's and the student's softened distributions along the task's axis (semantic classes
per pixel; the two-way boundary distribution per pixel; a spatial softmax per channel for depth
and normals), averaged over tasks. L_inter: at every pixel the tasks' distributions are
concatenated along the channel axis and compared with D_CS, the match across tasks. Both are
core Distiller `Term`s with the registered `cs` loss, each reading every task output at once.
The axis per task is configurable (`mtl_cskd.axes`); `divergence: kl` gives the plain-KD
comparison (KL along the same axes, intra only).

Recipe schema (`configs/methods/mtl_cskd.yaml`; `kdforge train configs/methods/mtl_cskd.yaml --out runs/x`)::

    method: mtl_cskd
    seed: int                          # the student's initialisation, batch order and flips
    data: {format: procedural | folder, root, tasks, size, num_train, num_val, num_test, max_objects,
           noise, seed, num_classes, depth_scale}
                                       # procedural scenes (kdforge.tasks.dense.scenes) or PNG folders
                                       # root/train, root/test[, root/val] (kdforge.tasks.dense.folders)
    model: {arch: unet | fpn, width, depth}               # the student
    train: LoopConfig
    teacher: {model: {...}, loop: LoopConfig, seed, run}  # run: a finished teacher run (teacher_only)
    teacher_only: bool                 # train only the teacher into the run directory
    task_weights: {task: weight}       # supervised loss weights (default 1)
    boundary_pos_weight: float
    boundary_tolerance: int            # pixels a boundary may be off in the F-score
    flip: bool
    baselines: {task: DIR}             # finished single-task runs -> test_mtl_score (multi-task score)
    mtl_cskd: {beta, temperature, intra, inter, divergence: cs | kl, axes: {task: channel|binary|spatial}}

`mtl_cskd.beta: 0` is the same student without KD (no teacher is built); the single- and multi-task
baselines (`configs/dense/*.yaml`) are `method: dense` recipes of the same schema without `mtl_cskd:`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.config import OptimConfig, ScheduleConfig, to_dict
from kdforge.distill.terms import Term
from kdforge.errors import ConfigError
from kdforge.losses._common import paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.losses.cs import AXES, CSLoss, dense_distribution, match_size
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.train.stages import loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["DenseKLLoss", "MTLCSKDArgs", "MTLCSKDRecipe", "dense_kl", "kd_terms", "run_mtl_cskd"]

DEFAULT_AXES = {"semseg": "channel", "boundary": "binary", "depth": "spatial", "normals": "spatial"}


@dataclass
class DenseDataConfig:
    format: str = "procedural"       # procedural | folder
    root: str = ""                   # folder: root/train, root/test (and root/val when num_val > 0)
    tasks: list[str] = field(default_factory=lambda: ["semseg", "depth", "normals", "boundary"])
    size: int = 64
    num_train: int = 400
    num_val: int = 0
    num_test: int = 200
    max_objects: int = 4
    noise: float = 0.02
    seed: int = 0
    num_classes: int = 6             # folder data (procedural: background + 5 kinds)
    depth_scale: float = 1000.0      # folder data: depth PNG value per unit


@dataclass
class DenseModelConfig:
    arch: str = "unet"
    width: int = 8
    depth: int = 4


def _loop(epochs: int) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=16, optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=1e-4),
                      schedule=ScheduleConfig(name="cosine"))


@dataclass
class TeacherSpec:
    model: DenseModelConfig = field(default_factory=lambda: DenseModelConfig(width=32))
    loop: LoopConfig = field(default_factory=lambda: _loop(20))
    seed: int = 100
    run: str | None = None


@dataclass
class MTLCSKDArgs:
    beta: float = 0.5                # weight of the CS terms (paper's best); 0 = no KD
    temperature: float = 8.0         # T (paper's best); the terms are scaled by T^2
    intra: bool = True               # the match within each task
    inter: bool = True               # the match across tasks
    divergence: str = "cs"           # cs | kl (plain KD along the same axes, intra only)
    axes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_AXES))


@dataclass
class MTLCSKDRecipe:
    method: str = "mtl_cskd"
    seed: int = 0
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
    model: DenseModelConfig = field(default_factory=DenseModelConfig)
    train: LoopConfig = field(default_factory=lambda: _loop(10))
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    teacher_only: bool = False
    task_weights: dict[str, float] = field(default_factory=dict)
    boundary_pos_weight: float = 2.0
    boundary_tolerance: int = 0      # px a boundary pixel may be off in the F-score (procedural edges: 2 px wide)
    flip: bool = True
    baselines: dict[str, str | None] = field(default_factory=dict)
    mtl_cskd: MTLCSKDArgs = field(default_factory=MTLCSKDArgs)

    def check(self, source: str) -> None:
        from kdforge.tasks.dense.models import ARCHS
        from kdforge.tasks.dense.scenes import TASKS

        d, a = self.data, self.mtl_cskd
        if d.format not in ("procedural", "folder"):
            raise ConfigError(f"{source}: data.format must be procedural or folder, got {d.format!r}")
        if d.format == "folder" and not d.root:
            raise ConfigError(f"{source}: data.format folder needs data.root: DIR (with train/ and test/)")
        bad = [t for t in [*d.tasks, *self.task_weights, *self.baselines] if t not in TASKS]
        if bad or not d.tasks:
            raise ConfigError(f"{source}: unknown task {bad[0] if bad else '(data.tasks is empty)'}; known: "
                              f"{', '.join(TASKS)}")
        for m in (self.model, self.teacher.model):
            if m.arch not in ARCHS or m.width < 1:
                raise ConfigError(f"{source}: model arch must be one of {', '.join(ARCHS)} and width >= 1, got "
                                  f"{m.arch!r}, {m.width}")
        if d.size < 8 or d.size % 2 ** (max(self.model.depth, self.teacher.model.depth) - 1):
            raise ConfigError(f"{source}: data.size {d.size} must be >= 8 and divisible by the models' stride")
        if self.boundary_tolerance < 0 or self.boundary_pos_weight <= 0:
            raise ConfigError(f"{source}: boundary_tolerance must be >= 0 and boundary_pos_weight > 0")
        if a.beta < 0 or a.temperature <= 0:
            raise ConfigError(f"{source}: mtl_cskd.beta must be >= 0 and temperature > 0, got {a.beta}, "
                              f"{a.temperature}")
        if a.divergence not in ("cs", "kl"):
            raise ConfigError(f"{source}: mtl_cskd.divergence must be cs or kl, got {a.divergence!r}")
        if a.divergence == "kl" and a.inter:
            raise ConfigError(f"{source}: mtl_cskd.divergence kl matches within tasks only; set mtl_cskd.inter=false")
        if a.beta > 0 and not (a.intra or a.inter):
            raise ConfigError(f"{source}: mtl_cskd.beta > 0 needs mtl_cskd.intra or mtl_cskd.inter")
        bad = [f"{t}: {x}" for t, x in a.axes.items() if t not in TASKS or x not in AXES]
        if bad:
            raise ConfigError(f"{source}: mtl_cskd.axes {bad[0]}: tasks are {', '.join(TASKS)} and axes "
                              f"{', '.join(AXES)}")
        self.train.check(f"{source}: train")
        self.teacher.loop.check(f"{source}: teacher.loop")


def dense_kl(student: Tensor, teacher: Tensor, axis: str, temperature: float) -> Tensor:
    """KL(teacher || student) of the softened distributions along `axis`, mean over the other positions."""
    student = match_size(student, teacher)
    p = dense_distribution(teacher.detach(), axis, temperature)
    q = dense_distribution(student, axis, temperature)
    dim = 2 if axis == "spatial" else 1
    if axis == "spatial":
        p, q = p.flatten(2), q.flatten(2)
    return F.kl_div(q.clamp_min(1e-12).log(), p, reduction="none").sum(dim).mean()


class DenseKLLoss(DistillLoss):
    """Plain KD for dense outputs: mean over the taps of `dense_kl`, times T^2 (the comparison arm)."""

    def __init__(self, temperature: float, axes: list[str]) -> None:
        super().__init__()
        self.temperature, self.axes = float(temperature), list(axes)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "dense_kl")
        T = self.temperature
        return torch.stack([dense_kl(s, t, a, T) for (s, t), a in zip(pairs, self.axes, strict=True)]).mean() * T * T


def kd_terms(tasks: list[str], args: MTLCSKDArgs) -> list[Term]:
    """The distillation Terms: each reads every task output of both models (none when beta is 0)."""
    if args.beta == 0:
        return []
    axes = [args.axes.get(t, DEFAULT_AXES[t]) for t in tasks]
    T = args.temperature
    if args.divergence == "kl":
        return [Term(DenseKLLoss(T, axes), tasks, tasks, name="kl_intra", weight=args.beta)]
    terms = []
    if args.intra:
        terms.append(Term(CSLoss(T, axes, "intra"), tasks, tasks, name="cs_intra", weight=args.beta))
    if args.inter:
        terms.append(Term(CSLoss(T, axes, "inter"), tasks, tasks, name="cs_inter", weight=args.beta))
    return terms


def _data(cfg: MTLCSKDRecipe) -> tuple[Any, Any, Any]:
    """(train, test, val or None)."""
    from kdforge.tasks.dense.folders import load_dense_folder
    from kdforge.tasks.dense.scenes import procedural_split

    d = cfg.data
    tasks = tuple(d.tasks)
    if d.format == "folder":
        root = Path(d.root)
        read = [load_dense_folder(root / s, tasks, d.num_classes, d.size, d.depth_scale) for s in ("train", "test")]
        val = load_dense_folder(root / "val", tasks, d.num_classes, d.size, d.depth_scale) if d.num_val else None
        return read[0], read[1], val
    # disjoint scene streams of one data seed: train, test and validation never share a scene
    make = [procedural_split(n, d.seed * 3 + k, d.size, 1, d.max_objects, d.noise, tasks)
            for k, n in enumerate((d.num_train, d.num_test, d.num_val)) if n > 0]
    return make[0], make[1], (make[2] if d.num_val else None)


def _model(m: DenseModelConfig, tasks: list[str], num_classes: int, seed: int) -> Any:
    from kdforge.tasks.dense.models import MultiTaskNet, task_channels

    torch.manual_seed(seed)
    return MultiTaskNet(task_channels(tasks, num_classes), m.arch, m.width, depth=m.depth)


def _teacher_identity(cfg: MTLCSKDRecipe) -> dict[str, Any]:
    return {"data": to_dict(cfg.data), "teacher": {"model": to_dict(cfg.teacher.model), "seed": cfg.teacher.seed,
                                                    "loop": to_dict(cfg.teacher.loop)},
            "flip": cfg.flip, "task_weights": cfg.task_weights, "boundary_pos_weight": cfg.boundary_pos_weight}


def _baselines(cfg: MTLCSKDRecipe) -> dict[str, float]:
    """{primary metric: value} of the finished single-task runs named in `baselines`."""
    import json

    from kdforge.tasks.dense.metrics import PRIMARY

    out = {}
    for task, run in cfg.baselines.items():
        if not run or task not in cfg.data.tasks:
            continue
        result = Path(run) / "result.json"
        if not result.is_file():
            raise ConfigError(f"mtl_cskd recipe: baselines.{task}: {run} holds no finished run (no result.json)")
        key = PRIMARY[task][0]
        value = json.loads(result.read_text()).get(f"test_{key}")
        if value is None:
            raise ConfigError(f"mtl_cskd recipe: baselines.{task}: {result} has no test_{key} (not a {task} run?)")
        out[key] = float(value)
    return out


def run_mtl_cskd(cfg: MTLCSKDRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """Teacher stage (or `teacher.run`; skipped without KD), then the student into `run_dir`."""
    from kdforge.tasks.dense.metrics import require_torchmetrics
    from kdforge.tasks.dense.task import DenseTask

    require_torchmetrics()
    train, test, val = _data(cfg)
    tasks, k = list(cfg.data.tasks), train.num_classes
    common = {"task_weights": cfg.task_weights, "pos_weight": cfg.boundary_pos_weight, "flip": cfg.flip,
              "val": val, "boundary_tolerance": cfg.boundary_tolerance}

    def teacher_task() -> DenseTask:
        net = _model(cfg.teacher.model, tasks, k, cfg.teacher.seed)
        return DenseTask(net, train, test, cfg.teacher.loop.batch_size, cfg.teacher.seed, **common)

    t_settings = loop_settings(cfg.teacher.loop, cfg.teacher.seed, trainer)
    if cfg.teacher_only:
        return run_stage(run_dir, None, t_settings, teacher_task(), config_text).result
    baselines = _baselines(cfg)
    teacher, extra = None, {}
    if cfg.mtl_cskd.beta > 0:
        if cfg.teacher.run:
            stage = reuse_stage(cfg.teacher.run, MTLCSKDRecipe, cfg, _teacher_identity, "mtl_cskd", "teacher.run",
                                t_settings, teacher_task(), "teacher_only=true")
        else:
            stage = run_stage(run_dir, "teacher", t_settings, teacher_task(), config_text)
            if stage.stopped:
                return stage.result
        teacher = stage.module.eval_model()
        extra = {f"teacher_{key}": v for key, v in stage.result.items()
                 if key.startswith("test_") and key != "test_images"}
    student = _model(cfg.model, tasks, k, cfg.seed)
    task = DenseTask(student, train, test, cfg.train.batch_size, cfg.seed, teacher=teacher,
                     terms=kd_terms(tasks, cfg.mtl_cskd), baselines=baselines, extra_result=extra, **common)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class MTLCSKD:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, MTLCSKDRecipe, method="mtl_cskd")
        cfg.check(source)
        return run_mtl_cskd(cfg, run_dir, trainer, text)


METHODS.register(
    "mtl_cskd", MTLCSKD, family="dense-prediction",
    paper="Multi-Task Learning with Knowledge Distillation for Dense Prediction (ICCV 2023)",
    summary="one multi-task teacher -> multi-task student; Cauchy-Schwarz divergence of softened outputs within "
            "each task and across tasks (beta * T^2 * (intra + inter)), task losses kept", task="dense")
