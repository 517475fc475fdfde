"""KD³: knowledge distillation between different distributions, from web-collected data.

The original training set is gone; the student learns from a web pool that is style-shifted
and partly off-topic (`kdforge.tasks.datafree`). KD³ (official code unpublished; card p12) has:

1. **Dynamic instance selection**, re-estimated at the start of every epoch over the whole web
   pool: p = λ_e·softmax(z_T) + (1-λ_e)·softmax(z_S) (the teacher and the current student on the
   un-augmented images, eval mode), λ_e going linearly `lambda_start` -> `lambda_end` over
   training; pseudo-label ŷ = argmax p, confidence w = max p. The selection is **class-balanced**:
   within every pseudo-class c the `keep_fraction` most confident instances are kept (a per-class
   quantile of w), so a class on which the teacher is less confident, or which the student has not
   learnt yet, keeps its share instead of vanishing under one global threshold. The card's
   agreement gate (argmax z_T = argmax z_S) is optional (`agreement_warmup`, off by default): it
   feeds the student's errors back into the selection (a class the student stops predicting is
   never selected again).
2. **Knowledge memorisation**: the student's feature goes through a linear connector φ to the
   teacher's feature dimension and is classified by the teacher's *frozen* classifier
   (classifier sharing); L_feat = Σ m_i w_i ||φ(h_S,i) - h_T,i||² / D / Σ m_i (the squared
   distance is divided by the feature dimension D so α does not depend on width).
   L_kd = T²·KL(p_T^T || p_S^T) averaged over **every** web sample (the soft targets of the whole
   pool, as in the baseline) + Σ m_i CE(z_S,i, ŷ_i) / Σ m_i on the selected samples: selection
   gates only the terms that trust a hard pseudo-label or the teacher's feature (CE, L_feat).
3. **MixDistribution**: on a duplicated branch, the student's stem feature map u gets the
   channel statistics of a shuffled instance mixed in, ũ = σ_mix (u - μ)/σ + μ_mix with
   (μ_mix, σ_mix) = λ(μ, σ) + (1-λ)(μ_perm, σ_perm), λ ~ Beta(a, a) per instance (statistics
   detached, as in MixStyle); L_con = InfoNCE(φ(h), φ(h̃)) with the batch as negatives. Mixed
   features never reach the KD logits.

L = L_kd + α L_feat + β L_con. `kd3.selection: false` keeps every instance (m = 1; the no-selection
ablation). Baseline (`arm: kd`): T²·KL(teacher || student) on the whole web pool with the student's
own classifier. Selection fraction, schedule and weights are reconstructions (card "(R)"): all
configurable.

Stages (each an ordinary run of the one Trainer): `teacher` (`<run>/stages/teacher`, cross-entropy
on the original labelled split, `kdforge.tasks.datafree.SupervisedTask`), then the student on the
web pool in the run directory itself (`KD3Task`). `teacher_only: true` trains only the teacher,
into the run directory itself (an experiment's shared stage); `teacher_run: DIR` loads a finished
teacher (such a run, or a kd3 run whose `stages/teacher` finished) instead of training one, after
checking that it was trained with this recipe's data and teacher settings. Batches, crop/flip
views, the Beta λ's and the mixing partners are pure functions of (seed, epoch, step), and the
epoch's selection is task state saved in every checkpoint, so a run stopped anywhere resumes
exactly. DDP is allowed with per-rank batch statistics: BatchNorm, the InfoNCE negatives and the
MixDistribution partners come from each rank's share of the batch (as multi-GPU MixStyle/InfoNCE
code does); each rank scores its share of the pool and the shares are summed, and the selection
denominator Σ m_i is that of the global batch, so CE and L_feat weight every selected instance of
the global batch equally. With `norm: group` (per-sample GroupNorm) and `kd3.con_weight: 0` (or
`arm: kd`) nothing couples samples across ranks and 2 processes reproduce 1 (tests/test_kd3.py).

Recipe schema (`configs/methods/kd3.yaml`; `kdforge train configs/methods/kd3.yaml --out runs/kd3`):

    method: kd3
    seed: int                     # student seed (teacher uses teacher_seed)
    teacher_seed: int
    teacher_run: DIR | null       # a finished teacher to reuse (else the teacher stage is trained)
    teacher_only: bool            # train only the teacher (into the run directory itself)
    data: {num_classes, num_orig, num_web, num_test, num_val, image_size, fractions, seed}
    teacher_width: int            # TinyCNN widths
    student_width: int
    norm: batch|group             # TinyCNN normalisation (group: per-sample, see DDP above)
    teacher_loop: {epochs, batch_size, optim, schedule, grad_clip, progress}   # LoopConfig
    student_loop: {epochs, batch_size, optim, schedule, grad_clip, progress}
    kd3: {arm: kd|kd3, temperature, selection, keep_fraction, lambda_start, lambda_end,
          agreement_warmup, classifier_sharing, feat_weight, con_weight, con_temperature, mix_alpha}
    trainer: {...}                # optional TrainerConfig options for every stage (device, amp, ...)

Unknown keys fail with one line naming the key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig, to_dict
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.base import Autocast, TaskModule, rank_share, seeded_generator
from kdforge.tasks.common import LoopConfig, predict, prepare_images
from kdforge.tasks.datafree import (
    NORMS,
    DataFreeData,
    DataFreeDataConfig,
    DataFreeTask,
    SupervisedTask,
    TinyCNN,
    WebBatch,
    tiny_cnn,
)
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import StageRun, loop_settings, parse_recipe, run_stage, shared_recipe

__all__ = [
    "KD3Config",
    "KD3Module",
    "KD3Student",
    "KD3Task",
    "combined_prediction",
    "info_nce",
    "kd3_losses",
    "mix_distribution",
    "mix_lambdas",
    "run_kd3",
    "select_instances",
    "teacher_weight",
    "train_teacher",
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


def select_instances(combined: Tensor, keep_fraction: float, agree: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(mask m, confidence w, pseudo-label ŷ) of a class-balanced selection over a pool.

    ŷ = argmax p, w = max p; within every pseudo-class the ceil(keep_fraction · n_c) most confident
    instances are kept (a per-class quantile of w; ties go to the lower position). `agree` (bool per
    instance, optional) then drops the instances on which teacher and student disagree.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise KdforgeError(f"kd3: keep_fraction must be in (0, 1], got {keep_fraction}")
    conf, pseudo = combined.max(-1)
    mask = torch.zeros_like(conf)
    for c in pseudo.unique().tolist():
        members = (pseudo == c).nonzero().flatten()
        order = torch.sort(-conf[members], stable=True).indices
        k = math.ceil(keep_fraction * len(members) - 1e-9)
        mask[members[order[:k]]] = 1.0
    if agree is not None:
        mask = mask * agree.to(mask.dtype)
    return mask, conf, pseudo


def kd3_losses(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_feat: Tensor,
    teacher_feat: Tensor,
    mask: Tensor,
    weight: Tensor,
    pseudo: Tensor,
    temperature: float = 4.0,
    denom: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(KL, CE, L_feat): T²·KL(p_T || p_S) averaged over every sample; CE to ŷ and the weighted
    feature distance over the selected ones (zero with a graph when nothing is selected).

    `denom` is Σ m over the global batch when this batch is one rank's share (default: Σ m here).
    """
    if temperature <= 0:
        raise KdforgeError(f"kd3: temperature must be > 0, got {temperature}")
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits.detach() / t, -1),
                  log_target=True, reduction="batchmean") * t * t
    denom = mask.sum() if denom is None else denom
    if float(denom) == 0:
        zero = student_logits.sum() * 0.0 + student_feat.sum() * 0.0
        return kl, zero, zero
    ce = F.cross_entropy(student_logits, pseudo, reduction="none")
    l_ce = (mask * ce).sum() / denom
    dist = (student_feat - teacher_feat.detach()).pow(2).mean(-1)
    l_feat = (mask * weight * dist).sum() / denom
    return kl, l_ce, l_feat


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
    """Student backbone + connector φ to the teacher's feature dim + (optionally frozen teacher) classifier.

    The backbone's own head is dropped: the classifier replaces it, and an unused trainable head
    would stall DDP's gradient reduction.
    """

    def __init__(self, backbone: TinyCNN, teacher: TinyCNN, classifier_sharing: bool = True) -> None:
        super().__init__()
        backbone.fc = nn.Identity()
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


