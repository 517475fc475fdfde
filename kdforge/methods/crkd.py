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

CrKD runs as two stages of the one Trainer (`kdforge.tasks.ncd`): `pretrain` (supervised CE on
the known classes, in `<run>/stages/pretrain/`; its weights are the frozen teacher snapshot and
the discovery start) and the final discovery stage (UNO + alpha * relation KD, novel heads
re-initialised from `seed`; the recipe's run directory itself). Recipe schema
(`configs/methods/crkd.yaml`; `kdforge train configs/methods/crkd.yaml --out runs/crkd`,
resume with `kdforge train --resume runs/crkd`):

    method: crkd
    seed: int                       # discovery seed
    data: {pairs, num_train, num_test, image_size, seed}        # kdforge.tasks.ncd.procedural_ncd
    model: {backbone, backbone_args, num_heads, hidden_dim, proj_dim}
    ncd: {temperature, num_views, num_large, sk_iters, sk_epsilon, crop_padding, flip}
    pretrain: {epochs, batch_size, optim, schedule, grad_clip, progress}   # kdforge.tasks.common.LoopConfig
    discover: {epochs, batch_size, optim, schedule, grad_clip, progress}
    crkd: {alpha, kd_temperature, weighting}                     # alpha 0 = the UNO baseline
    pretrain_seed: int              # seed of the supervised stage (shared by all discovery seeds)
    trainer: {...}                  # optional, any TrainerConfig field, applies to both stages

DDP (`torchrun --nproc_per_node=N -m kdforge.cli train ...`) runs with per-rank batch statistics
(BatchNorm, Sinkhorn, the weight normalisation mean), as multi-GPU NCD code usually does.
Unknown keys fail with one line naming the key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.base import Autocast
from kdforge.tasks.common import LoopConfig, predict, prepare_images
from kdforge.tasks.ncd import (
    DiscoveryNet,
    DiscoveryTask,
    ExtraLoss,
    NCDData,
    NCDSpec,
    PretrainTask,
    discovery_net,
    procedural_ncd,
)
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import loop_settings, parse_recipe, run_stage, shared_recipe, stage_dir

__all__ = ["CrKD", "CrKDConfig", "CrKDTask", "ncd_setting", "relation_drift", "relation_kd_loss", "run_crkd"]

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
    device = next(student.parameters()).device

    def prep(v: Tensor) -> Tensor:
        return prepare_images(v.to(device), data.mean, data.std)

    def known(o: dict[str, Tensor]) -> Tensor:
        return o["logits_lab"]

    scale = logit_temperature * kd_temperature
    lt = F.log_softmax(predict(teacher, x, 500, prep, known) / scale, 1)
    ls = F.log_softmax(predict(student, x, 500, prep, known) / scale, 1)
    return float((lt.exp() * (lt - ls)).sum(1).mean())


class CrKD:
    """The relation-KD term (an `ExtraLoss` of the discovery module), reading a frozen teacher snapshot."""

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
    ) -> tuple[Tensor, dict[str, Tensor]]:
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
        w = w.detach().float()
        return self.alpha * loss, {
            "rkd_unweighted": loss.detach(),
            "rkd_w_std": w.std() if w.numel() > 1 else w.new_zeros(()),
        }

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        """Run a `configs/methods/crkd.yaml` recipe (see the module docstring) into `run_dir`."""
        cfg, trainer, text = parse_recipe(tree, source, CrKDConfig, method="crkd")
        return run_crkd(cfg, run_dir, trainer=trainer, pretrain_from=cfg.pretrain_from, config_text=text)


class CrKDTask(DiscoveryTask):
    """UNO discovery plus the relation-KD term (alpha 0: plain UNO), and the card's relation-drift diagnostic."""

    name = "ncd_discovery_crkd"

    def __init__(self, *args: Any, crkd: CrKDArgs, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.args = crkd

    def make_term(self, teacher: DiscoveryNet) -> ExtraLoss | None:
        a = self.args
        if a.alpha <= 0:
            return None
        return CrKD(teacher, a.alpha, a.kd_temperature, self.spec.temperature, a.weighting)

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        res = super().result(module, env, autocast)
        res["relation_kl_test"] = relation_drift(module.teachers["teacher"], module.student, self.test,
                                                 self.args.kd_temperature, self.spec.temperature)
        return res

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "method": "crkd", "alpha": self.args.alpha,
                "weighting": self.args.weighting}


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
    pretrain_from: str | None = None   # another CrKD run whose stages/pretrain is shared (the experiment's stage)

    def check(self) -> None:
        if self.crkd.weighting not in WEIGHTINGS:
            raise ConfigError(f"crkd recipe: crkd.weighting must be one of {', '.join(WEIGHTINGS)}")
        self.ncd.check("crkd recipe: ncd")
        self.pretrain.check("crkd recipe: pretrain")
        self.discover.check("crkd recipe: discover")


