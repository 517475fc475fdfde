"""`method: rd` recipes: reverse distillation (Deng & Li, CVPR 2022), the anomaly-detection baseline.

A frozen teacher encoder gives multi-scale features of normal images; a one-class bottleneck
compresses them and a student decoder reconstructs every scale from that code (RD's per-scale
cosine loss). At test time 1 - cos between teacher and student, summed over scales, is the
anomaly map (Gaussian sigma 4), its maximum the image score. Recipe schema::

    method: rd
    seed: int                        # the student's initialisation and the batch order
    data: {format, root, category, size, num_train, num_test_normal, num_test_defect, defects, noise, strength,
                                     #        seed}
                                     # procedural textures (kdforge.tasks.anomaly.data), or a user's
                                     # MVTec AD folder: {format: mvtec, root: DIR, size}
    teacher: {backbone, backbone_args, taps, num_classes, seed, checkpoint}
                                     # any zoo model read at `taps` (fine to coarse, each halving the
                                     # side); checkpoint: the user's pretrained weights, else the
                                     # backbone's random initialisation from teacher.seed (fixed
                                     # random conv features, as the MemKD card's CPU demo allows)
    model: {embed}                   # the one-class embedding's channels
    train: LoopConfig                # RD: Adam lr 5e-3, betas (0.5, 0.999)
    score: {sigma}                   # Gaussian smoothing of the anomaly map (RD: 4)
    trainer: {...}

Result: test image AUROC and pixel AUROC (%, scikit-learn), the raw map's mean inside defects and
on defect-free pixels, and predictions.png (test images, masks, anomaly maps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["AnomalyDataConfig", "RDRecipe", "TeacherConfig", "anomaly_data", "make_teacher", "run_anomaly"]


@dataclass
class AnomalyDataConfig:
    format: str = "procedural"       # procedural | mvtec
    root: str = ""                   # mvtec: <root>/train/good, <root>/test/<defect>, <root>/ground_truth/<defect>
    category: str = "stripes"        # procedural: stripes | grid | dots
    size: int = 64
    num_train: int = 160
    num_test_normal: int = 40
    num_test_defect: int = 60
    defects: list[str] = field(default_factory=lambda: ["blob", "scratch", "spot", "rotate"])
    noise: float = 0.05
    strength: float = 1.0            # defect contrast: 1 pasted, < 1 blended into the texture
    seed: int = 0


@dataclass
class TeacherConfig:
    backbone: str = "convnet"
    backbone_args: dict[str, Any] = field(default_factory=lambda: {"width": 16, "depth": 3})
    taps: list[str] = field(default_factory=lambda: ["feat1", "feat2", "feat3"])
    num_classes: int = 4             # the backbone's head (only its features are used)
    seed: int = 100
    checkpoint: str | None = None    # pretrained weights of the backbone (strict load)


@dataclass
class StudentConfig:
    embed: int = 64


@dataclass
class ScoreConfig:
    sigma: float = 4.0


def _rd_loop() -> LoopConfig:
    return LoopConfig(epochs=20, batch_size=16, optim=OptimConfig(name="adamw", lr=5e-3, betas=[0.5, 0.999],
                                                                  weight_decay=0.0),
                      schedule=ScheduleConfig(name="constant"))


@dataclass
class RDRecipe:
    method: str = "rd"
    seed: int = 0
    data: AnomalyDataConfig = field(default_factory=AnomalyDataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: StudentConfig = field(default_factory=StudentConfig)
    train: LoopConfig = field(default_factory=_rd_loop)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def check(self, source: str) -> None:
        if self.data.format not in ("procedural", "mvtec"):
            raise ConfigError(f"{source}: data.format must be procedural or mvtec, got {self.data.format!r}")
        if self.data.format == "mvtec" and not self.data.root:
            raise ConfigError(f"{source}: data.format mvtec needs data.root: DIR (the MVTec AD category folder)")
        if self.data.size < 8 or self.model.embed < 1 or self.score.sigma < 0:
            raise ConfigError(f"{source}: need data.size >= 8, model.embed >= 1 and score.sigma >= 0")
        self.train.check(f"{source}: train")


def anomaly_data(cfg: RDRecipe) -> tuple[Any, Any]:
    """(train, test): procedural textures with injected defects, or a user's MVTec AD folder."""
    from kdforge.tasks.anomaly.data import load_mvtec, procedural_split

    d = cfg.data
    if d.format == "mvtec":
        return load_mvtec(d.root, d.size)
    return procedural_split(d.category, d.size, d.num_train, d.num_test_normal, d.num_test_defect,
                            tuple(d.defects), d.seed, d.noise, d.strength)


def make_teacher(t: TeacherConfig) -> Any:
    """The frozen teacher encoder (its weights from `checkpoint`, else the backbone's init from `seed`)."""
    from kdforge.models import create_model
    from kdforge.tasks.anomaly.models import build_teacher

    torch.manual_seed(t.seed)
    net = create_model(t.backbone, num_classes=t.num_classes, in_channels=3, **t.backbone_args)
    if t.checkpoint:
        from kdforge.train.build import load_weights

        load_weights(net, t.checkpoint, "the teacher backbone")
    return build_teacher(t.backbone, t.backbone_args, t.taps, net=net)


def rd_module(cfg: RDRecipe, shapes: list[tuple[int, int]], teacher: Any, train: Any) -> Any:
    """The plain RD module: bottleneck + decoder with identity adapters."""
    from kdforge.tasks.anomaly.models import OneClassBottleneck, ReverseDecoder
    from kdforge.tasks.anomaly.task import RDModule

    return RDModule(teacher, OneClassBottleneck(shapes, cfg.model.embed), ReverseDecoder(shapes, cfg.model.embed))


def run_anomaly(cfg: RDRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "",
                build: Callable[..., Any] = rd_module) -> dict[str, Any]:
    """Build data, teacher and the method's module (`build(cfg, shapes, teacher, train)`), train into `run_dir`."""
    from kdforge.tasks.anomaly.metrics import require_sklearn
    from kdforge.tasks.anomaly.task import AnomalyTask

    require_sklearn()
    train, test = anomaly_data(cfg)
    if train.images.shape[-1] != cfg.data.size:
        raise KdforgeError(f"data: images are {train.images.shape[-1]} px but data.size is {cfg.data.size}")
    teacher = make_teacher(cfg.teacher)
    shapes = teacher.shapes(cfg.data.size)
    torch.manual_seed(cfg.seed)
    module = build(cfg, shapes, teacher, train)
    task = AnomalyTask(module, train, test, cfg.train.batch_size, cfg.seed, cfg.score.sigma)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class RD:
    """Registered entry for `method: rd` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, RDRecipe, method="rd")
        cfg.check(source)
        return run_anomaly(cfg, run_dir, trainer, text)


METHODS.register("rd", RD, family="anomaly",
                 paper="Anomaly Detection via Reverse Distillation from One-Class Embedding (CVPR 2022)",
                 summary="frozen teacher encoder -> one-class bottleneck -> student decoder reconstructing the "
                         "teacher's multi-scale features; anomaly map = sum of 1 - cos", task="anomaly")