def mix_lambdas(n: int, alpha: float, *seed: int) -> Tensor:
    """n draws of Beta(alpha, alpha), a pure function of the seed parts (the global RNG is left as it was)."""
    state = seeded_generator(*seed).initial_seed()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(state)
        return torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((n,))


# ------------------------------------------------------------------------------------- recipe


@dataclass
class KD3Args:
    arm: str = "kd3"
    temperature: float = 4.0
    selection: bool = True              # false: keep every instance (the no-selection ablation)
    keep_fraction: float = 0.5          # per pseudo-class, the most confident fraction kept
    lambda_start: float = 1.0
    lambda_end: float = 0.5
    agreement_warmup: int | None = None  # epochs before the teacher/student agreement gate (None: never)
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


# what defines the teacher: a `teacher_run` must have been trained with the same values
TEACHER_KEYS = ("data", "teacher_seed", "teacher_width", "norm", "teacher_loop")


@dataclass
class KD3Config:
    method: str = "kd3"
    seed: int = 0
    teacher_seed: int = 0
    teacher_run: str | None = None
    teacher_only: bool = False
    data: DataFreeDataConfig = field(default_factory=DataFreeDataConfig)
    teacher_width: int = 16
    student_width: int = 8
    norm: str = "batch"                # batch (TinyCNN's BatchNorm) | group (per-sample: DDP-exact terms)
    teacher_loop: LoopConfig = field(default_factory=lambda: _loop(10, 3e-3))
    student_loop: LoopConfig = field(default_factory=lambda: _loop(10, 3e-3))
    kd3: KD3Args = field(default_factory=KD3Args)

    def check(self) -> None:
        a = self.kd3
        if a.arm not in ARMS:
            raise ConfigError(f"kd3 recipe: kd3.arm must be one of {', '.join(ARMS)}, got {a.arm!r}")
        if not (0 <= a.lambda_end <= 1 and 0 <= a.lambda_start <= 1 and 0 < a.keep_fraction <= 1):
            raise ConfigError("kd3 recipe: kd3.lambda_start/lambda_end must be in [0, 1], keep_fraction in (0, 1]")
        if a.mix_alpha <= 0 or a.feat_weight < 0 or a.con_weight < 0:
            raise ConfigError("kd3 recipe: kd3.mix_alpha must be > 0 and the loss weights >= 0")
        if a.agreement_warmup is not None and a.agreement_warmup < 0:
            raise ConfigError("kd3 recipe: kd3.agreement_warmup must be >= 0 or null (no agreement gate)")
        if self.norm not in NORMS:
            raise ConfigError(f"kd3 recipe: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.teacher_only and self.teacher_run:
            raise ConfigError("kd3 recipe: teacher_only trains the teacher; it cannot also load teacher_run")
        self.teacher_loop.check("kd3 recipe: teacher_loop")
        self.student_loop.check("kd3 recipe: student_loop")


# ------------------------------------------------------------------------------------- student stage


class KD3Module(TaskModule):
    """Student (`KD3Student` for arm kd3, a bare TinyCNN for arm kd) + the frozen teacher.

    The selection (mask, confidence, pseudo-label of every web sample) is the task's, scored at
    the start of each epoch; each batch carries its part in `batch.extras`.
    """

    def __init__(self, student: nn.Module, teacher: TinyCNN, args: KD3Args, env: DistEnv) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleDict({"teacher": teacher.eval().requires_grad_(False)})
        self.args, self.env = args, env

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: WebBatch) -> Step:
        a, x, teacher = self.args, batch.images, self.teachers["teacher"]
        with torch.no_grad():
            h_t = teacher.features(x)
            z_t = teacher.fc(h_t)
        if a.arm == "kd":
            z_s = self.student(x)
            t = a.temperature
            kl = F.kl_div(F.log_softmax(z_s / t, -1), F.log_softmax(z_t / t, -1), log_target=True,
                          reduction="batchmean") * t * t
            return Step(outputs=z_s, losses={"kd": kl}, groups={"kd": "distill"}, teacher_logits=z_t)
        s, ex = self.student, batch.extras
        u = s.backbone.stem(x)
        proj = s.connector(s.backbone.body(u))
        z_s = s.classifier(proj)
        mask, conf, pseudo = ex["sel_mask"], ex["sel_conf"], ex["sel_pseudo"]
        kl, l_ce, l_feat = kd3_losses(z_s, z_t, proj, h_t, mask, conf, pseudo, a.temperature,
                                      denom=ex["sel_denom"].to(z_s.dtype))
        world = self.env.world      # DDP averages gradients over ranks: undo it for the global-Σm terms
        losses = {"kl": kl, "ce": l_ce * world, "feat": a.feat_weight * l_feat * world}
        if a.con_weight > 0:
            mixed = mix_distribution(u, ex["mix_perm"], ex["mix_lam"])
            l_con = info_nce(proj, s.connector(s.backbone.body(mixed)), a.con_temperature)
            losses["con"] = a.con_weight * l_con
        right = (pseudo == batch.truth).float()
        counts = torch.stack([mask.sum(), (mask * right).sum(), mask.new_tensor(float(len(mask))), right.sum()])
        return Step(outputs=z_s, losses=losses, groups=dict.fromkeys(losses, "distill"), teacher_logits=z_t,
                    extras={"selected": counts[0], "correct": counts[1], "seen": counts[2],
                            "labelled_right": counts[3]})


