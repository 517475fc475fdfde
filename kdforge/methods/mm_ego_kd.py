"""Multimodal distillation for egocentric action recognition (Radevski et al., ICCV 2023), `mm_ego_kd`.

Unimodal teachers (here: RGB, optical flow and audio clip models, optionally a late-fusion
multimodal model) are trained separately on the labels; a student that sees **RGB only** is
trained to match their combined prediction:

    weights  w = softmin(mean_CE_m / tau_w)        per teacher m, on a held-out part of the training
                                                   split the teachers never trained on ("full-dataset")
    teacher  z_T = sum_m w_m * z_m                 a weighted average of *logits*
    loss     L = a_kd * T^2 * KL(softmax(z_T/T) || softmax(z_S/T)) + a_gt * CE(z_S, y)
                                                   (KL in log space, batch mean; averaged over heads)

Defaults are the official code's: T = 1, tau_w = 1, a_kd = 1, a_gt = 0 (pure distillation). Other
weighting schemes: `uniform` (1/M) and `per-sample` (softmin over that clip's per-teacher CE with
its label). Teachers and student see the same, identically augmented clip at every step.

Stages (each an ordinary, resumable run on the one Trainer): `stages/teacher_<name>` for every
ensemble member (on the teachers' part of the training split), then the weight estimation (a
no-grad pass over the held-out part, recomputed identically on resume), then the RGB student
(all training clips) into the run directory. `teacher_only: <name>` trains one teacher into the
run directory itself (an experiment's shared stage); `teacher_runs.<name>: DIR` loads a finished
teacher run instead of training one (its data and teacher settings must match). Recipe schema
(`configs/methods/mm_ego_kd.yaml`):

    method: mm_ego_kd
    seed: int                  # the student's initialisation, batch order and augmentation
    teacher_seed: int          # the teachers' (teacher i uses teacher_seed + i)
    data: ClipSpec             # kdforge.tasks.video.data: the scene, split sizes, holdout_fraction,
                               # label_noise, seed; or format: folder + root: a user's clips
                               # (kdforge.tasks.video.folders: frames, flow u/v frames, audio.wav)
    teachers: [rgb, flow, audio]   # the ensemble (modalities, or fusion)
    fusion: [rgb, flow, audio]     # the fusion teacher's modalities
    teacher_model: {width, norm}   # every teacher's ClipNet width and normalisation (batch | group)
    student: {modality, width, norm}   # the student's input (rgb) and network (paper: the RGB
                                       # teacher's architecture)
    teacher_train: LoopConfig
    train: LoopConfig
    augment: {shift}           # spatial shift (px) shared by all visual modalities of a clip
    distill: {weighting, weight_split, tau_w, temperature, a_kd, a_gt, bins}
                               # weighting: full-dataset | uniform | per-sample; weight_split:
                               # holdout (the paper) | teacher_train (the teachers' own clips, to
                               # show why that is wrong); a_kd 0 + a_gt 1 = the student from labels
    teacher_only: null | <name>
    teacher_runs: {rgb, flow, audio, fusion}   # finished teacher runs (null: train it here)
    trainer: {...}

Result: the student's test / val top-1 and ECE (final weights), every teacher's and the
ensemble's val / test top-1 and ECE, the weights (held-out and on the teachers' own clips),
each teacher's held-out CE, and the inference compute of student and ensemble (FLOPs, params,
`compute_saved` = 1 - student / ensemble FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig, to_dict
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.video.data import MODALITIES, ClipData, ClipSpec, procedural_clips, split_holdout
from kdforge.tasks.video.folders import load_clip_folder
from kdforge.tasks.video.metrics import calibration_error, top1
from kdforge.tasks.video.models import clip_model, cost
from kdforge.tasks.video.task import ClipBatch, ClipModule, ClipTask, clip_logits
from kdforge.train.stages import StageRun, loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["MMEgoKD", "MMEgoKDModule", "MMEgoKDRecipe", "TeacherEnsemble", "ensemble_kd_loss", "estimate_weights",
           "per_teacher_ce", "run_mm_ego_kd", "softmin_weights"]

TEACHER_NAMES = (*MODALITIES, "fusion")
SCHEMES = ("full-dataset", "uniform", "per-sample")


# ------------------------------------------------------------------------------------- mechanism


def per_teacher_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, M) cross-entropy of each teacher's logits (B, M, C) with each clip's label (B,)."""
    b, m, c = logits.shape
    return F.cross_entropy(logits.reshape(b * m, c), labels.repeat_interleave(m), reduction="none").view(b, m)


