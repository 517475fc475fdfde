"""KD³: knowledge distillation between different distributions, from web-collected data.

The original training set is gone; the student learns from a web pool that is style-shifted
and partly off-topic (`kdforge.tasks.datafree`). KD³ (official code unpublished; card p12) has:

1. **Dynamic instance selection** (per batch, so the kept set is re-estimated as the student
   learns): p = λ_e·softmax(z_T) + (1-λ_e)·softmax(z_S), λ_e going linearly `lambda_start` ->
   `lambda_end` over training; keep i if max_c p_i,c > δ and (after `agreement_warmup` epochs)
   argmax z_T = argmax z_S. Pseudo-label ŷ = argmax p, weight w = max_c p.
2. **Knowledge memorisation**: the student's feature goes through a linear connector φ to the
   teacher's feature dimension and is classified by the teacher's *frozen* classifier
   (classifier sharing); L_feat = Σ m_i w_i ||φ(h_S,i) - h_T,i||² / D / Σ m_i (the squared
   distance is divided by the feature dimension D so α does not depend on width).
   L_kd = Σ m_i [CE(z_S,i, ŷ_i) + T²·KL(p_T,i^T || p_S,i^T)] / Σ m_i.
3. **MixDistribution**: on a duplicated branch, the student's stem feature map u gets the
   channel statistics of a shuffled instance mixed in, ũ = σ_mix (u - μ)/σ + μ_mix with
   (μ_mix, σ_mix) = λ(μ, σ) + (1-λ)(μ_perm, σ_perm), λ ~ Beta(a, a) per instance (statistics
   detached, as in MixStyle); L_con = InfoNCE(φ(h), φ(h̃)) with the batch as negatives. Mixed
   features never reach the KD logits.

L = L_kd + α L_feat + β L_con. Baseline (`arm: kd`): T²·KL(teacher || student) on the whole
web pool with the student's own classifier. Thresholds, schedule and weights are reconstructions
(card "(R)"): all configurable.

Recipe schema (`configs/methods/kd3.yaml`; `python -m kdforge.tasks.common configs/methods/kd3.yaml`):

    method: kd3
    seed: int                     # student seed (teacher uses teacher_seed)
    teacher_seed: int
    data: {num_classes, num_orig, num_web, num_test, image_size, fractions, seed}
    teacher_width: int            # TinyCNN widths
    student_width: int
    teacher_loop: {epochs, batch_size, optim, schedule, grad_clip, progress}   # LoopConfig
    student_loop: {epochs, batch_size, optim, schedule, grad_clip, progress}
    kd3: {arm: kd|kd3, temperature, threshold, lambda_start, lambda_end, agreement_warmup,
          selection, classifier_sharing, feat_weight, con_weight, con_temperature, mix_alpha}

Unknown keys fail with one line naming the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import (
    LoopConfig,
    augment_images,
    fit,
    load_task_config,
    predict,
    prepare_images,
    seeded_generator,
)
from kdforge.tasks.datafree import DataFreeData, TinyCNN, build_datafree

__all__ = [
    "KD3Config",
    "KD3Student",
    "combined_prediction",
    "info_nce",
    "kd3_kd_feat_losses",
    "mix_distribution",
    "run_kd3",
    "select_instances",
    "teacher_weight",
]

ARMS = ("kd", "kd3")


# ------------------------------------------------------------------------------------- mechanism


def teacher_weight(epoch: int, epochs: int, start: float = 1.0, end: float = 0.5) -> float:
    """λ_e of the combined prediction: linear from `start` (epoch 0) to `end` (last epoch)."""
    if epochs <= 1:
        return float(start)
    return float(start + (end - start) * min(max(epoch, 0), epochs - 1) / (epochs - 1))


def combined_prediction(teacher_logits: Tensor, student_logits: Tensor, lam: float) -> Tensor:
    """p = λ softmax(z_T) + (1-λ) softmax(z_S) (both detached: selection carries no gradient)."""
    if not 0.0 <= lam <= 1.0:
        raise KdforgeError(f"kd3: teacher weight must be in [0, 1], got {lam}")
    if teacher_logits.shape != student_logits.shape:
        raise KdforgeError(
            f"kd3: teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} logits differ"
        )
    return lam * teacher_logits.detach().softmax(-1) + (1 - lam) * student_logits.detach().softmax(-1)


def select_instances(
    combined: Tensor, teacher_logits: Tensor, student_logits: Tensor, threshold: float, agreement: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(mask m, confidence w, pseudo-label ŷ): m = [max p > δ] · [argmax z_T = argmax z_S if agreement]."""
    conf, pseudo = combined.max(-1)
    mask = conf > threshold
    if agreement:
        mask = mask & (teacher_logits.argmax(-1) == student_logits.argmax(-1))
    return mask.float(), conf, pseudo


