"""WAD: semi-supervised learning via weight-aware distillation under class distribution mismatch
(Du et al., ICCV 2023).

The unlabelled pool holds unknown classes. A contrastive teacher (SimCLR, trained without
labels on the labelled + unlabelled pool, then frozen) passes its knowledge to the classifier
only through per-sample pseudo-labels and weights (official `evals/eval.py::knowledge_generation`):

    s_c(u) = max_{x in L_c} cos(g(u), g(x))   (nearest labelled exemplar of each known class c)
    yhat(u) = argmax_c s_c(u)                 w(u) = s_(1) * (1 - s_(2) / s_(1)) = s_(1) - s_(2)

Samples of unknown classes tend to sit between known classes, so their margin (weight) is
small; weights are raw margins, not normalised, and nothing is rejected by a threshold. The
classifier (known classes only) trains with CE on the labelled batch plus mean_u w(u) CE(f(u),
yhat(u)) (Adam 5e-4, 32 + 32 per step, `iterations` steps per round, optimizer rebuilt each
round). After round r, the alpha_r |U| unlabelled samples with the smallest CE(f(u), yhat(u))
move to the labelled set with label yhat (alpha_r = alpha0 (1 - r/split)^2, alpha0 = 0.1);
the exemplar bank grows and the scores are recomputed, for split + 1 rounds (official
`distillation_main.py`, `SSL/train/train.py`). Evaluation: accuracy on known-class test images.

Stages (each an ordinary run of the one Trainer): `teacher` (`ContrastiveTask`, in
`<run>/stages/teacher/`), then the classifier (`WADTask`, in the run directory itself): one
Trainer epoch per round, `iterations` steps each, a fresh optimizer per round, the index sets,
pseudo-labels and weights as task state. Mode `supervised` has no teacher stage and trains
iterations * (split + 1) steps in one epoch. Both stages run exactly under torchrun (the
teacher's NT-Xent over all-gathered projections, the classifier's per-sample means over each
rank's share of both streams).

Documented deviations: teacher features come from the deterministic (un-augmented) view (the
official code scores one random SimCLR-augmented view per image); the learning-rate schedule
spans all rounds (the recipe's is constant, as the official Adam's).

Recipe schema (`configs/methods/wad.yaml`; `kdforge train configs/methods/wad.yaml --out runs/wad`):

    method: wad
    seed: int
    data: {num_known, num_unknown, dim, per_class, per_class_test, labelled_per_class,
           unlabelled_per_class, mismatch, separation, rank, spread, noise, seed}
           (gaussian_blobs + mismatch_split)
    teacher: {hidden, proj_dim, temperature, loop: LoopConfig, augment: {noise, drop, scale}}
    student: {hidden}
    train: LoopConfig (batch_size per stream, optim, schedule; its epochs are not read); iterations:
           steps per round
    wad: {mode: wad | pseudo | supervised, split, alpha, power}
         mode pseudo = the teacher's pseudo-labels with w = 1; supervised = labelled CE only;
         split 0 = one round (no selection). Every mode trains iterations * (split + 1) steps in all
         (the supervised mode in one go), so a single-round arm with the same budget sets
         iterations to the multi-round arm's iterations * (split + 1).
    teacher_only: bool             train only the contrastive teacher, into the run directory itself
                                   (an experiment's shared stage)
    teacher_run: PATH | null       a finished teacher run (a teacher_only run, or <run>/stages/teacher
                                   of a full run) loaded instead of training the teacher; its data
                                   section and teacher architecture must match this recipe's
    trainer: optional TrainerConfig options for every stage (device, progress, stop_after_steps ...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.models import create_model
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.ssl import (
    ContrastiveEncoder,
    ContrastiveTask,
    RoundsTask,
    SSLData,
    embed,
    gaussian_blobs,
    mismatch_split,
    vector_augment,
)
from kdforge.train.stages import StageRun, loop_settings, parse_recipe, run_stage, shared_recipe

__all__ = [
    "WAD",
    "WADConfig",
    "WADTask",
    "build_ssl",
    "load_teacher",
    "polynomial_decay",
    "run_wad",
    "select_confident",
    "teacher_stage",
    "train_teacher",
    "wad_knowledge",
    "wad_scores",
]

MODES = ("wad", "pseudo", "supervised")


def wad_scores(emb_unlabelled: Tensor, emb_labelled: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(U, K): per unlabelled sample, the highest cosine similarity to a labelled exemplar of each class.

    Embeddings are L2-normalised here; every class needs at least one exemplar.
    """
    if (
        emb_unlabelled.dim() != 2
        or emb_labelled.dim() != 2
        or emb_unlabelled.shape[1] != emb_labelled.shape[1]
    ):
        raise KdforgeError(
            f"wad: embeddings must be (U, D) and (L, D), got {tuple(emb_unlabelled.shape)} and "
            f"{tuple(emb_labelled.shape)}"
        )
    if labels.shape != (emb_labelled.shape[0],):
        raise KdforgeError(
            f"wad: {emb_labelled.shape[0]} labelled embeddings but labels {tuple(labels.shape)}"
        )
    sims = F.normalize(emb_unlabelled.float(), dim=1) @ F.normalize(emb_labelled.float(), dim=1).t()  # (U, L)
    cols = []
    for c in range(num_classes):
        members = labels == c
        if not bool(members.any()):
            raise KdforgeError(f"wad: class {c} has no labelled exemplar")
        cols.append(sims[:, members].max(dim=1).values)
    return torch.stack(cols, dim=1)