def softmin_weights(losses: Tensor, tau: float = 1.0) -> Tensor:
    """softmin(losses / tau) over the last dim: lower loss -> larger weight, summing to one."""
    if tau <= 0:
        raise KdforgeError(f"the weighting temperature must be > 0, got {tau}")
    return F.softmin(losses / tau, dim=-1)


def ensemble_kd_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor],
                     temperature: float = 1.0) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) (batch mean, log-space target), averaged over heads."""
    students = [student] if isinstance(student, Tensor) else list(student)
    teachers = [teacher] if isinstance(teacher, Tensor) else list(teacher)
    if len(students) != len(teachers) or not students:
        raise KdforgeError(f"ensemble_kd_loss: {len(students)} student heads for {len(teachers)} teacher heads")
    total = 0.0
    for s, t in zip(students, teachers):
        if s.shape != t.shape:
            raise KdforgeError(f"student logits {tuple(s.shape)} do not match the teacher's {tuple(t.shape)}")
        total = total + F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                                 reduction="batchmean", log_target=True) * temperature ** 2
    return total / len(students)


class TeacherEnsemble(nn.Module):
    """Frozen teachers whose logits are combined by a weighted average (weights: a buffer or per sample)."""

    def __init__(self, teachers: dict[str, nn.Module], scheme: str = "full-dataset", tau: float = 1.0) -> None:
        super().__init__()
        if not teachers:
            raise ConfigError("the teacher ensemble needs at least one teacher")
        if scheme not in SCHEMES:
            raise ConfigError(f"distill.weighting must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        self.teachers = nn.ModuleDict(teachers).eval().requires_grad_(False)
        self.scheme, self.tau = scheme, tau
        self.register_buffer("weights", torch.full((len(teachers),), 1.0 / len(teachers)))

    @property
    def names(self) -> list[str]:
        return list(self.teachers)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)          # frozen batch-norm statistics

    @torch.no_grad()
    def member_logits(self, inputs: dict[str, Tensor]) -> Tensor:
        """(B, M, C): every teacher's logits on its own modality of the clips."""
        return torch.stack([t(inputs) for t in self.teachers.values()], 1)

    @torch.no_grad()
    def forward(self, inputs: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        logits = self.member_logits(inputs)
        if self.scheme == "per-sample":
            if labels is None:
                raise KdforgeError("per-sample teacher weights need the clips' labels")
            weights = softmin_weights(per_teacher_ce(logits, labels), self.tau)           # (B, M)
        else:
            weights = self.weights.expand(logits.shape[0], -1)
        return (logits * weights.unsqueeze(-1)).sum(1)


@torch.no_grad()
def estimate_weights(ensemble: TeacherEnsemble, data: ClipData, index: Tensor, device: torch.device,
                     batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """The card's "full-dataset" pass: (mean CE of each teacher on `data[index]` with its training labels,
    softmin(mean CE / tau)). No augmentation, eval mode."""
    total = torch.zeros(len(ensemble.names), dtype=torch.float64)
    for start in range(0, len(index), batch_size):
        pick = index[start:start + batch_size]
        logits = ensemble.member_logits({k: v[pick].to(device) for k, v in data.modalities.items()})
        total += per_teacher_ce(logits.float(), data.labels[pick].to(device)).sum(0).double().cpu()
    mean_ce = (total / len(index)).float()
    return mean_ce, softmin_weights(mean_ce, ensemble.tau)


class MMEgoKDModule(ClipModule):
    """The RGB student; `teachers` (frozen) is the weighted ensemble; losses `kd` (a_kd) and `ce` (a_gt)."""

    def __init__(self, student: nn.Module, ensemble: TeacherEnsemble | None, a_kd: float, a_gt: float,
                 temperature: float) -> None:
        super().__init__(student, a_gt)
        self.teachers = ensemble
        self.a_kd, self.temperature = a_kd, temperature

    def extra_losses(self, batch: ClipBatch, logits: Tensor) -> dict[str, Tensor]:
        if not self.a_kd or self.teachers is None:
            return {}
        target = self.teachers(batch.inputs, batch.target)
        return {"kd": self.a_kd * ensemble_kd_loss(logits, target, self.temperature)}


# ------------------------------------------------------------------------------------- recipe


@dataclass
class ModelConfig:
    width: int = 8
    norm: str = "batch"               # batch | group (group: exact under torchrun on CPU)


@dataclass
class StudentConfig:
    modality: str = "rgb"
    width: int = 8
    norm: str = "batch"


@dataclass
class AugmentConfig:
    shift: int = 2


@dataclass
class DistillConfig:
    weighting: str = "full-dataset"   # full-dataset | uniform | per-sample
    weight_split: str = "holdout"     # holdout (never trained on) | teacher_train (the teachers' own clips)
    tau_w: float = 1.0
    temperature: float = 1.0
    a_kd: float = 1.0
    a_gt: float = 0.0
    bins: int = 15                    # ECE bins


@dataclass
class TeacherRuns:
    rgb: str | None = None
    flow: str | None = None
    audio: str | None = None
    fusion: str | None = None


def _loop(epochs: int) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=32, grad_clip=5.0,
                      optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=1e-4),
                      schedule=ScheduleConfig(name="cosine", warmup_epochs=1))


