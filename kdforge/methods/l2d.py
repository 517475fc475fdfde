"""L2D: multi-label knowledge distillation (Yang et al., ICCV 2023).

In multi-label learning the class probabilities do not sum to one, so softmax KD mixes labels
that are present together, and whole-image feature KD favours the dominant object. L2D:

* MLD (`kdforge.losses.l2d.l2d_mld_loss`): one-vs-all KL between the teacher's and student's
  sigmoid probabilities, summed over labels, averaged over images;
* LED (`l2d_led_loss`): the relational structure of label-wise embeddings (one D-dim vector per
  image and class, from a query-per-class decoder head) over the ground-truth positives:
  class-aware (CD, across the images positive for a class) and instance-aware (ID, across the
  positive labels of an image).

    L = BCE_sum(s, y) + w_mld * MLD + w_cd * CD + w_id * ID      (official: 10, 100, 1000)

(`configs/coco/resnet101_to_resnet34_l2d.py`; the feature term has weight 0). Both networks are
`kdforge.tasks.multilabel.LabelWiseNet` (a zoo backbone + ML-Decoder-like head); the teacher is
trained first with BCE alone and frozen. Both are stages of ordinary runs on the one Trainer
(`MultiLabelTask`): `kdforge train configs/methods/l2d.yaml --out runs/l2d` trains the teacher
into `runs/l2d/stages/teacher/` and the student into `runs/l2d/`; `kdforge train --resume
runs/l2d` continues either. Under torchrun each rank takes its share of every batch; BCE (mean)
and MLD are per-sample, LED relations and BCE (sum) are computed per rank. Recipe schema
(`configs/methods/l2d.yaml`):

    method: l2d
    seed: int                      # student init and batch order
    teacher_seed: int              # teacher init and batch order
    augment_seed: int              # crop/flip views (one value across runs lets them share cached teacher outputs)
    data: {num_train, num_val, num_test, num_classes, image_size, max_objects, rarity, seed}
          # procedural_multilabel; num_val > 0 adds a validation split (its own stream: train and
          # test do not change) whose metrics enter result.json as val_* (choose settings on it)
    teacher: {backbone, backbone_args, dim, heads}                                     # labelwise_net
    student: {backbone, backbone_args, dim, heads}
    teacher_train: LoopConfig      # {epochs, batch_size, optim, schedule, grad_clip, progress}
    train: LoopConfig
    augment: {crop_padding, flip}
    trainer: {device, threads, progress, stop_after_steps, ...}   # optional, every stage (TrainerConfig)
    l2d: {w_mld, w_cd, w_id, bce_reduction, eps, softmax_kd, kd_temperature}
         all weights 0 = the BCE-only student; softmax_kd > 0 adds Hinton KD over labels (comparison arm)
    teacher_only: bool             # train only the teacher, into the run directory itself (a shared
                                   # experiment stage); its result.json holds the teacher's test_mAP
    teacher_run: PATH | null       # a finished teacher run (a teacher_only run, or <run>/stages/teacher
                                   # of a full run) loaded instead of training the teacher; its data and
                                   # teacher sections must match this recipe's (data.num_val aside)

Unknown keys fail with one line naming the key. Documented deviations: AdamW with one weight
decay for all parameters (the official Adam excludes BN and biases from decay), a cosine
schedule instead of OneCycle, and a small decoder head (one layer, D = 32-64 instead of 768).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig, to_dict
from kdforge.distill.terms import Term
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.multilabel import (
    AugmentSpec,
    LabelWiseNet,
    MultiLabelData,
    MultiLabelTask,
    labelwise_net,
    procedural_multilabel,
)
from kdforge.train.stages import StageRun, loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["L2D", "L2DArgs", "L2DConfig", "build_multilabel", "l2d_terms", "load_teacher", "run_l2d",
           "train_teacher", "validation_split"]


@dataclass
class L2DArgs:
    w_mld: float = 10.0
    w_cd: float = 100.0
    w_id: float = 1000.0
    bce_reduction: str = "sum"
    eps: float = 1e-8
    softmax_kd: float = 0.0
    kd_temperature: float = 4.0


def l2d_terms(args: L2DArgs | None = None, embed_tap: str = "label_embed") -> list[Term]:
    """BCE task term plus the L2D distillation terms with non-zero weight (and optional softmax KD)."""
    a = args or L2DArgs()
    if min(a.w_mld, a.w_cd, a.w_id, a.softmax_kd) < 0:
        raise KdforgeError("l2d: loss weights must be >= 0")
    terms = [
        Term(
            "multilabel_bce", teacher=None, group="task", name="bce", loss_args={"reduction": a.bce_reduction}
        )
    ]
    if a.w_mld:
        terms.append(Term("l2d_mld", weight=a.w_mld, name="mld", loss_args={"eps": a.eps}))
    if a.w_cd or a.w_id:
        terms.append(
            Term(
                "l2d_led",
                student=embed_tap,
                teacher=embed_tap,
                name="led",
                loss_args={"w_cd": a.w_cd, "w_id": a.w_id},
            )
        )
    if a.softmax_kd:
        terms.append(
            Term("kd", weight=a.softmax_kd, name="softmax_kd", loss_args={"temperature": a.kd_temperature})
        )
    return terms


@dataclass
class MultiLabelDataConfig:
    num_train: int = 2000
    num_val: int = 0
    num_test: int = 1000
    num_classes: int = 6
    image_size: int = 24
    max_objects: int = 3
    rarity: float = 0.05
    seed: int = 0


@dataclass
class LabelWiseConfig:
    backbone: str = "convnet"
    backbone_args: dict[str, Any] = field(default_factory=lambda: {"width": 8})
    dim: int = 32
    heads: int = 4


def _loop(epochs: int) -> LoopConfig:
    return LoopConfig(
        epochs=epochs,
        batch_size=32,
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine"),
    )


@dataclass
class L2DConfig:
    method: str = "l2d"
    seed: int = 0
    teacher_seed: int = 100
    augment_seed: int = 0
    data: MultiLabelDataConfig = field(default_factory=MultiLabelDataConfig)
    teacher: LabelWiseConfig = field(
        default_factory=lambda: LabelWiseConfig(backbone_args={"width": 32}, dim=64)
    )
    student: LabelWiseConfig = field(default_factory=LabelWiseConfig)
    teacher_train: LoopConfig = field(default_factory=lambda: _loop(16))
    train: LoopConfig = field(default_factory=lambda: _loop(12))
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    l2d: L2DArgs = field(default_factory=L2DArgs)
    teacher_only: bool = False
    teacher_run: str | None = None

    def check(self) -> None:
        if self.teacher_only and self.teacher_run:
            raise ConfigError("l2d recipe: teacher_only trains the teacher, teacher_run loads one: set one of them")
        if self.l2d.bce_reduction not in ("sum", "mean"):
            raise ConfigError(
                f"l2d recipe: l2d.bce_reduction must be sum or mean, got {self.l2d.bce_reduction!r}"
            )


def build_multilabel(cfg: L2DConfig) -> tuple[MultiLabelData, MultiLabelData]:
    """The train and test splits of the recipe's procedural multi-label set."""
    d = cfg.data
    args = (d.num_train, d.num_test, d.num_classes, d.image_size, d.max_objects, d.rarity, d.seed, d.num_val)
    return procedural_multilabel("train", *args), procedural_multilabel("test", *args)