class KD3Task(DataFreeTask):
    """The student stage: distil the frozen teacher into a fresh student on the web pool only.

    Task state (arm kd3): the selection of the current epoch (`sel_*`, one entry per web sample,
    scored in `on_epoch_start`) and `totals` = (selected, selected with the right pseudo-label,
    scored, scored with the right pseudo-label) summed over the epochs.
    """

    def __init__(self, cfg: KD3Config, data: DataFreeData, teacher: TinyCNN, epochs: int) -> None:
        super().__init__(data, "web", cfg.student_loop.batch_size, cfg.seed, view_seed=cfg.seed * 16 + 1)
        self.cfg, self.teacher, self.epochs = cfg, teacher, epochs
        n = len(self.images)
        self.sel_epoch = -1
        self.sel_mask, self.sel_conf = torch.zeros(n), torch.zeros(n)
        self.sel_pseudo = torch.zeros(n, dtype=torch.long)
        self.totals = torch.zeros(4, dtype=torch.float64)
        self._teacher_logits: Tensor | None = None

    def make_module(self) -> nn.Module:
        cfg, a = self.cfg, self.cfg.kd3
        backbone = tiny_cnn(self.data.num_classes, cfg.student_width, cfg.norm)
        teacher = copy.deepcopy(self.teacher).to(self.device)
        student = KD3Student(backbone, teacher, a.classifier_sharing) if a.arm == "kd3" else backbone
        return KD3Module(student, teacher, a, self.env)

    # -- selection ---------------------------------------------------------------------------------

    def _pool_logits(self, net: nn.Module) -> Tensor:
        """Logits of `net` (eval mode, un-augmented views) on the whole pool: each rank scores its share."""
        n, env = len(self.images), self.env
        lo, hi = n * env.rank // env.world, n * (env.rank + 1) // env.world
        part = predict(net, self.images[lo:hi], 500,
                       lambda v: prepare_images(v.to(self.device), self.data.mean, self.data.std))
        full = torch.zeros(n, part.shape[1], device=self.device, dtype=torch.float64)
        full[lo:hi] = part.to(self.device, torch.float64)
        return env.all_reduce_sum(full).float().cpu() if env.enabled else full.float().cpu()

    def on_epoch_start(self, module: nn.Module, epoch: int) -> None:
        """Score the web pool with teacher + current student and select for this epoch (kept on resume)."""
        a = self.cfg.kd3
        if a.arm != "kd3" or self.sel_epoch == epoch:
            return
        if self._teacher_logits is None:
            self._teacher_logits = self._pool_logits(module.teachers["teacher"])
        z_t, z_s = self._teacher_logits, self._pool_logits(module.student)
        p = combined_prediction(z_t, z_s, teacher_weight(epoch, self.epochs, a.lambda_start, a.lambda_end))
        gate = a.agreement_warmup is not None and epoch >= a.agreement_warmup
        agree = z_t.argmax(-1) == z_s.argmax(-1) if gate else None
        if a.selection:
            mask, conf, pseudo = select_instances(p, a.keep_fraction, agree)
        else:
            conf, pseudo = p.max(-1)
            mask = torch.ones_like(conf)
        right = (pseudo == self.truth).double()
        self.totals += torch.stack([mask.double().sum(), (mask.double() * right).sum(),
                                    torch.tensor(float(len(mask)), dtype=torch.float64), right.sum()])
        self.sel_epoch, self.sel_mask, self.sel_conf, self.sel_pseudo = epoch, mask, conf, pseudo

    def batch(self, epoch: int, step: int, env: DistEnv) -> WebBatch:
        b = super().batch(epoch, step, env)
        a = self.cfg.kd3
        if a.arm != "kd3":
            return b
        idx, dev = b.index, self.device
        b.extras = {"sel_mask": self.sel_mask[idx].to(dev), "sel_conf": self.sel_conf[idx].to(dev),
                    "sel_pseudo": self.sel_pseudo[idx].to(dev),
                    "sel_denom": self.sel_mask[self.global_index(epoch, step)].sum().to(dev)}
        if a.con_weight > 0:     # λ per instance of the global batch; partners within the share
            lam = rank_share(mix_lambdas(len(idx) * env.world, a.mix_alpha, self.seed, 3, epoch, step), env)
            perm = torch.randperm(len(idx), generator=seeded_generator(self.seed, 4, epoch, step, env.rank))
            b.extras.update({"mix_lam": lam.to(dev), "mix_perm": perm.to(dev)})
        return b

    def state_dict(self) -> dict[str, Any]:
        if self.cfg.kd3.arm != "kd3":
            return {}
        return {"sel_epoch": self.sel_epoch, "sel_mask": self.sel_mask, "sel_conf": self.sel_conf,
                "sel_pseudo": self.sel_pseudo, "totals": self.totals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.kd3.arm != "kd3":
            super().load_state_dict(state)
            return
        self.sel_epoch = int(state["sel_epoch"])
        self.sel_mask, self.sel_conf = state["sel_mask"].float(), state["sel_conf"].float()
        self.sel_pseudo, self.totals = state["sel_pseudo"].long(), state["totals"].double()

    # -- metrics -----------------------------------------------------------------------------------

    def train_counts(self, out: Step, batch: WebBatch) -> dict[str, Tensor]:
        return {k: out.extras[k] for k in ("selected", "correct", "seen", "labelled_right") if k in out.extras}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        if not counts.get("seen"):
            return {}
        return {"train_selected_fraction": counts["selected"] / counts["seen"],
                "train_selection_precision": counts["correct"] / max(counts["selected"], 1.0),
                "train_pseudo_label_precision": counts["labelled_right"] / counts["seen"]}

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        """Student top-1 on the original test (and validation) split, per-class collapse diagnostics,
        the teacher's top-1, the in-class web top-1 and the selection's statistics."""
        d, net = self.data, module.eval_model()
        out: dict[str, Any] = {"test_top1": self.evaluate(module, "test", env)["top1"]}
        if len(d.val_images):
            out["val_top1"] = self.evaluate(module, "val", env)["top1"]
        out.update({f"test_{k}": v for k, v in self.class_report(net, d.test_images, d.test_labels).items()})
        out["teacher_test_top1"] = self.accuracy(module.teachers["teacher"], d.test_images, d.test_labels)
        out["web_in_class_top1"] = self.evaluate(module, "web_in_class", env)["top1"]
        out["style_gap"] = out["web_in_class_top1"] - out["test_top1"]
        selected, correct, seen, right = (float(v) for v in self.totals)
        if seen:
            out["selected_fraction"] = selected / seen
            out["selection_precision"] = correct / max(selected, 1.0)      # selected with the right ŷ
            out["pool_label_precision"] = right / seen                       # all scored with the right ŷ
            per_class = torch.bincount(self.sel_pseudo[self.sel_mask > 0], minlength=d.num_classes)
            out["last_selected_per_class_min"] = int(per_class.min())
            out["last_selected_per_class_max"] = int(per_class.max())
        return out

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"task": self.name, "stage": "student", "arm": cfg.kd3.arm,
                "student": f"tinycnn_w{cfg.student_width}", "teacher": f"tinycnn_w{cfg.teacher_width}",
                "norm": cfg.norm, "train_split": f"web pool ({len(self.images)} images)"}