@dataclass
class MMEgoKDRecipe:
    method: str = "mm_ego_kd"
    seed: int = 0
    teacher_seed: int = 100
    data: ClipSpec = field(default_factory=ClipSpec)
    teachers: list[str] = field(default_factory=lambda: ["rgb", "flow", "audio"])
    fusion: list[str] = field(default_factory=lambda: ["rgb", "flow", "audio"])
    teacher_model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher_train: LoopConfig = field(default_factory=lambda: _loop(30))
    train: LoopConfig = field(default_factory=lambda: _loop(30))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_only: str | None = None
    teacher_runs: TeacherRuns = field(default_factory=TeacherRuns)

    def check(self, source: str) -> None:
        self.data.check(f"{source}: data")
        d = self.distill
        if d.weighting not in SCHEMES:
            raise ConfigError(f"{source}: distill.weighting must be one of {', '.join(SCHEMES)}, got {d.weighting!r}")
        if d.weight_split not in ("holdout", "teacher_train"):
            raise ConfigError(f"{source}: distill.weight_split must be holdout or teacher_train, "
                              f"got {d.weight_split!r}")
        if d.a_kd < 0 or d.a_gt < 0 or d.a_kd + d.a_gt == 0:
            raise ConfigError(f"{source}: distill.a_kd and distill.a_gt must be >= 0 and not both 0")
        if d.tau_w <= 0 or d.temperature <= 0 or d.bins < 1:
            raise ConfigError(f"{source}: distill.tau_w and distill.temperature must be > 0 and distill.bins >= 1")
        for name in [*self.teachers, *([self.teacher_only] if self.teacher_only else [])]:
            if name not in TEACHER_NAMES:
                raise ConfigError(f"{source}: unknown teacher {name!r} (teachers: {', '.join(TEACHER_NAMES)})")
        if not self.teachers or len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(f"{source}: teachers must name at least one distinct teacher, got {self.teachers}")
        if len(self.fusion) < 2 or any(m not in MODALITIES for m in self.fusion):
            raise ConfigError(f"{source}: fusion must name two or more of {', '.join(MODALITIES)}, got {self.fusion}")
        if self.student.modality not in MODALITIES:
            raise ConfigError(f"{source}: student.modality must be one of {', '.join(MODALITIES)}, "
                              f"got {self.student.modality!r}")
        if self.teacher_model.norm not in ("batch", "group") or self.student.norm not in ("batch", "group"):
            raise ConfigError(f"{source}: teacher_model.norm and student.norm must be batch or group")
        if self.augment.shift < 0:
            raise ConfigError(f"{source}: augment.shift must be >= 0, got {self.augment.shift}")
        self.teacher_train.check(f"{source}: teacher_train")
        self.train.check(f"{source}: train")