def ncd_setting(cfg: CrKDConfig) -> tuple[NCDData, NCDData, Callable[[], DiscoveryNet]]:
    """Train/test splits and a factory of fresh discovery networks for the recipe."""
    d, m = cfg.data, cfg.model
    train = procedural_ncd("train", d.pairs, d.num_train, d.num_test, d.image_size, d.seed)
    test = procedural_ncd("test", d.pairs, d.num_train, d.num_test, d.image_size, d.seed)

    def make_net() -> DiscoveryNet:
        return discovery_net(m.backbone, train.num_known, train.num_novel, train.images.shape[1],
                             m.num_heads, m.hidden_dim, m.proj_dim, m.backbone_args)

    return train, test, make_net


PRETRAIN_FIELDS = ("pretrain_seed", "data", "model", "ncd", "pretrain")


def _pretrain_identity(cfg: CrKDConfig) -> dict[str, Any]:
    tree = asdict(cfg)
    return {k: tree[k] for k in PRETRAIN_FIELDS}


def _check_shared_pretrain(cfg: CrKDConfig, stage: Path) -> None:
    """A pretrain stage reused from another run must have been trained with this recipe's settings."""
    if not (stage / "config.yaml").is_file():
        return      # not trained yet: this run trains it there
    shared_recipe(stage, CrKDConfig, cfg, lambda c: {k: _pretrain_identity(c)[k] for k in PRETRAIN_FIELDS},
                  "crkd", "pretrain stage")


def _config_text(cfg: CrKDConfig, trainer: TrainerConfig | None) -> str:
    tree = asdict(cfg)
    if trainer is not None:
        tree["trainer"] = asdict(trainer)
    return yaml.safe_dump(tree, sort_keys=False)


def run_crkd(
    cfg: CrKDConfig,
    run_dir: str | Path,
    trainer: TrainerConfig | None = None,
    pretrain_from: str | Path | None = None,
    config_text: str | None = None,
) -> dict[str, Any]:
    """Supervised stage, then discovery with relation KD (alpha 0: UNO), into the run directory `run_dir`.

    `pretrain_from` names another CrKD run directory whose `stages/pretrain` is shared (loaded when
    finished, else trained there), so several arms and seeds start from one teacher. An
    interrupted run resumes when called again with the same arguments. Returns the final
    stage's result (or `{"stopped_at_step": n}` when `trainer.stop_after_steps` stopped a stage).
    """
    cfg.check()
    run_dir = Path(run_dir)
    text = config_text or _config_text(cfg, trainer)
    train, test, make_net = ncd_setting(cfg)
    pre_root = run_dir if pretrain_from is None else Path(pretrain_from)
    if pretrain_from is not None:
        _check_shared_pretrain(cfg, stage_dir(pre_root, "pretrain"))
    pre = run_stage(pre_root, "pretrain", loop_settings(cfg.pretrain, cfg.pretrain_seed, trainer),
                    PretrainTask(train, test, make_net, cfg.ncd, cfg.pretrain_seed, cfg.pretrain.batch_size),
                    config_text=text)
    if pre.stopped:
        return {"stopped_at_step": pre.result["stopped_at_step"]}
    weights = {k: v.detach().clone() for k, v in pre.module.student.state_dict().items()}
    task = CrKDTask(train, test, make_net, cfg.ncd, cfg.seed, cfg.discover.batch_size, pretrained=weights,
                    crkd=cfg.crkd)
    final = run_stage(run_dir, None, loop_settings(cfg.discover, cfg.seed, trainer), task, config_text=text)
    if final.stopped:
        return {"stopped_at_step": final.result["stopped_at_step"]}
    return final.result


METHODS.register(
    "crkd",
    CrKD,
    family="novel-class-discovery",
    paper="Class-relation Knowledge Distillation for Novel Class Discovery (Gu et al., ICCV 2023)",
    summary="UNO discovery + KD of the frozen known-class model's class relation on novel samples, "
    "learnable per-sample weight",
    task="ncd",
)