def validation_split(cfg: L2DConfig) -> MultiLabelData | None:
    """The held-out validation split (`data.num_val` images from its own stream), or None."""
    d = cfg.data
    if d.num_val <= 0:
        return None
    return procedural_multilabel("val", d.num_train, d.num_test, d.num_classes, d.image_size, d.max_objects,
                                 d.rarity, d.seed, d.num_val)


def _net(m: LabelWiseConfig, data: MultiLabelData) -> LabelWiseNet:
    return labelwise_net(m.backbone, data.num_classes, data.images.shape[1], m.dim, m.heads, m.backbone_args)


def _teacher_task(cfg: L2DConfig) -> MultiLabelTask:
    train, test = build_multilabel(cfg)
    torch.manual_seed(cfg.teacher_seed)
    teacher = _net(cfg.teacher, train)
    terms = l2d_terms(L2DArgs(w_mld=0, w_cd=0, w_id=0, bce_reduction=cfg.l2d.bce_reduction))
    return MultiLabelTask(teacher, train, test, terms, cfg.teacher_train.batch_size, cfg.teacher_seed,
                          augment=cfg.augment, augment_seed=cfg.augment_seed, val=validation_split(cfg))


def train_teacher(cfg: L2DConfig, run_dir: str | Path, trainer: TrainerConfig | None = None,
                  config_text: str = "", stage: str | None = "teacher") -> StageRun:
    """Stage `teacher`: a wider LabelWiseNet trained with BCE alone (seed `teacher_seed`), into
    `<run_dir>/stages/teacher` (`stage=None`: into `run_dir` itself); a finished stage is loaded,
    not retrained."""
    settings = loop_settings(cfg.teacher_train, cfg.teacher_seed, trainer)
    return run_stage(run_dir, stage, settings, _teacher_task(cfg), config_text or _recipe_text(cfg))


