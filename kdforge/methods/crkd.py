"""CrKD: class-relation knowledge distillation for novel class discovery (Gu et al., ICCV 2023).

A model trained with labels on the known classes already "knows" novel samples through their
*class relation*: its softmax over the known classes for a novel image says which known
classes the novel class resembles. Plain discovery training (UNO) lets this relation drift.
CrKD freezes a snapshot of the supervised model as the teacher and, on the unlabelled samples
of every step, distils the teacher's known-class distribution into the student's known-class
logits (the same augmented views; every view and novel head):

    p_T = softmax(z_known^T / tau / T)         q_S = softmax(z_known^S / tau / T)
    g   = sum_{c known} softmax(z_all^S / tau / T)_c      (student's mass on the known block)
    w   = g / mean(g)                           (not detached: the weight is learnt end to end)
    L   = mean  T^2 * w * sum_c -p_T,c log q_S,c          total = L_UNO + alpha * L

with tau = 0.1 (the cosine-logit temperature), T = 4, alpha = 0.1 (official `rKD.py` /
`model/losses.py::KD`). The mean of g runs over all views, heads and unlabelled samples of the
batch, as in the official code; the known head is shared, so the KD term differs between heads
only through w. `weighting: fixed` sets w = 1 (the ablation without the learnable weight);
`detached` stops the gradient through w (an extra diagnostic, not in the paper).

This lives in the NCD task (`kdforge.tasks.ncd`), not the classification Trainer. Recipe schema
(`configs/methods/crkd.yaml`, run with `python -m kdforge.tasks.common configs/methods/crkd.yaml`):

    method: crkd
    seed: int                       # discovery seed
    data: {pairs, num_train, num_test, image_size, seed}        # kdforge.tasks.ncd.procedural_ncd
    model: {backbone, backbone_args, num_heads, hidden_dim, proj_dim}
    ncd: {temperature, num_views, num_large, sk_iters, sk_epsilon, crop_padding, flip}
    pretrain: {epochs, batch_size, optim, schedule, grad_clip, progress}   # kdforge.tasks.common.LoopConfig
    discover: {epochs, batch_size, optim, schedule, grad_clip, progress}
    crkd: {alpha, kd_temperature, weighting}                     # alpha 0 = the UNO baseline
    pretrain_seed: int              # seed of the supervised stage (shared by all discovery seeds)

Unknown keys fail with one line naming the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig, load_task_config, predict, prepare_images
from kdforge.tasks.ncd import (
    DiscoveryNet,
    NCDData,
    NCDSpec,
    discovery_net,
    evaluate_ncd,
    pretrain_known,
    procedural_ncd,
    train_discovery,
)

__all__ = ["CrKD", "CrKDConfig", "build_ncd", "relation_drift", "relation_kd_loss", "run_crkd"]

WEIGHTINGS = ("learnable", "fixed", "detached")


def relation_kd_loss(
    teacher_known: Tensor,
    student_known: Tensor,
    student_all: Tensor,
    kd_temperature: float = 4.0,
    logit_temperature: float = 0.1,
    weighting: str = "learnable",
) -> tuple[Tensor, Tensor]:
    """(loss, weights) of class-relation KD; logits (..., C_l) / (..., C_l + C_u) share the leading dims.

    The student's known block must be the first C_l columns of `student_all`. The teacher is
    detached; `weights` has the leading shape (the per-sample w after batch-mean normalisation).
    """
    if weighting not in WEIGHTINGS:
        raise KdforgeError(f"crkd: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if kd_temperature <= 0 or logit_temperature <= 0:
        raise KdforgeError(f"crkd: temperatures must be > 0, got {kd_temperature}, {logit_temperature}")
    k = teacher_known.shape[-1]
    if (
        student_known.shape != teacher_known.shape
        or student_all.shape[:-1] != teacher_known.shape[:-1]
        or student_all.shape[-1] <= k
    ):
        raise KdforgeError(
            f"crkd: teacher known logits {tuple(teacher_known.shape)}, student known "
            f"{tuple(student_known.shape)} and student all {tuple(student_all.shape)} must share "
            "leading dims, with more classes in 'all' than known"
        )
    if teacher_known.numel() == 0:
        return student_known.sum() * 0.0, student_known.new_zeros(student_known.shape[:-1])
    scale = logit_temperature * kd_temperature
    p_t = F.softmax(teacher_known.detach().float() / scale, dim=-1)
    log_q = F.log_softmax(student_known.float() / scale, dim=-1)
    ce = -(p_t * log_q).sum(-1)  # (...,)
    if weighting == "fixed":
        w = torch.ones_like(ce)
    else:
        g = F.softmax(student_all.float() / scale, dim=-1)[..., :k].sum(-1)
        w = g / g.mean()
        if weighting == "detached":
            w = w.detach()
    return (kd_temperature**2 * w * ce).mean(), w


@torch.no_grad()
def relation_drift(
    teacher: DiscoveryNet,
    student: DiscoveryNet,
    data: NCDData,
    kd_temperature: float = 4.0,
    logit_temperature: float = 0.1,
) -> float:
    """Mean KL(teacher || student) of the known-class distributions on novel samples (card diagnostic)."""
    x = data.images[data.novel]
    if len(x) == 0:
        return float("nan")

    def prep(v: Tensor) -> Tensor:
        return prepare_images(v, data.mean, data.std)

    def known(o: dict[str, Tensor]) -> Tensor:
        return o["logits_lab"]

    scale = logit_temperature * kd_temperature
    lt = F.log_softmax(predict(teacher, x, 500, prep, known) / scale, 1)
    ls = F.log_softmax(predict(student, x, 500, prep, known) / scale, 1)
    return float((lt.exp() * (lt - ls)).sum(1).mean())


class CrKD:
    """The relation-KD term for `train_discovery(extra_loss=...)`, with a frozen teacher snapshot."""

    def __init__(
        self,
        teacher: DiscoveryNet,
        alpha: float = 0.1,
        kd_temperature: float = 4.0,
        logit_temperature: float = 0.1,
        weighting: str = "learnable",
    ) -> None:
        if alpha < 0:
            raise KdforgeError(f"crkd: alpha must be >= 0, got {alpha}")
        if weighting not in WEIGHTINGS:
            raise KdforgeError(f"crkd: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher.normalize_prototypes()  # unit prototypes, fixed from here on (the teacher never trains)
        self.alpha, self.kd_temperature = float(alpha), float(kd_temperature)
        self.logit_temperature, self.weighting = float(logit_temperature), weighting

    @classmethod
    def snapshot(cls, model: DiscoveryNet, **kwargs: Any) -> CrKD:
        """Freeze a copy of the model at the end of the supervised stage as the teacher."""
        return cls(copy.deepcopy(model), **kwargs)

    def __call__(
        self, views: list[Tensor], outputs: dict[str, Tensor], labelled: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        unl = ~labelled
        self.teacher.eval()
        with torch.no_grad():
            t_known = torch.stack([self.teacher(x[unl])["logits_lab"] for x in views])  # (V, U, C_l)
        lab, unlab = (
            outputs["logits_lab"][:, unl],
            outputs["logits_unlab"][:, :, unl],
        )  # (V, U, C_l), (V, H, U, C_u)
        heads = unlab.shape[1]
        s_known = lab.unsqueeze(1).expand(-1, heads, -1, -1)
        s_all = torch.cat([s_known, unlab], dim=-1)
        t_known = t_known.unsqueeze(1).expand(-1, heads, -1, -1)
        loss, w = relation_kd_loss(
            t_known, s_known, s_all, self.kd_temperature, self.logit_temperature, self.weighting
        )
        return self.alpha * loss, {
            "rkd": float(loss.detach()),
            "rkd_w_std": float(w.detach().float().std()) if w.numel() > 1 else 0.0,
        }

    @classmethod
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "crkd runs in the novel-class-discovery loop, not the classification Trainer: "
            "python -m kdforge.tasks.common configs/methods/crkd.yaml"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
        """Run a `configs/methods/crkd.yaml` recipe (see the module docstring) and return its metrics."""
        return run_crkd(load_task_config(CrKDConfig, tree, name=source))


# ------------------------------------------------------------------------------------- recipe


@dataclass
class NCDDataConfig:
    pairs: int = 10
    num_train: int = 2000
    num_test: int = 1000
    image_size: int = 16
    seed: int = 0


@dataclass
class DiscoveryModelConfig:
    backbone: str = "convnet"
    backbone_args: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    num_heads: int = 2
    hidden_dim: int = 256
    proj_dim: int = 64


@dataclass
class CrKDArgs:
    alpha: float = 0.1
    kd_temperature: float = 4.0
    weighting: str = "learnable"


@dataclass
class CrKDConfig:
    method: str = "crkd"
    seed: int = 0
    pretrain_seed: int = 0
    data: NCDDataConfig = field(default_factory=NCDDataConfig)
    model: DiscoveryModelConfig = field(default_factory=DiscoveryModelConfig)
    ncd: NCDSpec = field(default_factory=NCDSpec)
    pretrain: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            epochs=30,
            batch_size=128,
            optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1.5e-4),
            schedule=ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.01),
        )
    )
    discover: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            epochs=30,
            batch_size=128,
            optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1.5e-4),
            schedule=ScheduleConfig(name="cosine", warmup_epochs=2, min_lr=0.01),
        )
    )
    crkd: CrKDArgs = field(default_factory=CrKDArgs)

    def check(self) -> None:
        if self.method != "crkd":
            raise ConfigError(f"crkd recipe: method must be 'crkd', got {self.method!r}")
        if self.crkd.weighting not in WEIGHTINGS:
            raise ConfigError(f"crkd recipe: crkd.weighting must be one of {', '.join(WEIGHTINGS)}")
        self.ncd.check("crkd recipe: ncd")


def build_ncd(cfg: CrKDConfig) -> tuple[NCDData, NCDData, DiscoveryNet]:
    """Train/test splits and a fresh discovery network for the recipe."""
    d = cfg.data
    train = procedural_ncd("train", d.pairs, d.num_train, d.num_test, d.image_size, d.seed)
    test = procedural_ncd("test", d.pairs, d.num_train, d.num_test, d.image_size, d.seed)
    m = cfg.model
    model = discovery_net(
        m.backbone,
        train.num_known,
        train.num_novel,
        train.images.shape[1],
        m.num_heads,
        m.hidden_dim,
        m.proj_dim,
        m.backbone_args,
    )
    return train, test, model


def run_crkd(cfg: CrKDConfig, pretrained: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Supervised stage (or `pretrained` weights), then discovery with relation KD (alpha 0: UNO)."""
    cfg.check()
    torch.manual_seed(cfg.pretrain_seed)
    train, test, model = build_ncd(cfg)
    if pretrained is None:
        pretrain_known(model, train, cfg.pretrain, cfg.ncd, cfg.pretrain_seed)
    else:
        model.load_state_dict(pretrained)
    teacher = copy.deepcopy(model).eval()
    torch.manual_seed(cfg.seed)
    for head in model.head_unlab.modules():  # novel heads start fresh for every discovery seed
        if hasattr(head, "reset_parameters"):
            head.reset_parameters()
    model.head_unlab.normalize_prototypes()
    a = cfg.crkd
    extra = (
        CrKD(teacher, a.alpha, a.kd_temperature, cfg.ncd.temperature, a.weighting) if a.alpha > 0 else None
    )
    history, best = train_discovery(model, train, cfg.discover, cfg.ncd, cfg.seed, extra)
    result: dict[str, Any] = {"best_head": best, "final_loss": history[-1]["loss"] if history else None}
    result.update(
        {
            f"train_{k}": v
            for k, v in evaluate_ncd(model, train.subset(train.novel.nonzero().flatten()), best).items()
            if k.startswith("novel")
        }
    )
    result.update({f"test_{k}": v for k, v in evaluate_ncd(model, test, best).items()})
    result["relation_kl_test"] = relation_drift(teacher, model, test, a.kd_temperature, cfg.ncd.temperature)
    return result


METHODS.register(
    "crkd",
    CrKD,
    family="novel-class-discovery",
    paper="Class-relation Knowledge Distillation for Novel Class Discovery (Gu et al., ICCV 2023)",
    summary="UNO discovery + KD of the frozen known-class model's class relation on novel samples, "
    "learnable per-sample weight",
    task="ncd",
)
