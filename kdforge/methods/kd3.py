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

Stages (each an ordinary run of the one Trainer): `teacher` (`<run>/stages/teacher`, cross-entropy
on the original labelled split, `kdforge.tasks.datafree.SupervisedTask`), then the student on the
web pool in the run directory itself (`KD3Task`). Batches, crop/flip views, the Beta λ's and the
mixing partners are pure functions of (seed, epoch, step), and the selection totals are a module
buffer, so a run stopped anywhere resumes exactly. DDP is allowed with per-rank batch statistics:
BatchNorm, the InfoNCE negatives and the MixDistribution partners come from each rank's share of
the batch (as multi-GPU MixStyle/InfoNCE code does); the selection denominator Σ m_i is summed
over all ranks, so L_kd and L_feat weight every selected instance of the global batch equally.
With `norm: group` (per-sample GroupNorm) and `kd3.con_weight: 0` (or `arm: kd`) nothing couples
samples across ranks and 2 processes reproduce 1 (tests/test_kd3.py checks it).

Recipe schema (`configs/methods/kd3.yaml`; `kdforge train configs/methods/kd3.yaml --out runs/kd3`):

    method: kd3
    seed: int                     # student seed (teacher uses teacher_seed)
    teacher_seed: int
    data: {num_classes, num_orig, num_web, num_test, image_size, fractions, seed}
    teacher_width: int            # TinyCNN widths
    student_width: int
    norm: batch|group             # TinyCNN normalisation (group: per-sample, see DDP above)
    teacher_loop: {epochs, batch_size, optim, schedule, grad_clip, progress}   # LoopConfig
    student_loop: {epochs, batch_size, optim, schedule, grad_clip, progress}
    kd3: {arm: kd|kd3, temperature, threshold, lambda_start, lambda_end, agreement_warmup,
          selection, classifier_sharing, feat_weight, con_weight, con_temperature, mix_alpha}
    trainer: {...}                # optional TrainerConfig options for every stage (device, amp, ...)

Unknown keys fail with one line naming the key.
"""

from __future__ import annotations

import copy
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
from kdforge.tasks.common import LoopConfig, load_task_config
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
from kdforge.train.stages import StageRun, loop_settings, run_stage, split_trainer

__all__ = [
    "KD3Config",
    "KD3Module",
    "KD3Student",
    "KD3Task",
    "combined_prediction",
    "info_nce",
    "kd3_kd_feat_losses",
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
    denom: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(L_kd, L_feat) over the selected instances (zero with a graph when nothing is selected).

    `denom` is Σ m over the global batch when this batch is one rank's share (default: Σ m here).
    """
    if temperature <= 0:
        raise KdforgeError(f"kd3: temperature must be > 0, got {temperature}")
    denom = mask.sum() if denom is None else denom
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
    norm: str = "batch"                # batch (TinyCNN's BatchNorm) | group (per-sample: DDP-exact terms)
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
        if self.norm not in NORMS:
            raise ConfigError(f"kd3 recipe: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        self.teacher_loop.check("kd3 recipe: teacher_loop")
        self.student_loop.check("kd3 recipe: student_loop")


# ------------------------------------------------------------------------------------- student stage


class KD3Module(TaskModule):
    """Student (`KD3Student` for arm kd3, a bare TinyCNN for arm kd) + the frozen teacher.

    The buffer `selection` holds (selected, correctly pseudo-labelled, seen) web samples summed
    over training and over all ranks: a checkpointed diagnostic, identical on every rank.
    """

    def __init__(self, student: nn.Module, teacher: TinyCNN, args: KD3Args, epochs: int, env: DistEnv) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleDict({"teacher": teacher.eval().requires_grad_(False)})
        self.args, self.epochs, self.env = args, epochs, env
        self.register_buffer("selection", torch.zeros(3, dtype=torch.float64))

    def train(self, mode: bool = True) -> KD3Module:
        super().train(mode)
        self.teachers.eval()      # the teacher's BatchNorm statistics stay fixed
        return self

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
        s = self.student
        u = s.backbone.stem(x)
        proj = s.connector(s.backbone.body(u))
        z_s = s.classifier(proj)
        if a.selection:
            lam = teacher_weight(batch.epoch, self.epochs, a.lambda_start, a.lambda_end)
            p = combined_prediction(z_t, z_s, lam)
            mask, conf, pseudo = select_instances(p, z_t, z_s, a.threshold, batch.epoch >= a.agreement_warmup)
        else:
            conf, pseudo = z_t.softmax(-1).max(-1)
            mask = torch.ones_like(conf)
        local = torch.stack([mask.sum(), (mask * (pseudo == batch.truth).float()).sum(),
                             mask.new_tensor(float(len(mask)))]).double()
        total = self.env.all_reduce_sum(local)
        self.selection += total
        l_kd, l_feat = kd3_kd_feat_losses(z_s, z_t, proj, h_t, mask, conf, pseudo, a.temperature,
                                          denom=total[0].to(z_s.dtype))
        world = self.env.world      # DDP averages gradients over ranks: undo it for the global-Σm terms
        losses = {"kd": l_kd * world, "feat": a.feat_weight * l_feat * world}
        if a.con_weight > 0:
            mixed = mix_distribution(u, batch.extras["mix_perm"], batch.extras["mix_lam"])
            l_con = info_nce(proj, s.connector(s.backbone.body(mixed)), a.con_temperature)
            losses["con"] = a.con_weight * l_con
        return Step(outputs=z_s, losses=losses, groups=dict.fromkeys(losses, "distill"), teacher_logits=z_t,
                    extras={"selected": local[0], "correct": local[1], "seen": local[2]})


class KD3Task(DataFreeTask):
    """The student stage: distil the frozen teacher into a fresh student on the web pool only."""

    def __init__(self, cfg: KD3Config, data: DataFreeData, teacher: TinyCNN, epochs: int) -> None:
        super().__init__(data, "web", cfg.student_loop.batch_size, cfg.seed, view_seed=cfg.seed * 16 + 1)
        self.cfg, self.teacher, self.epochs = cfg, teacher, epochs

    def make_module(self) -> nn.Module:
        cfg, a = self.cfg, self.cfg.kd3
        backbone = tiny_cnn(self.data.num_classes, cfg.student_width, cfg.norm)
        teacher = copy.deepcopy(self.teacher).to(self.device)
        student = KD3Student(backbone, teacher, a.classifier_sharing) if a.arm == "kd3" else backbone
        return KD3Module(student, teacher, a, self.epochs, self.env)

    def batch(self, epoch: int, step: int, env: DistEnv) -> WebBatch:
        b = super().batch(epoch, step, env)
        a = self.cfg.kd3
        if a.arm == "kd3" and a.con_weight > 0:     # λ per instance of the global batch; partners within the share
            lam = rank_share(mix_lambdas(len(b.index) * env.world, a.mix_alpha, self.seed, 3, epoch, step), env)
            perm = torch.randperm(len(b.index), generator=seeded_generator(self.seed, 4, epoch, step, env.rank))
            b.extras = {"mix_lam": lam.to(self.device), "mix_perm": perm.to(self.device)}
        return b

    def train_counts(self, out: Step, batch: WebBatch) -> dict[str, Tensor]:
        return {k: out.extras[k] for k in ("selected", "correct", "seen") if k in out.extras}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        if not counts.get("seen"):
            return {}
        return {"train_selected_fraction": counts["selected"] / counts["seen"],
                "train_selection_precision": counts["correct"] / max(counts["selected"], 1.0)}

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        """Student top-1 on the original test split, the teacher's, the in-class web top-1 and the selection."""
        d = self.data
        out: dict[str, Any] = {
            "test_top1": self.evaluate(module, "test", env)["top1"],
            "teacher_test_top1": self.accuracy(module.teachers["teacher"], d.test_images, d.test_labels),
            "web_in_class_top1": self.evaluate(module, "web_in_class", env)["top1"],
        }
        out["style_gap"] = out["web_in_class_top1"] - out["test_top1"]
        selected, correct, seen = (float(v) for v in module.selection)
        if seen:
            out["selected_fraction"] = selected / seen
            out["selection_precision"] = correct / max(selected, 1.0)
        return out

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"task": self.name, "stage": "student", "arm": cfg.kd3.arm,
                "student": f"tinycnn_w{cfg.student_width}", "teacher": f"tinycnn_w{cfg.teacher_width}",
                "norm": cfg.norm, "train_split": f"web pool ({len(self.images)} images)"}