def wad_knowledge(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(pseudo-labels, weights) from class scores (U, K >= 2): argmax and the margin s_(1) - s_(2)."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise KdforgeError(f"wad: scores must be (U, K) with K >= 2 known classes, got {tuple(scores.shape)}")
    top = scores.topk(2, dim=1)
    s1, s2 = top.values[:, 0], top.values[:, 1]
    return top.indices[:, 0], s1 - s2  # = s1 * (1 - s2 / s1), without dividing by a possible 0


def polynomial_decay(step: int, start: float, end: float, decay_steps: int, power: float = 2.0) -> float:
    """(start - end) * (1 - min(step, decay_steps) / decay_steps)^power + end (official alpha schedule)."""
    if decay_steps < 1:
        raise KdforgeError(f"wad: decay_steps must be >= 1, got {decay_steps}")
    step = min(step, decay_steps)
    return (start - end) * (1 - step / decay_steps) ** power + end


def select_confident(logits: Tensor, pseudo: Tensor, fraction: float) -> Tensor:
    """Positions of the int(fraction * U) samples whose prediction best agrees with yhat (lowest CE)."""
    count = int(fraction * len(pseudo))
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    ce = F.cross_entropy(logits.float(), pseudo.long(), reduction="none")
    return torch.topk(-ce, min(count, len(ce))).indices


# ------------------------------------------------------------------------------------- recipe


@dataclass
class BlobConfig:
    num_known: int = 4
    num_unknown: int = 4
    dim: int = 16
    per_class: int = 500
    per_class_test: int = 200
    labelled_per_class: int = 5
    unlabelled_per_class: int | None = 300
    mismatch: float = 0.6
    separation: float = 0.5
    rank: int = 3
    spread: float = 1.5
    noise: float = 0.5
    seed: int = 0


@dataclass
class AugmentConfig:
    noise: float = 0.3
    drop: float = 0.2
    scale: float = 0.2


@dataclass
class TeacherConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    proj_dim: int = 32
    temperature: float = 0.5
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            epochs=40,
            batch_size=256,
            optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-6),
            schedule=ScheduleConfig(name="cosine"),
        )
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class StudentConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 64])


@dataclass
class WADArgs:
    mode: str = "wad"
    split: int = 5
    alpha: float = 0.1
    power: float = 2.0


@dataclass
class WADConfig:
    method: str = "wad"
    seed: int = 0
    data: BlobConfig = field(default_factory=BlobConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            epochs=1,
            batch_size=32,
            optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=0.0),
            schedule=ScheduleConfig(name="constant"),
        )
    )
    iterations: int = 300
    wad: WADArgs = field(default_factory=WADArgs)
    teacher_only: bool = False
    teacher_run: str | None = None

    def check(self) -> None:
        if self.teacher_only and self.teacher_run:
            raise ConfigError("wad recipe: teacher_only trains the teacher, teacher_run loads one: set one of them")
        if self.wad.mode not in MODES:
            raise ConfigError(
                f"wad recipe: wad.mode must be one of {', '.join(MODES)}, got {self.wad.mode!r}"
            )
        if self.wad.split < 0 or not 0 <= self.wad.alpha < 1 or self.iterations < 1:
            raise ConfigError("wad recipe: need wad.split >= 0, 0 <= wad.alpha < 1 and iterations >= 1")
        if self.data.num_known < 2:
            raise ConfigError("wad recipe: data.num_known must be >= 2 (the weight is a top-2 margin)")
        self.train.check("wad recipe: train")
        self.teacher.loop.check("wad recipe: teacher.loop")