def _teacher_sections(cfg: L2DConfig) -> dict[str, Any]:
    data = to_dict(cfg.data)
    data.pop("num_val")             # the teacher never reads the validation split
    return {"data": data, "teacher": to_dict(cfg.teacher)}


def load_teacher(cfg: L2DConfig, path: str | Path) -> nn.Module:
    """The frozen teacher of a finished teacher run (`teacher_only` run or `<run>/stages/teacher`).

    Fails in one line when the run is unfinished or was trained on other data or another teacher
    architecture than `cfg` describes.
    """
    stage = reuse_stage(path, L2DConfig, cfg, _teacher_sections, "l2d", "teacher_run",
                        loop_settings(cfg.teacher_train, cfg.teacher_seed), _teacher_task(cfg),
                        "teacher_only=true, or resume it")
    return stage.module.eval_model()


def run_l2d(
    cfg: L2DConfig,
    run_dir: str | Path,
    teacher: nn.Module | None = None,
    teacher_cache: dict[int, dict[str, Tensor]] | None = None,
    trainer: TrainerConfig | None = None,
    config_text: str = "",
) -> dict[str, Any]:
    """The recipe's stages: the teacher (unless given or not needed), then the student into `run_dir`.

    Returns the student run's result (test mAP after the last epoch, per-label APs, the validation
    split's metrics when `data.num_val` > 0, the teacher's test mAP), or `{"stopped_at_step": ...}`
    when `trainer.stop_after_steps` stopped a stage. `teacher_only` trains the teacher into `run_dir`
    and returns its result; `teacher_run` loads a finished teacher instead of training one.
    """
    cfg.check()
    text = config_text or _recipe_text(cfg)
    if cfg.teacher_only:
        return train_teacher(cfg, run_dir, trainer, text, stage=None).result
    train, test = build_multilabel(cfg)
    terms = l2d_terms(cfg.l2d)
    needs_teacher = any(t.needs_teacher for t in terms)
    if needs_teacher and teacher is None and cfg.teacher_run:
        teacher = load_teacher(cfg, cfg.teacher_run)
    elif needs_teacher and teacher is None:
        stage = train_teacher(cfg, run_dir, trainer, text)
        if stage.stopped:
            return stage.result
        teacher = stage.module.eval_model()
    if teacher is not None:
        teacher = teacher.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student = _net(cfg.student, train)
    task = MultiLabelTask(student, train, test, terms, cfg.train.batch_size, cfg.seed,
                          teacher if needs_teacher else None, cfg.augment, cfg.augment_seed, teacher_cache,
                          val=validation_split(cfg))
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, text).result


def _recipe_text(cfg: L2DConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class L2D:
    """Registered entry for `l2d`: the term builder (`L2D.terms`) and the recipe runner."""

    terms = staticmethod(l2d_terms)

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: str | Path) -> dict[str, Any]:
        """Run a `configs/methods/l2d.yaml` recipe into `run_dir` (see the module docstring)."""
        cfg, trainer, text = parse_recipe(tree, source, L2DConfig, method="l2d")
        return run_l2d(cfg, run_dir, trainer=trainer, config_text=text)


METHODS.register(
    "l2d",
    L2D,
    family="multi-label",
    paper="Multi-Label Knowledge Distillation (Yang et al., ICCV 2023)",
    summary="one-vs-all sigmoid KL on logits (MLD) + class-/instance-aware relational KD of "
    "label-wise embeddings (LED)",
    task="multilabel",
)