def _splits(cfg: MMEgoKDRecipe) -> tuple[ClipData, ClipData, ClipData]:
    if cfg.data.format == "folder":
        d = cfg.data
        used = [m for m in MODALITIES if m in (*cfg.teachers, *cfg.fusion, cfg.student.modality)
                or ("fusion" in cfg.teachers and m in cfg.fusion)]
        return tuple(load_clip_folder(d.root, s, d.verbs, d.nouns, d.frames, d.size, d.audio_bins, d.audio_steps,
                                      d.flow_bound, used) for s in ("train", "val", "test"))
    return tuple(procedural_clips(cfg.data, s) for s in ("train", "val", "test"))


def _teacher_model(cfg: MMEgoKDRecipe, name: str, data: ClipData) -> nn.Module:
    torch.manual_seed(cfg.teacher_seed + TEACHER_NAMES.index(name))
    return clip_model(name, data.shapes(), data.num_classes, cfg.teacher_model.width, cfg.fusion,
                      cfg.teacher_model.norm)


def _teacher_task(cfg: MMEgoKDRecipe, name: str, splits: tuple[ClipData, ClipData, ClipData]) -> ClipTask:
    train, val, test = splits
    own, _ = split_holdout(train, cfg.data.holdout_fraction)
    seed = cfg.teacher_seed + TEACHER_NAMES.index(name)
    return ClipTask(ClipModule(_teacher_model(cfg, name, train), a_gt=1.0), train, val, test,
                    cfg.teacher_train.batch_size, seed, own, cfg.augment.shift, cfg.distill.bins,
                    describe={"model": name, "role": "teacher"})


def _teacher_sections(name: str) -> Any:
    def identity(cfg: MMEgoKDRecipe) -> dict[str, Any]:
        out = {"data": to_dict(cfg.data), "teacher_model": to_dict(cfg.teacher_model),
               "teacher_seed": cfg.teacher_seed, "teacher_train": to_dict(cfg.teacher_train),
               "augment": to_dict(cfg.augment)}
        if name == "fusion":
            out["fusion"] = {"modalities": ",".join(cfg.fusion)}
        return out
    return identity


def teacher_stage(cfg: MMEgoKDRecipe, name: str, run_dir: str | Path, splits: tuple[ClipData, ClipData, ClipData],
                  trainer: TrainerConfig | None, text: str, stage: str | None) -> StageRun:
    """Teacher `name`: loaded from `teacher_runs.<name>`, or trained (resumed) into `stage` of `run_dir`."""
    seed = cfg.teacher_seed + TEACHER_NAMES.index(name)
    settings = loop_settings(cfg.teacher_train, seed, trainer)
    task = _teacher_task(cfg, name, splits)
    given = getattr(cfg.teacher_runs, name)
    if given and stage is not None:
        return reuse_stage(given, MMEgoKDRecipe, cfg, _teacher_sections(name), "mm_ego_kd",
                           f"teacher_runs.{name}", settings, task, f"teacher_only={name}, or resume it")
    return run_stage(run_dir, stage, settings, task, text)


def _ensemble_report(ensemble: TeacherEnsemble, splits: tuple[ClipData, ClipData, ClipData], device: torch.device,
                     bins: int) -> dict[str, float]:
    """Each teacher's and the ensemble's (as configured, and uniform) val / test top-1 and ECE."""
    out: dict[str, float] = {}
    _, val, test = splits
    for split, data in (("val", val), ("test", test)):
        members = torch.cat([clip_logits(t, data, device).unsqueeze(1) for t in ensemble.teachers.values()], 1)
        target = data.true_labels
        for j, name in enumerate(ensemble.names):
            out[f"teacher_{name}_{split}_top1"] = top1(members[:, j], target)
        if ensemble.scheme == "per-sample":       # needs labels: the true ones here (an upper bound)
            weights = softmin_weights(per_teacher_ce(members, target), ensemble.tau)
        else:
            weights = ensemble.weights.cpu().expand(len(target), -1)
        fused = (members * weights.unsqueeze(-1)).sum(1)
        uniform = members.mean(1)
        out[f"ensemble_{split}_top1"] = top1(fused, target)
        out[f"ensemble_{split}_ece"] = calibration_error(fused, target, bins)
        out[f"uniform_ensemble_{split}_top1"] = top1(uniform, target)
    return out