def _mlp(in_features: int, out: int, hidden: list[int]) -> nn.Module:
    return create_model("mlp", num_classes=out, in_features=in_features, hidden=tuple(hidden))


def _encoder(in_features: int, t: TeacherConfig) -> nn.Module:
    backbone = _mlp(in_features, 1, t.hidden)
    backbone.fc = nn.Identity()
    return ContrastiveEncoder(backbone, t.hidden[-1], t.proj_dim)


class WADTask(RoundsTask):
    """The WAD classifier: pseudo-labels and margin weights from the frozen teacher, confident samples move."""

    name = "wad"

    def __init__(self, cfg: WADConfig, data: SSLData, teacher: nn.Module | None = None) -> None:
        w = cfg.wad
        supervised = w.mode == "supervised"
        if not supervised and teacher is None:
            raise KdforgeError(f"wad: mode {w.mode} needs the contrastive teacher")
        rounds = w.split + 1
        super().__init__(data, cfg.student.hidden, cfg.train.batch_size,
                         cfg.iterations * rounds if supervised else cfg.iterations,
                         rounds=1 if supervised else rounds, seed=cfg.seed, unlabelled=not supervised)
        self.args = w
        self.teacher = teacher

    def build(self, device: torch.device, env: Any) -> nn.Module:
        if self.teacher is not None:      # the frozen teacher's embeddings of the whole pool (CPU)
            self.teacher.eval().requires_grad_(False)
            self.emb = embed(self.teacher, self.data.x.float().to(next(self.teacher.parameters()).device)).cpu()
        return super().build(device, env)

    def knowledge(self, labelled: Tensor, labels: Tensor, unlabelled: Tensor) -> tuple[Tensor, Tensor]:
        pseudo, weight = wad_knowledge(wad_scores(self.emb[unlabelled], self.emb[labelled], labels,
                                                  self.data.num_known))
        return pseudo, (torch.ones_like(weight) if self.args.mode == "pseudo" else weight)

    def select(self, round_: int, logits: Tensor, pseudo: Tensor) -> Tensor:
        w = self.args
        alpha = polynomial_decay(round_, w.alpha, 0.0, max(1, w.split), w.power) if w.split > 0 else 0.0
        return select_confident(logits.cpu(), pseudo, alpha)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mode": self.args.mode, "split": self.args.split}


def build_ssl(cfg: WADConfig) -> SSLData:
    """The blob pool split into labelled / mismatched unlabelled / known-class test (fixed by data.seed)."""
    d = cfg.data
    x, y, xt, yt = gaussian_blobs(
        d.num_known + d.num_unknown, d.dim, d.per_class, d.per_class_test, d.separation, d.rank, d.spread,
        d.noise, d.seed,
    )
    return mismatch_split(
        x, y, xt, yt, list(range(d.num_known)), d.labelled_per_class, d.mismatch, d.seed, d.unlabelled_per_class
    )


def _config_text(cfg: WADConfig) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


def _teacher_task(cfg: WADConfig, data: SSLData) -> ContrastiveTask:
    t = cfg.teacher
    pool = data.x[torch.cat([data.labelled, data.unlabelled])]
    return ContrastiveTask(pool, lambda: _encoder(data.x[0].numel(), t), t.loop.batch_size, t.temperature,
                           cfg.seed, vector_augment, noise=t.augment.noise, drop=t.augment.drop,
                           scale=t.augment.scale)


def teacher_stage(cfg: WADConfig, data: SSLData, root: str | Path, trainer: TrainerConfig | None = None,
                  config_text: str | None = None, quiet: bool = False, stage: str | None = "teacher") -> StageRun:
    """The `teacher` stage of `root` (`stage=None`: `root` itself): SimCLR-style encoder on the
    labelled + unlabelled pool (no labels).

    A finished stage is loaded, an interrupted one resumed; the teacher is a pure function of
    (cfg.teacher, data, cfg.seed), so arms of one seed may share it.
    """
    return run_stage(root, stage, loop_settings(cfg.teacher.loop, cfg.seed, trainer), _teacher_task(cfg, data),
                     config_text or _config_text(cfg), quiet=quiet)


