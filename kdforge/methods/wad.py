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

Documented deviation: teacher features come from the deterministic (un-augmented) view; the
official code scores one random SimCLR-augmented view per image.

Recipe schema (`configs/methods/wad.yaml`; `python -m kdforge.tasks.common configs/methods/wad.yaml`):

    method: wad
    seed: int
    data: {num_known, num_unknown, dim, per_class, per_class_test, labelled_per_class,
           unlabelled_per_class, mismatch, separation, rank, spread, noise, seed}
           (gaussian_blobs + mismatch_split)
    teacher: {hidden, proj_dim, temperature, loop: LoopConfig, augment: {noise, drop, scale}}
    student: {hidden}
    train: LoopConfig (batch_size per stream, optim, schedule); iterations: steps per round
    wad: {mode: wad | pseudo | supervised, split, alpha, power}
         mode pseudo = the teacher's pseudo-labels with w = 1; supervised = labelled CE only;
         split 0 = one round (no selection). Every mode trains iterations * (split + 1) steps in all
         (the supervised mode in one go), so a single-round arm with the same budget sets
         iterations to the multi-round arm's iterations * (split + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.models import create_model
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig, load_task_config, predict
from kdforge.tasks.ssl import (
    ContrastiveEncoder,
    SSLData,
    embed,
    gaussian_blobs,
    known_accuracy,
    mismatch_split,
    train_contrastive,
    train_weighted,
    vector_augment,
)

__all__ = [
    "WAD",
    "WADConfig",
    "build_ssl",
    "polynomial_decay",
    "run_wad",
    "select_confident",
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

    def check(self) -> None:
        if self.method != "wad":
            raise ConfigError(f"wad recipe: method must be 'wad', got {self.method!r}")
        if self.wad.mode not in MODES:
            raise ConfigError(
                f"wad recipe: wad.mode must be one of {', '.join(MODES)}, got {self.wad.mode!r}"
            )
        if self.wad.split < 0 or not 0 <= self.wad.alpha < 1 or self.iterations < 1:
            raise ConfigError("wad recipe: need wad.split >= 0, 0 <= wad.alpha < 1 and iterations >= 1")
        if self.data.num_known < 2:
            raise ConfigError("wad recipe: data.num_known must be >= 2 (the weight is a top-2 margin)")


def build_ssl(cfg: WADConfig) -> SSLData:
    """The blob pool split into labelled / mismatched unlabelled / known-class test (fixed by data.seed)."""
    d = cfg.data
    x, y, xt, yt = gaussian_blobs(
        d.num_known + d.num_unknown,
        d.dim,
        d.per_class,
        d.per_class_test,
        d.separation,
        d.rank,
        d.spread,
        d.noise,
        d.seed,
    )
    return mismatch_split(
        x,
        y,
        xt,
        yt,
        list(range(d.num_known)),
        d.labelled_per_class,
        d.mismatch,
        d.seed,
        d.unlabelled_per_class,
    )


def _mlp(in_features: int, out: int, hidden: list[int]) -> nn.Module:
    return create_model("mlp", num_classes=out, in_features=in_features, hidden=tuple(hidden))


def train_teacher(cfg: WADConfig, data: SSLData, seed: int | None = None) -> nn.Module:
    """SimCLR-style encoder on the labelled + unlabelled pool (no labels), frozen (seed: cfg.seed)."""
    seed = cfg.seed if seed is None else seed
    t = cfg.teacher
    torch.manual_seed(seed)  # the initialisation too: the teacher is a pure function of (cfg, data, seed)
    backbone = _mlp(data.x.shape[1], 1, t.hidden)
    backbone.fc = nn.Identity()
    encoder = ContrastiveEncoder(backbone, t.hidden[-1], t.proj_dim)
    pool = data.x[torch.cat([data.labelled, data.unlabelled])]
    train_contrastive(
        encoder,
        pool,
        t.loop,
        vector_augment,
        t.temperature,
        seed,
        noise=t.augment.noise,
        drop=t.augment.drop,
        scale=t.augment.scale,
    )
    return encoder.eval().requires_grad_(False)


def run_wad(cfg: WADConfig, data: SSLData | None = None, teacher: nn.Module | None = None) -> dict[str, Any]:
    """One run of `cfg.wad.mode` (wad / pseudo / supervised): test accuracy and per-round diagnostics."""
    cfg.check()
    data = data if data is not None else build_ssl(cfg)
    w = cfg.wad
    k = data.num_known
    rounds = w.split + 1
    torch.manual_seed(cfg.seed)
    student = _mlp(data.x.shape[1], k, cfg.student.hidden)
    if w.mode == "supervised":
        train_weighted(
            student,
            data.x,
            data.labelled,
            data.labels[data.labelled],
            cfg.train,
            cfg.iterations * rounds,
            seed=cfg.seed,
            desc="wad supervised",
        )
        return {"acc": known_accuracy(student, data.x_test, data.y_test), "rounds": []}
    teacher = teacher if teacher is not None else train_teacher(cfg, data)
    emb = embed(teacher, data.x)
    lab_idx, lab_y = data.labelled.clone(), data.labels[data.labelled].clone()
    unl_idx = data.unlabelled.clone()
    unknown = data.labels < 0
    diagnostics = []
    for r in range(1, rounds + 1):
        pseudo, weight = wad_knowledge(wad_scores(emb[unl_idx], emb[lab_idx], lab_y, k))
        if w.mode == "pseudo":
            weight = torch.ones_like(weight)
        unk = unknown[unl_idx]
        known_true = data.labels[unl_idx]
        info = {
            "round": r,
            "labelled": len(lab_idx),
            "unlabelled": len(unl_idx),
            "pseudo_acc_known": 100 * float((pseudo[~unk] == known_true[~unk]).float().mean()),
            "mean_w_known": float(weight[~unk].mean()),
            "mean_w_unknown": float(weight[unk].mean()) if bool(unk.any()) else None,
        }
        train_weighted(
            student,
            data.x,
            lab_idx,
            lab_y,
            cfg.train,
            cfg.iterations,
            unl_idx,
            pseudo,
            weight,
            seed=cfg.seed * 1000 + r,
            desc=f"wad round {r}",
        )
        info["acc"] = known_accuracy(student, data.x_test, data.y_test)
        alpha = polynomial_decay(r, w.alpha, 0.0, max(1, w.split), w.power) if w.split > 0 else 0.0
        picked = select_confident(predict(student, data.x[unl_idx]), pseudo, alpha)
        if len(picked):
            moved = unl_idx[picked]
            info.update(
                {
                    "moved": len(picked),
                    "moved_unknown": int(unknown[moved].sum()),
                    "moved_correct": int((pseudo[picked] == data.labels[moved]).sum()),
                }
            )
            lab_idx, lab_y = torch.cat([lab_idx, moved]), torch.cat([lab_y, pseudo[picked]])
            keep = torch.ones(len(unl_idx), dtype=torch.bool)
            keep[picked] = False
            unl_idx = unl_idx[keep]
        diagnostics.append(info)
    return {"acc": known_accuracy(student, data.x_test, data.y_test), "rounds": diagnostics}


class WAD:
    """Registered entry for `wad`: the recipe runner (the method itself is `run_wad`)."""

    @classmethod
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "wad runs in the semi-supervised task loop, not the classification Trainer: "
            "python -m kdforge.tasks.common configs/methods/wad.yaml"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
        """Run a `configs/methods/wad.yaml` recipe (see the module docstring)."""
        return run_wad(load_task_config(WADConfig, tree, name=source))


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