def run_mm_ego_kd(cfg: MMEgoKDRecipe, run_dir: str | Path, trainer: TrainerConfig | None = None,
                  config_text: str = "") -> dict[str, Any]:
    """The recipe's stages (see the module docstring); returns the student's (or `teacher_only`'s) result."""
    text = config_text or yaml.safe_dump(to_dict(cfg), sort_keys=False)
    splits = _splits(cfg)
    train, val, test = splits
    if cfg.teacher_only:
        return teacher_stage(cfg, cfg.teacher_only, run_dir, splits, trainer, text, None).result
    d = cfg.distill
    extra: dict[str, Any] = {}
    ensemble = None
    device = torch.device("cpu")
    if d.a_kd > 0:
        teachers = {}
        for name in cfg.teachers:
            stage = teacher_stage(cfg, name, run_dir, splits, trainer, text, f"teacher_{name}")
            if stage.stopped:
                return stage.result
            teachers[name] = stage.module.eval_model()
        device = next(iter(teachers.values())).head.weight.device
        ensemble = TeacherEnsemble(teachers, d.weighting, d.tau_w).to(device)
        own, held = split_holdout(train, cfg.data.holdout_fraction)
        held_ce, held_w = estimate_weights(ensemble, train, held, device)
        own_ce, own_w = estimate_weights(ensemble, train, own, device)
        if d.weighting == "full-dataset":
            ensemble.weights.copy_(held_w if d.weight_split == "holdout" else own_w)
        for j, name in enumerate(ensemble.names):
            extra[f"holdout_ce_{name}"] = float(held_ce[j])
            extra[f"weight_{name}"] = float(held_w[j])
            extra[f"teacher_train_ce_{name}"] = float(own_ce[j])
            extra[f"teacher_train_weight_{name}"] = float(own_w[j])
            extra[f"used_weight_{name}"] = float(ensemble.weights[j])
        extra.update(_ensemble_report(ensemble, splits, device, d.bins))
    torch.manual_seed(cfg.seed)
    student = clip_model(cfg.student.modality, train.shapes(), train.num_classes, cfg.student.width,
                         norm=cfg.student.norm)
    sample = {k: v[:1] for k, v in test.modalities.items()}
    s_cost = cost(student, sample)
    extra.update({"student_flops": s_cost["flops"], "student_params": s_cost["params"]})
    if ensemble is not None:
        t_costs = [cost(t, sample) for t in ensemble.teachers.values()]
        flops = sum(c["flops"] for c in t_costs)
        extra.update({"ensemble_flops": flops, "ensemble_params": sum(c["params"] for c in t_costs),
                      "compute_saved": 1.0 - s_cost["flops"] / flops})
    module = MMEgoKDModule(student, ensemble, d.a_kd, d.a_gt, d.temperature)
    task = ClipTask(module, train, val, test, cfg.train.batch_size, cfg.seed, None, cfg.augment.shift, d.bins,
                    extra_result=extra, describe={"model": f"student ({cfg.student.modality})",
                                                  "teachers": list(cfg.teachers) if ensemble is not None else []})
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, text).result


class MMEgoKD:
    """Registered entry for `method: mm_ego_kd` task recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, MMEgoKDRecipe, method="mm_ego_kd")
        cfg.check(source)
        return run_mm_ego_kd(cfg, run_dir, trainer, text)


METHODS.register(
    "mm_ego_kd", MMEgoKD, family="video",
    paper="Multimodal Distillation for Egocentric Action Recognition (ICCV 2023)",
    summary="RGB-only student distilled (temperature KL on logits) from unimodal teachers (RGB, flow, audio) "
            "combined by a weighted logit average, weights = softmin of each teacher's CE on held-out clips",
    task="video")