# ------------------------------------------------------------------------------------- stages


def _recipe_text(cfg: KD3Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _teacher_task(cfg: KD3Config, data: DataFreeData) -> SupervisedTask:
    return SupervisedTask(data, cfg.teacher_width, cfg.teacher_loop.batch_size, cfg.teacher_seed, cfg.norm)


def train_teacher(cfg: KD3Config, run_dir: str | Path, data: DataFreeData | None = None,
                  trainer: TrainerConfig | None = None, config_text: str = "", name: str | None = "teacher"
                  ) -> StageRun:
    """Stage `teacher` (`<run_dir>/stages/teacher`, or `run_dir` itself when `name` is None): supervised
    on the original split, seed `teacher_seed`. A finished stage is loaded, not retrained; its
    `module.eval_model()` is the teacher network.
    """
    data = data if data is not None else cfg.data.build()
    return run_stage(run_dir, name, loop_settings(cfg.teacher_loop, cfg.teacher_seed, trainer),
                     _teacher_task(cfg, data), config_text or _recipe_text(cfg))


def load_teacher(cfg: KD3Config, data: DataFreeData, trainer: TrainerConfig | None = None) -> TinyCNN:
    """The finished teacher of `cfg.teacher_run` (a `teacher_only` run, or a kd3 run with `stages/teacher`).

    Fails in one line when it is not finished or was trained with other data or teacher settings.
    """
    root = Path(str(cfg.teacher_run))
    if (root / "stages" / "teacher" / "result.json").is_file():
        name: str | None = "teacher"
    elif (root / "result.json").is_file() and not (root / "stages" / "teacher").exists():
        name = None
    else:
        raise ConfigError(f"kd3 recipe: teacher_run {root} holds no finished teacher (train it first: "
                          "kdforge train configs/methods/kd3.yaml teacher_only=true --out DIR)")
    shared_recipe(root, KD3Config, cfg, lambda c: {k: to_dict(c)[k] for k in TEACHER_KEYS}, "kd3")
    return train_teacher(cfg, root, data, trainer, name=name).module.eval_model()


def run_kd3(cfg: KD3Config, run_dir: str | Path, teacher: TinyCNN | None = None, data: DataFreeData | None = None,
            trainer: TrainerConfig | None = None, config_text: str = "") -> dict[str, Any]:
    """The recipe's stages: the teacher (unless given, loaded from `teacher_run`, or `teacher_only`),
    then the student on the web pool into `run_dir`. Returns the last stage's result, or
    `{"stopped_at_step": ...}` when `trainer.stop_after_steps` stopped a stage."""
    cfg.check()
    text = config_text or _recipe_text(cfg)
    data = data if data is not None else cfg.data.build()
    if cfg.teacher_only:
        return train_teacher(cfg, run_dir, data, trainer, text, name=None).result
    if teacher is None and cfg.teacher_run:
        teacher = load_teacher(cfg, data, trainer)
    if teacher is None:
        stage = train_teacher(cfg, run_dir, data, trainer, text)
        if stage.stopped:
            return stage.result
        teacher = stage.module.eval_model()
    settings = loop_settings(cfg.student_loop, cfg.seed, trainer)
    task = KD3Task(cfg, data, teacher, settings.trainer.epochs)
    return run_stage(run_dir, None, settings, task, text).result


class KD3:
    """Registry entry: KD³ is a data-free task recipe (teacher stage, then the web-pool student stage)."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: str | Path) -> dict[str, Any]:
        """Run a `configs/methods/kd3.yaml` recipe into `run_dir` (see the module docstring)."""
        cfg, trainer, text = parse_recipe(tree, source, KD3Config, method="kd3")
        return run_kd3(cfg, run_dir, trainer=trainer, config_text=text)


METHODS.register(
    "kd3",
    KD3,
    family="data-free",
    paper="Knowledge Distillation between Different Distributions (KD^3), web-collected data",
    summary="class-balanced teacher-student dynamic selection of web samples + classifier sharing/feature "
    "alignment + MixDistribution contrastive block",
    task="datafree",
)