def _teacher_identity(cfg: WADConfig) -> dict[str, Any]:
    return {"data": asdict(cfg.data), "teacher": {"hidden": cfg.teacher.hidden, "proj_dim": cfg.teacher.proj_dim}}


def load_teacher(cfg: WADConfig, data: SSLData, path: str | Path) -> nn.Module:
    """The frozen encoder of a finished teacher run (`teacher_only` run or `<run>/stages/teacher`).

    Fails in one line when the run is unfinished, or its data or teacher architecture differ from `cfg`'s.
    """
    path = Path(path)
    if not (path / "result.json").is_file():
        raise ConfigError(f"wad recipe: teacher_run {path} holds no finished run (no result.json); train it "
                          "with teacher_only=true (or resume it) first")
    theirs = shared_recipe(path, WADConfig, cfg, _teacher_identity, "wad")
    stage = run_stage(path, None, loop_settings(cfg.teacher.loop, theirs.seed), _teacher_task(theirs, data), "",
                      quiet=True)
    return stage.module.encoder.eval().requires_grad_(False)


def train_teacher(cfg: WADConfig, data: SSLData, root: str | Path, seed: int | None = None,
                  quiet: bool = False) -> nn.Module:
    """The frozen teacher encoder of `teacher_stage` (seed: cfg.seed), for sharing across arms."""
    cfg = cfg if seed is None else replace(cfg, seed=seed)
    stage = teacher_stage(cfg, data, root, quiet=quiet)
    if stage.stopped:
        raise KdforgeError(f"wad: the teacher stage in {stage.run_dir} stopped early; resume it first")
    return stage.module.encoder.eval().requires_grad_(False)


def run_wad(cfg: WADConfig, run_dir: str | Path, data: SSLData | None = None, teacher: nn.Module | None = None,
            trainer: TrainerConfig | None = None, config_text: str | None = None,
            quiet: bool = False) -> dict[str, Any]:
    """One run of `cfg.wad.mode` into `run_dir`: test accuracy `acc` and per-round diagnostics `rounds`.

    `teacher` (a frozen encoder from `train_teacher`) skips the teacher stage, and so does
    `cfg.teacher_run` (a finished teacher run, loaded); otherwise the teacher is trained (or loaded,
    or resumed) in `run_dir/stages/teacher`. `cfg.teacher_only` trains the teacher into `run_dir`
    itself and returns its result. A stopped stage returns {"stopped_at_step": n}.
    """
    cfg.check()
    data = data if data is not None else build_ssl(cfg)
    text = config_text or _config_text(cfg)
    if cfg.teacher_only:
        return teacher_stage(cfg, data, run_dir, trainer, text, quiet, stage=None).result
    if cfg.wad.mode != "supervised" and teacher is None and cfg.teacher_run:
        teacher = load_teacher(cfg, data, cfg.teacher_run)
    if cfg.wad.mode != "supervised" and teacher is None:
        stage = teacher_stage(cfg, data, run_dir, trainer, text, quiet)
        if stage.stopped:
            return {"stopped_at_step": stage.result["stopped_at_step"]}
        teacher = stage.module.encoder
    rounds = 1 if cfg.wad.mode == "supervised" else cfg.wad.split + 1
    settings = loop_settings(replace(cfg.train, epochs=rounds), cfg.seed, trainer)
    final = run_stage(run_dir, None, settings, WADTask(cfg, data, teacher), text, quiet=quiet)
    return final.result


class WAD:
    """Registered entry for `wad`: a task recipe (`kdforge train configs/methods/wad.yaml`)."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        """Run a `configs/methods/wad.yaml` recipe into `run_dir` (see the module docstring)."""
        cfg, trainer, text = parse_recipe(tree, source, WADConfig, method="wad")
        return run_wad(cfg, run_dir, trainer=trainer, config_text=text)


METHODS.register(
    "wad",
    WAD,
    family="semi-supervised",
    paper="Semi-Supervised Learning via Weight-Aware Distillation under Class Distribution Mismatch "
    "(Du et al., ICCV 2023)",
    summary="contrastive teacher -> nearest-exemplar pseudo-labels weighted by the top-2 margin; "
    "rounds move confident samples to the labelled set",
    task="ssl",
)