def kd3_kd_feat_losses(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_feat: Tensor,
    teacher_feat: Tensor,
    mask: Tensor,
    weight: Tensor,
    pseudo: Tensor,
    temperature: float = 4.0,
) -> tuple[Tensor, Tensor]:
    """(L_kd, L_feat) over the selected instances (zero with a graph when nothing is selected)."""
    if temperature <= 0:
        raise KdforgeError(f"kd3: temperature must be > 0, got {temperature}")
    denom = mask.sum()
    if float(denom) == 0:
        zero = student_logits.sum() * 0.0 + student_feat.sum() * 0.0
        return zero, zero
    ce = F.cross_entropy(student_logits, pseudo, reduction="none")
    t = temperature
    log_ps = F.log_softmax(student_logits / t, -1)
    log_pt = F.log_softmax(teacher_logits.detach() / t, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * t * t
    l_kd = (mask * (ce + kl)).sum() / denom
    dist = (student_feat - teacher_feat.detach()).pow(2).mean(-1)
    l_feat = (mask * weight * dist).sum() / denom
    return l_kd, l_feat


def mix_distribution(u: Tensor, perm: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    """Re-normalise each feature map u_i (B, C, H, W) with channel statistics mixed with u_perm[i]."""
    if u.dim() != 4 or perm.shape != (u.shape[0],) or lam.shape != (u.shape[0],):
        raise KdforgeError(
            f"kd3: mix_distribution needs u (B, C, H, W), perm (B,) and lam (B,), got "
            f"{tuple(u.shape)}, {tuple(perm.shape)}, {tuple(lam.shape)}"
        )
    mu = u.mean(dim=(2, 3), keepdim=True).detach()
    sig = (u.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1).to(u.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return sig_mix * (u - mu) / sig + mu_mix


def info_nce(z: Tensor, z_pos: Tensor, temperature: float = 0.2) -> Tensor:
    """Mean over i of -log softmax_j(cos(z_i, z_pos_j)/τ)[i]: the positive is the same instance."""
    if z.shape != z_pos.shape or z.dim() != 2:
        raise KdforgeError(f"kd3: info_nce needs two (B, D) tensors, got {tuple(z.shape)}, {tuple(z_pos.shape)}")
    if temperature <= 0:
        raise KdforgeError(f"kd3: contrastive temperature must be > 0, got {temperature}")
    logits = F.normalize(z, dim=-1) @ F.normalize(z_pos, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(z), device=z.device))


class KD3Student(nn.Module):
    """Student backbone + connector φ to the teacher's feature dim + (optionally frozen teacher) classifier."""

    def __init__(self, backbone: TinyCNN, teacher: TinyCNN, classifier_sharing: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.connector = nn.Linear(backbone.feature_dim, teacher.feature_dim)
        self.classifier = copy.deepcopy(teacher.fc)
        self.classifier.requires_grad_(not classifier_sharing)
        if not classifier_sharing:
            self.classifier.reset_parameters()

    def project(self, stem_out: Tensor) -> Tensor:
        return self.connector(self.backbone.body(stem_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.project(self.backbone.stem(x)))


# ------------------------------------------------------------------------------------- recipe


@dataclass
class DataFreeDataConfig:
    num_classes: int = 10
    num_orig: int = 2000
    num_web: int = 3000
    num_test: int = 1000
    image_size: int = 16
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])
    seed: int = 0


@dataclass
class KD3Args:
    arm: str = "kd3"
    temperature: float = 4.0
    threshold: float = 0.7
    lambda_start: float = 1.0
    lambda_end: float = 0.5
    agreement_warmup: int = 2
    selection: bool = True
    classifier_sharing: bool = True
    feat_weight: float = 1.0
    con_weight: float = 0.1
    con_temperature: float = 0.2
    mix_alpha: float = 0.1


def _loop(epochs: int, lr: float) -> LoopConfig:
    return LoopConfig(
        epochs=epochs, batch_size=64, optim=OptimConfig(name="adamw", lr=lr, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine"),
    )


@dataclass
class KD3Config:
    method: str = "kd3"
    seed: int = 0
    teacher_seed: int = 0
    data: DataFreeDataConfig = field(default_factory=DataFreeDataConfig)
    teacher_width: int = 16
    student_width: int = 8
    teacher_loop: LoopConfig = field(default_factory=lambda: _loop(10, 3e-3))
    student_loop: LoopConfig = field(default_factory=lambda: _loop(10, 3e-3))
    kd3: KD3Args = field(default_factory=KD3Args)

    def check(self) -> None:
        a = self.kd3
        if self.method != "kd3":
            raise ConfigError(f"kd3 recipe: method must be 'kd3', got {self.method!r}")
        if a.arm not in ARMS:
            raise ConfigError(f"kd3 recipe: kd3.arm must be one of {', '.join(ARMS)}, got {a.arm!r}")
        if not (0 <= a.lambda_end <= 1 and 0 <= a.lambda_start <= 1 and 0 <= a.threshold < 1):
            raise ConfigError("kd3 recipe: kd3.lambda_start/lambda_end must be in [0, 1], threshold in [0, 1)")
        if a.mix_alpha <= 0 or a.feat_weight < 0 or a.con_weight < 0:
            raise ConfigError("kd3 recipe: kd3.mix_alpha must be > 0 and the loss weights >= 0")
        self.teacher_loop.check("kd3 recipe: teacher_loop")
        self.student_loop.check("kd3 recipe: student_loop")


def train_teacher(data: DataFreeData, width: int, loop: LoopConfig, seed: int) -> TinyCNN:
    """Supervised teacher on the original split (which the student never sees)."""
    torch.manual_seed(seed)
    model = TinyCNN(data.num_classes, width)
    gen = seeded_generator(seed, 1)
    n = len(data.orig_images)
    steps = max(n // loop.batch_size, 1)
    batches: list[Tensor] = []

    def step(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        if i == 0:
            batches[:] = list(torch.randperm(n, generator=gen)[: steps * loop.batch_size].split(loop.batch_size))
        idx = batches[i]
        x = augment_images(data.orig_images[idx], idx, epoch, seed * 16, data.mean, data.std)
        return F.cross_entropy(model(x), data.orig_labels[idx]), {}

    model.train()
    fit(list(model.parameters()), step, steps, loop, desc="kd3 teacher")
    return model.eval().requires_grad_(False)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, mean: Any, std: Any) -> float:
    logits = predict(model, images, 500, lambda v: prepare_images(v, mean, std))
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def train_student(cfg: KD3Config, data: DataFreeData, teacher: TinyCNN) -> tuple[nn.Module, dict[str, Any]]:
    """Distil `teacher` into a fresh student on the web pool (arm kd: plain KD; arm kd3: full KD³)."""
    a, loop = cfg.kd3, cfg.student_loop
    torch.manual_seed(cfg.seed)
    backbone = TinyCNN(data.num_classes, cfg.student_width)
    kd3 = a.arm == "kd3"
    student: nn.Module = KD3Student(backbone, teacher, a.classifier_sharing) if kd3 else backbone
    gen = seeded_generator(cfg.seed, 2)
    n = len(data.web_images)
    steps = max(n // loop.batch_size, 1)
    batches: list[Tensor] = []
    beta = torch.distributions.Beta(torch.tensor(a.mix_alpha), torch.tensor(a.mix_alpha))
    sel_stats = {"selected": 0.0, "correct": 0.0, "seen": 0.0}

    def step(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        if i == 0:
            batches[:] = list(torch.randperm(n, generator=gen)[: steps * loop.batch_size].split(loop.batch_size))
        idx = batches[i]
        x = augment_images(data.web_images[idx], idx, epoch, cfg.seed * 16 + 1, data.mean, data.std)
        with torch.no_grad():
            h_t = teacher.features(x)
            z_t = teacher.fc(h_t)
        if not kd3:
            z_s = student(x)
            t = a.temperature
            kl = F.kl_div(F.log_softmax(z_s / t, -1), F.log_softmax(z_t / t, -1), log_target=True,
                          reduction="batchmean") * t * t
            return kl, {"kd": float(kl.detach())}
        u = student.backbone.stem(x)
        proj = student.connector(student.backbone.body(u))
        z_s = student.classifier(proj)
        if a.selection:
            lam = teacher_weight(epoch, loop.epochs, a.lambda_start, a.lambda_end)
            p = combined_prediction(z_t, z_s, lam)
            mask, conf, pseudo = select_instances(p, z_t, z_s, a.threshold, epoch >= a.agreement_warmup)
        else:
            conf, pseudo = z_t.softmax(-1).max(-1)
            mask = torch.ones_like(conf)
        truth = data.web_labels[idx]
        sel_stats["seen"] += len(idx)
        sel_stats["selected"] += float(mask.sum())
        sel_stats["correct"] += float((mask * (pseudo == truth).float()).sum())
        l_kd, l_feat = kd3_kd_feat_losses(z_s, z_t, proj, h_t, mask, conf, pseudo, a.temperature)
        loss = l_kd + a.feat_weight * l_feat
        logs = {"kd": float(l_kd.detach()), "feat": float(l_feat.detach()), "kept": float(mask.mean())}
        if a.con_weight > 0:
            perm = torch.randperm(len(idx), generator=gen)
            lam_mix = beta.sample((len(idx),))
            proj_mix = student.connector(student.backbone.body(mix_distribution(u, perm, lam_mix)))
            l_con = info_nce(proj, proj_mix, a.con_temperature)
            loss = loss + a.con_weight * l_con
            logs["con"] = float(l_con.detach())
        return loss, logs

    student.train()
    history = fit(list(student.parameters()), step, steps, loop, desc=f"kd3 student ({a.arm})")
    info: dict[str, Any] = {"final_loss": history[-1]["loss"] if history else None}
    if kd3 and sel_stats["seen"]:
        info["selected_fraction"] = sel_stats["selected"] / sel_stats["seen"]
        info["selection_precision"] = sel_stats["correct"] / max(sel_stats["selected"], 1.0)
    return student.eval(), info


def run_kd3(cfg: KD3Config, teacher: TinyCNN | None = None, data: DataFreeData | None = None) -> dict[str, Any]:
    """Build data, train (or reuse) the teacher, distil on the web pool, evaluate on the original test set."""
    cfg.check()
    d = cfg.data
    if data is None:
        data = build_datafree(d.num_classes, d.num_orig, d.num_web, d.num_test, d.image_size,
                              tuple(d.fractions), d.seed)
    if teacher is None:
        teacher = train_teacher(data, cfg.teacher_width, cfg.teacher_loop, cfg.teacher_seed)
    student, info = train_student(cfg, data, teacher)
    in_class = data.web_kind == 0
    result = {
        "test_top1": accuracy(student, data.test_images, data.test_labels, data.mean, data.std),
        "teacher_test_top1": accuracy(teacher, data.test_images, data.test_labels, data.mean, data.std),
        "web_in_class_top1": accuracy(student, data.web_images[in_class], data.web_labels[in_class],
                                      data.mean, data.std),
        **info,
    }
    result["style_gap"] = result["web_in_class_top1"] - result["test_top1"]
    return result


class KD3:
    """Registry entry: KD³ runs in the web-data loop (`kdforge.tasks.datafree`), not the Trainer."""

    @classmethod
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "kd3 runs in the data-free/web-data loop, not the classification Trainer: "
            "python -m kdforge.tasks.common configs/methods/kd3.yaml"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
        """Run a `configs/methods/kd3.yaml` recipe (see the module docstring)."""
        return run_kd3(load_task_config(KD3Config, tree, name=source))


METHODS.register(
    "kd3",
    KD3,
    family="data-free",
    paper="Knowledge Distillation between Different Distributions (KD^3), web-collected data",
    summary="teacher-student dynamic selection of web samples + classifier sharing/feature alignment + "
    "MixDistribution contrastive block",
    task="datafree",
)