# ------------------------------------------------------------------------------------- stages


def _recipe_text(cfg: KD3Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def train_teacher(cfg: KD3Config, run_dir: str | Path, data: DataFreeData | None = None,
                  trainer: TrainerConfig | None = None, config_text: str = "") -> StageRun:
    """Stage `teacher` (`<run_dir>/stages/teacher`): supervised on the original split, seed `teacher_seed`.

    A finished stage is loaded, not retrained; its `module.eval_model()` is the teacher network.
    """
    data = data if data is not None else cfg.data.build()
    loop = cfg.teacher_loop
    task = SupervisedTask(data, cfg.teacher_width, loop.batch_size, cfg.teacher_seed, cfg.norm)
    return run_stage(run_dir, "teacher", loop_settings(loop, cfg.teacher_seed, trainer), task,
                     config_text or _recipe_text(cfg))


def run_kd3(cfg: KD3Config, run_dir: str | Path, teacher: TinyCNN | None = None, data: DataFreeData | None = None,
            trainer: TrainerConfig | None = None, config_text: str = "") -> dict[str, Any]:
    """The recipe's stages: the teacher (unless given; demos share one across arms), then the student
    on the web pool into `run_dir`. Returns the student run's result, or `{"stopped_at_step": ...}`
    when `trainer.stop_after_steps` stopped a stage."""
    cfg.check()
    text = config_text or _recipe_text(cfg)
    data = data if data is not None else cfg.data.build()
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
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "kd3 is a data-free task recipe with a top-level `method: kd3`, not a classification run config: "
            "kdforge train configs/methods/kd3.yaml --out runs/kd3"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: str | Path) -> dict[str, Any]:
        """Run a `configs/methods/kd3.yaml` recipe into `run_dir` (see the module docstring)."""
        body, trainer = split_trainer(tree, source)
        cfg = load_task_config(KD3Config, body, name=source)
        return run_kd3(cfg, run_dir, trainer=trainer, config_text=yaml.safe_dump(tree, sort_keys=False))


METHODS.register(
    "kd3",
    KD3,
    family="data-free",
    paper="Knowledge Distillation between Different Distributions (KD^3), web-collected data",
    summary="teacher-student dynamic selection of web samples + classifier sharing/feature alignment + "
    "MixDistribution contrastive block",
    task="datafree",
)
