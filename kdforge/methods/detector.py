"""`method: detector` recipes: train an object detector (no distillation) on the one Trainer.

The detection package's plain training recipe (`configs/detection/*.yaml`), the baseline every
detection KD method starts from and the way to train their teachers. Recipe schema::

    method: detector
    seed: int                        # initialisation, batch order and views
    data: {num_train, num_test, num_classes, size, max_objects, min_scale, max_scale, clutter, seed}
                                     # or a user's COCO data: {format: coco, size, on_bad,
                                     #   train: {annotations: a.json, images: DIR}, test: {...}}
    model: {kind, backbone, backbone_args, taps, width, tower, head}
                                     # kind: fcos | two_stage | query (kdforge.tasks.detection.models);
                                     # tower: the fcos head's depth; head: the kind's own options
    train: LoopConfig                # {epochs, batch_size, optim, schedule, grad_clip, progress}
    augment: {scale_range, flip}
    trainer: {...}                   # optional TrainerConfig options

Data are procedural scenes (`kdforge.tasks.detection.scenes`), test scenes drawn with data.seed +
1000, or a user's COCO JSON + image folder per split (`kdforge.tasks.detection.images`:
letterboxed to data.size for training, AP computed in the images' own pixel frame; num_classes
follows the categories). Result: COCO AP, AP50, AP75, AP-small/medium/large (pycocotools) of the final weights on
the test split, and predictions.png. DDP: allowed (per-sample losses; GroupNorm head; the
backbone's batch norm sees each rank's share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["DetectorModelConfig", "DetectorRecipe", "build_detection", "make_detector", "run_detector"]


@dataclass
class CocoSplitSpec:
    annotations: str = ""            # COCO JSON (paths relative to the working directory)
    images: str = ""                 # the folder its file_name entries are relative to


@dataclass
class SceneDataConfig:
    format: str = "procedural"       # procedural | coco (a user's data: data.train / data.test below)
    train: CocoSplitSpec | None = None
    test: CocoSplitSpec | None = None
    on_bad: str = "error"            # coco: error | drop (counted) on a bad annotation
    num_train: int = 400
    num_test: int = 100
    num_classes: int = 5
    size: int = 48
    max_objects: int = 4
    min_scale: float = 0.15
    max_scale: float = 0.5
    clutter: float = 0.5
    seed: int = 0


@dataclass
class DetectorModelConfig:
    kind: str = "fcos"
    backbone: str = "convnet"
    backbone_args: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    taps: list[str] = field(default_factory=lambda: ["feat2", "feat3"])
    width: int = 32
    tower: int = 2                   # fcos only
    head: dict[str, Any] = field(default_factory=dict)      # the kind's own options


def make_detector(m: DetectorModelConfig, num_classes: int, size: int) -> Any:
    """The detector a recipe's `model` block names (see `kdforge.tasks.detection.models`)."""
    from kdforge.tasks.detection.models import build_detector

    head = {"tower": m.tower, **m.head} if m.kind == "fcos" else dict(m.head)
    return build_detector(m.kind, m.backbone, m.backbone_args, m.taps, num_classes, m.width, size, **head)


@dataclass
class AugmentSpec:
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    flip: bool = True


@dataclass
class DetectorRecipe:
    method: str = "detector"
    seed: int = 0
    data: SceneDataConfig = field(default_factory=SceneDataConfig)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=10, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5)))
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def check(self, source: str) -> None:
        if len(self.augment.scale_range) != 2:
            raise ConfigError(f"{source}: augment.scale_range must be [low, high]")


def _coco_splits(d: SceneDataConfig) -> tuple[Any, Any]:
    """A user's COCO train / test sets, letterboxed to data.size; data.num_classes follows their categories."""
    from kdforge.tasks.detection.images import load_coco_images

    for name in ("train", "test"):
        spec = getattr(d, name)
        if spec is None or not spec.annotations or not spec.images:
            raise ConfigError(f"data.format coco needs data.{name}: {{annotations: FILE.json, images: DIR}}")
    train = load_coco_images(d.train.annotations, d.train.images, d.size, d.on_bad)
    test = load_coco_images(d.test.annotations, d.test.images, d.size, d.on_bad)
    if train.category_ids != test.category_ids:
        raise ConfigError(f"data: the test categories {test.category_ids} differ from the train categories "
                          f"{train.category_ids}")
    d.num_classes = train.num_classes
    for split, data in (("train", train), ("test", test)):
        if data.coco.dropped:
            print(f"data.{split}: dropped bad annotations {data.coco.dropped} (data.on_bad: drop)", flush=True)
    return train, test


def build_detection(cfg: DetectorRecipe) -> tuple[Any, Any]:
    """Train and test splits: procedural scenes (test drawn with data.seed + 1000) or a user's COCO data."""
    from kdforge.tasks.detection.scenes import procedural_scenes
    from kdforge.tasks.detection.task import DetectionData

    d = cfg.data
    if d.format not in ("procedural", "coco"):
        raise ConfigError(f"data.format must be procedural or coco, got {d.format!r}")
    if d.on_bad not in ("error", "drop"):
        raise ConfigError(f"data.on_bad must be error or drop, got {d.on_bad!r}")
    if d.format == "coco":
        return _coco_splits(d)
    common = {"num_classes": d.num_classes, "size": d.size, "max_objects": d.max_objects,
              "min_scale": d.min_scale, "max_scale": d.max_scale, "clutter": d.clutter}
    train = DetectionData(*procedural_scenes(d.num_train, seed=d.seed, **common))
    test = DetectionData(*procedural_scenes(d.num_test, seed=d.seed + 1000, **common))
    return train, test


def run_detector(cfg: DetectorRecipe, run_dir: str | Path, trainer: Any = None,
                 config_text: str = "") -> dict[str, Any]:
    from kdforge.tasks.detection.metrics import require_pycocotools
    from kdforge.tasks.detection.task import DetectionTask

    require_pycocotools()
    train, test = build_detection(cfg)
    torch.manual_seed(cfg.seed)
    detector = make_detector(cfg.model, cfg.data.num_classes, cfg.data.size)
    task = DetectionTask(detector, train, test, cfg.train.batch_size, cfg.seed, tuple(cfg.augment.scale_range),
                         cfg.augment.flip)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class Detector:
    """Registered entry for `method: detector` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, DetectorRecipe, method="detector")
        cfg.check(source)
        return run_detector(cfg, run_dir, trainer, text)


METHODS.register("detector", Detector, family="detection",
                 paper="object detector without distillation (model.kind: fcos | two_stage | query)",
                 summary="train a detector on procedural scenes or COCO data; COCO AP via pycocotools",
                 task="detection")
