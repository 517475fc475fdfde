"""OTD: optimization trajectory distillation for taxonomy-adaptive cross-domain adaptation.

The distilled knowledge is the *learning dynamics*: the gradients of the reliable part of the
problem (labelled source domain, old classes) guide the unreliable part (target domain, new
classes with few labels). Official code `camwew/TADA-MI` (card p05), transcribed from HoVer-Net
heads to a linear classification head W (C x D):

* per-sample head gradients G_i = ∂CE_i/∂W = (softmax(z_i) - onehot(y_i)) ⊗ h_i (exact for a
  linear head; the test checks it against `torch.func.vmap(grad)`), kept in the graph so the
  losses below back-propagate through h (double backprop).
* **gradient subspace**: a bank of the last K detached source means; every `svd_every` pushes,
  U S = svd(bank), r = #singular values covering `energy` (98%) of Σ S², P = U_r U_rᵀ (I before).
* **cross-domain stream**: μ, σ² over the batch of source rows and of mixed rows (target patches
  pasted into source images, pseudo-labelled by a frozen source-trained copy), each EMA'd
  (stored copy detached, current part in the graph: s ← m·s.detach() + (1-m)·current),
  L_dom = w_g·[mse(μ_s P, μ_m P) + mse(σ²_s P, σ²_m P)] + w_t·CE(mixed, pseudo).
* **cross-class stream**: rows G_i,c (dim D) per class on the target-like batch (few-shot target
  + mixed), μ_c, σ²_c (EMA); with the row projector P_row (bank of reliable-class means),
  t_μ = mean_{c old} mean(μ_c P_row) (detached), likewise t_σ;
  L_cls = w_g·Σ_{c new} [mse(mean(μ_c P_row), t_μ) + mse(mean(σ²_c P_row), t_σ)].
* **navigation** (after backward, before the step): per navigated weight, a bank of flat
  gradients (K_l = min(0.8 d, 300)), re-SVD every K_l pushes; once the first SVD exists,
  g ← g + η U_l U_lᵀ g.

L = CE_src + w_few·CE_few + L_dom + L_cls. Baseline (`arm: finetune`): CE_src + w_few·CE_few
only, same loop and budget. OTD starts after `warmup_epochs` (the pseudo-labeller is the model
at that point).

One run of the one Trainer (`DomainTask` of `kdforge.tasks.domain` + `OTDModule`): the phases
are epochs of a single stage, so the cosine schedule and AdamW moments run on across the switch
as in the original loop. Epochs < `warmup_epochs` train the source (+ few-shot target) CE only;
at the start of epoch `warmup_epochs` the module snapshots the model into the frozen
pseudo-labeller (a checkpointed submodule with a `labeller_ready` buffer), and from then on the
task adds mixed batches and the module the OTD terms. Batches (source and few-shot positions,
unlabelled partners, patch positions, crop/flip views) are pure functions of (seed, epoch,
step). Navigation is a gradient hook on the head weight: it runs inside the Trainer's backward,
before clipping and the step (under fp16 AMP it sees loss-scaled gradients). The EMA
statistics, the three gradient subspaces (`OTDState`) and the diagnostic sums are task state in
every checkpoint, so stop-and-resume is bitwise exact. DDP is refused (`OTDModule.ddp_note`):
the losses are statistics of per-sample gradients over the whole batch, and the banks and the
navigation read the whole gradient.

    kdforge train configs/methods/otd.yaml --out runs/otd [otd.arm=finetune ...]
    kdforge train --resume runs/otd

Recipe schema (`configs/methods/otd.yaml`):

    method: otd
    seed: int
    data: {num_old, num_new, src_per_class, shots, unl_per_class, test_per_class, image_size, seed}
    width: int
    loop: {epochs, batch_size, optim, schedule, grad_clip, progress}      # LoopConfig
    trainer: {device, threads, progress, stop_after_steps, ...}          # optional (TrainerConfig)
    otd: {arm: otd|finetune, few_weight, warmup_epochs, grad_weight, mix_weight, ema, energy,
          bank_size, svd_every, use_dom, use_cls, navigate, nav_weight, nav_bank}

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
from torch import Tensor

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig, to_dict
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.base import TaskModule
from kdforge.tasks.common import LoopConfig, load_task_config
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.domain import DomainBatch, DomainData, DomainTask, build_domains, evaluate_target, mix_domains
from kdforge.train.stages import loop_settings, run_stage, split_trainer

__all__ = [
    "GradientSubspace",
    "OTDConfig",
    "OTDModule",
    "OTDState",
    "ema_stat",
    "energy_rank",
    "evaluate_target",
    "mix_domains",
    "navigate",
    "per_sample_head_grads",
    "run_otd",
]

ARMS = ("otd", "finetune")


def per_sample_head_grads(features: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """(B, C, D) per-sample ∂CE/∂W of a linear head z = W h + b, differentiable w.r.t. h and W."""
    if features.dim() != 2 or logits.dim() != 2 or labels.shape != (len(features),):
        raise KdforgeError(
            f"otd: need features (B, D), logits (B, C), labels (B,), got {tuple(features.shape)}, "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    err = logits.softmax(-1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return err[:, :, None] * features[:, None, :]


def energy_rank(singular_values: Tensor, energy: float = 0.98) -> int:
    """Smallest r with Σ_{i<r} S_i² >= energy · Σ S² (at least 1)."""
    if not 0 < energy <= 1:
        raise KdforgeError(f"otd: energy must be in (0, 1], got {energy}")
    e = singular_values.pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-30)
    return int(min(int((cum < energy - 1e-9).sum()) + 1, len(singular_values)))


def ema_stat(stored: Tensor | None, current: Tensor, momentum: float) -> Tensor:
    """m · stored.detach() + (1 - m) · current (the current step keeps its graph; first call: current)."""
    if stored is None:
        return current
    return momentum * stored.detach() + (1 - momentum) * current


def _canonical(x: Tensor) -> Tensor:
    """A copy with row-major strides, as a checkpoint loads it (strides, even of size-1 dims, pick
    the matmul kernel; an in-run view and its reloaded copy must give the same bits on resume)."""
    return x.clone(memory_format=torch.contiguous_format)


class GradientSubspace:
    """Bank of the last `size` vectors (columns); every `every` pushes U_r from an SVD at `energy`.

    The bank lives on the device of the pushed vectors; `state_dict` is checkpointed as task state.
    """

    def __init__(self, dim: int, size: int, every: int, energy: float = 0.98) -> None:
        if dim < 1 or size < 1 or every < 1:
            raise KdforgeError(f"otd: subspace dim, size and every must be >= 1, got {dim}, {size}, {every}")
        self.dim, self.size, self.every, self.energy = dim, size, every, energy
        self.bank = torch.zeros(dim, 0)
        self.pushes = 0
        self.basis: Tensor | None = None  # (dim, r) or None (identity projector)

    def push(self, v: Tensor) -> None:
        col = v.detach().reshape(-1, 1).float()
        self.bank = _canonical(torch.cat([self.bank.to(col.device), col], 1)[:, -self.size :])
        self.pushes += 1
        if self.pushes % self.every == 0:
            u, s, _ = torch.linalg.svd(self.bank, full_matrices=False)
            self.basis = _canonical(u[:, : energy_rank(s, self.energy)])

    def project(self, x: Tensor) -> Tensor:
        """x (..., dim) -> x U Uᵀ (identity before the first SVD)."""
        if self.basis is None:
            return x
        b = self.basis.to(device=x.device, dtype=x.dtype)
        return (x @ b) @ b.T

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "pushes": self.pushes, "basis": self.basis}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        if state["bank"].shape[0] != self.dim:
            raise KdforgeError(f"otd: checkpointed subspace has dim {state['bank'].shape[0]}, expected {self.dim}")
        self.bank = state["bank"].clone().to(device)
        self.pushes = int(state["pushes"])
        self.basis = None if state["basis"] is None else state["basis"].clone().to(device)


def navigate(grad: Tensor, subspace: GradientSubspace, weight: float = 0.1) -> Tensor:
    """g + η U Uᵀ g once the subspace exists (before that, g unchanged); pushes g into the bank first."""
    flat = grad.reshape(-1)
    subspace.push(flat)
    if subspace.basis is None or subspace.bank.shape[1] < subspace.size:
        return grad
    return (flat + weight * subspace.project(flat)).reshape(grad.shape)


# ------------------------------------------------------------------------------------- recipe


@dataclass
class DomainDataConfig:
    num_old: int = 4
    num_new: int = 2
    src_per_class: int = 200
    shots: int = 5
    unl_per_class: int = 60
    test_per_class: int = 100
    image_size: int = 16
    seed: int = 0


@dataclass
class OTDArgs:
    arm: str = "otd"
    few_weight: float = 1.0
    warmup_epochs: int = 1
    grad_weight: float = 1000.0
    mix_weight: float = 0.1
    ema: float = 0.95
    energy: float = 0.98
    bank_size: int = 0          # 0: 0.8 * d (card)
    svd_every: int = 10
    use_dom: bool = True
    use_cls: bool = True
    navigate: bool = True
    nav_weight: float = 0.1
    nav_bank: int = 300


@dataclass
class OTDConfig:
    method: str = "otd"
    seed: int = 0
    data: DomainDataConfig = field(default_factory=DomainDataConfig)
    width: int = 16
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            epochs=12, batch_size=32, optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=5e-4),
            schedule=ScheduleConfig(name="cosine"),
        )
    )
    otd: OTDArgs = field(default_factory=OTDArgs)

    def check(self) -> None:
        a = self.otd
        if self.method != "otd":
            raise ConfigError(f"otd recipe: method must be 'otd', got {self.method!r}")
        if a.arm not in ARMS:
            raise ConfigError(f"otd recipe: otd.arm must be one of {', '.join(ARMS)}, got {a.arm!r}")
        if not (0 <= a.ema < 1 and 0 < a.energy <= 1) or a.svd_every < 1 or a.nav_bank < 1:
            raise ConfigError("otd recipe: otd.ema in [0, 1), energy in (0, 1], svd_every and nav_bank >= 1")
        if a.warmup_epochs < 0 or self.loop.epochs < 1:
            raise ConfigError(f"otd recipe: need otd.warmup_epochs >= 0 and loop.epochs >= 1, got "
                              f"{a.warmup_epochs}, {self.loop.epochs}")
        if self.loop.optim.name == "dot":
            raise ConfigError("otd recipe: loop.optim.name=dot is not supported (navigation edits the one "
                              "summed gradient); use adamw or sgd")
        self.loop.check("otd recipe: loop")


def _stats(rows: Tensor) -> tuple[Tensor, Tensor]:
    return rows.mean(0), rows.var(0, unbiased=False)


class OTDState:
    """EMA statistics and subspaces owned by the method (resumable through `state_dict`)."""

    def __init__(self, model: TinyCNN, a: OTDArgs) -> None:
        c, d = model.fc.weight.shape
        size = a.bank_size or max(int(0.8 * c * d), 1)
        self.head = GradientSubspace(c * d, size, a.svd_every, a.energy)
        self.rows = GradientSubspace(d, max(int(0.8 * d), 1), a.svd_every, a.energy)
        nav_dim = model.fc.weight.numel()
        nav_size = min(int(0.8 * nav_dim), a.nav_bank)
        self.nav = GradientSubspace(nav_dim, nav_size, nav_size, a.energy)
        self.ema: dict[str, Tensor] = {}

    def smooth(self, name: str, value: Tensor, momentum: float) -> Tensor:
        out = ema_stat(self.ema.get(name), value, momentum)
        self.ema[name] = out.detach()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ema": dict(self.ema), "head": self.head.state_dict(), "rows": self.rows.state_dict(),
                "nav": self.nav.state_dict()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.ema = {k: v.clone().to(device) for k, v in state["ema"].items()}
        for name in ("head", "rows", "nav"):
            getattr(self, name).load_state_dict(state[name], device)


def otd_losses(
    state: OTDState, a: OTDArgs, h_src: Tensor, z_src: Tensor, y_src: Tensor, h_mix: Tensor, z_mix: Tensor,
    y_mix: Tensor, h_tgt: Tensor, z_tgt: Tensor, y_tgt: Tensor, num_old: int,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The weighted terms {dom: w_g·L_dom, cls: w_g·L_cls} of one step and the raw values (see the docstring)."""
    logs: dict[str, float] = {}
    terms: dict[str, Tensor] = {}
    if a.use_dom:
        g_s = per_sample_head_grads(h_src, z_src, y_src).flatten(1)
        g_m = per_sample_head_grads(h_mix, z_mix, y_mix).flatten(1)
        mu_s, var_s = _stats(g_s)
        mu_m, var_m = _stats(g_m)
        mu_s, var_s = state.smooth("mu_s", mu_s, a.ema), state.smooth("var_s", var_s, a.ema)
        mu_m, var_m = state.smooth("mu_m", mu_m, a.ema), state.smooth("var_m", var_m, a.ema)
        state.head.push(mu_s)
        p = state.head.project
        l_dom = F.mse_loss(p(mu_s), p(mu_m)) + F.mse_loss(p(var_s), p(var_m))
        terms["dom"] = a.grad_weight * l_dom
        logs["l_dom"] = float(l_dom.detach())
    if a.use_cls:
        rows = per_sample_head_grads(h_tgt, z_tgt, y_tgt)  # (B, C, D)
        c = rows.shape[1]
        mus, vars_ = [], []
        for k in range(c):
            mu_k, var_k = _stats(rows[:, k])
            mus.append(state.smooth(f"mu_c{k}", mu_k, a.ema))
            vars_.append(state.smooth(f"var_c{k}", var_k, a.ema))
        state.rows.push(torch.stack(mus[:num_old]).mean(0))
        pr = state.rows.project
        t_mu = torch.stack([pr(mus[k]).mean() for k in range(num_old)]).mean().detach()
        t_var = torch.stack([pr(vars_[k]).mean() for k in range(num_old)]).mean().detach()
        l_cls = sum(
            (F.mse_loss(pr(mus[k]).mean(), t_mu) + F.mse_loss(pr(vars_[k]).mean(), t_var) for k in range(num_old, c)),
            start=z_src.new_zeros(()),
        )
        terms["cls"] = a.grad_weight * l_cls
        logs["l_cls"] = float(l_cls.detach())
    return terms, logs


class OTDModule(TaskModule):
    """TinyCNN trained on source + few-shot target CE, plus (arm otd, from `adapt_from`) the OTD terms.

    Holds the frozen pseudo-labeller (snapshot of the model at `adapt_from`, checkpointed with
    its `labeller_ready` flag), the `OTDState` and the diagnostic sums (task state), and the
    navigation hook on the head weight's gradient.
    """

    frozen = ()       # the pseudo-labeller is not trained (requires_grad off) but must be checkpointed
    ddp_note = ("OTD's losses are statistics of per-sample head gradients over the whole batch and its "
                "subspace banks and gradient navigation read the whole gradient; run it in one process")

    def __init__(self, model: TinyCNN, args: OTDArgs, num_old: int, adapt_from: int | None) -> None:
        super().__init__()
        self.model, self.args, self.num_old, self.adapt_from = model, args, num_old, adapt_from
        self.otd = OTDState(model, args)
        self.logs: dict[str, float] = {}
        self.steps = 0
        self._navigating = False
        self.labeller: TinyCNN | None = None
        if adapt_from is not None:
            self.labeller = copy.deepcopy(model).requires_grad_(False).eval()
            self.register_buffer("labeller_ready", torch.zeros((), dtype=torch.uint8))
            if args.navigate:
                model.fc.weight.register_hook(self._navigate_grad)

    def train(self, mode: bool = True) -> OTDModule:
        super().train(mode)
        if self.labeller is not None:
            self.labeller.eval()     # the pseudo-labeller's BN statistics stay fixed
        return self

    def eval_model(self) -> TinyCNN:
        return self.model

    def on_epoch_start(self, epoch: int) -> None:
        """Snapshot the model into the pseudo-labeller once, at the first adaptation epoch (also on resume)."""
        if self.labeller is not None and epoch >= self.adapt_from and not bool(self.labeller_ready):
            self.labeller.load_state_dict(self.model.state_dict())
            self.labeller_ready.fill_(1)

    def _navigate_grad(self, grad: Tensor) -> Tensor | None:
        if not self._navigating:
            return None
        return navigate(grad, self.otd.nav, self.args.nav_weight)

    def forward(self, batch: DomainBatch) -> Step:
        a, m = self.args, self.model
        h_src = m.features(batch.src)
        z_src = m.fc(h_src)
        h_few = m.features(batch.few)
        z_few = m.fc(h_few)
        losses = {"ce_src": F.cross_entropy(z_src, batch.src_labels),
                  "ce_few": a.few_weight * F.cross_entropy(z_few, batch.few_labels)}
        groups = {"ce_src": "task", "ce_few": "task"}
        self._navigating = False
        if self.labeller is not None:      # OTD arm: the same loss columns in every epoch (zero in warm-up)
            zero = z_src.new_zeros(())
            extra = {"ce_mix": zero, **({"dom": zero} if a.use_dom else {}), **({"cls": zero} if a.use_cls else {})}
            if batch.mixed is not None:
                if not bool(self.labeller_ready):
                    raise KdforgeError("otd: a mixed batch arrived before the pseudo-labeller snapshot "
                                       "(the task's mix_from and the module's adapt_from differ)")
                with torch.no_grad():
                    y_mix = self.labeller(batch.mixed).argmax(1)
                h_mix = m.features(batch.mixed)
                z_mix = m.fc(h_mix)
                extra["ce_mix"] = a.mix_weight * F.cross_entropy(z_mix, y_mix)
                terms, logs = otd_losses(
                    self.otd, a, h_src, z_src, batch.src_labels, h_mix, z_mix, y_mix,
                    torch.cat([h_few, h_mix]), torch.cat([z_few, z_mix]), torch.cat([batch.few_labels, y_mix]),
                    self.num_old,
                )
                extra.update(terms)
                for k, v in logs.items():
                    self.logs[k] = self.logs.get(k, 0.0) + v
                self._navigating = a.navigate
            losses.update(extra)
            groups.update({k: "distill" for k in extra})
        self.steps += 1
        return Step(outputs=z_src, losses=losses, groups=groups)

    def diagnostics(self) -> dict[str, Any]:
        """Mean raw l_dom / l_cls per training step and the head-gradient subspace rank (result.json)."""
        info: dict[str, Any] = {k: v / max(self.steps, 1) for k, v in self.logs.items()}
        basis = self.otd.head.basis
        info["head_subspace_rank"] = None if basis is None else int(basis.shape[1])
        return info

    def task_state(self) -> dict[str, Any]:
        return {"otd": self.otd.state_dict(), "logs": dict(self.logs), "steps": self.steps}

    def load_task_state(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        if set(state) != {"otd", "logs", "steps"}:
            raise KdforgeError(f"otd: the checkpoint's task state has keys {sorted(state)}, not an OTD run's")
        self.otd.load_state_dict(state["otd"], device)
        self.logs = {k: float(v) for k, v in state["logs"].items()}
        self.steps = int(state["steps"])


def build_data(cfg: OTDConfig) -> DomainData:
    d = cfg.data
    return build_domains(d.num_old, d.num_new, d.src_per_class, d.shots, d.unl_per_class, d.test_per_class,
                         d.image_size, d.seed)


def run_otd(cfg: OTDConfig, run_dir: str | Path, data: DomainData | None = None,
            trainer: TrainerConfig | None = None, config_text: str = "") -> dict[str, Any]:
    """Adapt (OTD or plain source + few-target fine-tuning) into `run_dir`; evaluate on the target test split.

    One Trainer run (a finished `run_dir` is loaded, an interrupted one resumed). `data` lets
    several runs share one built `DomainData`. Returns the target metrics and the OTD
    diagnostics, or `{"stopped_at_step": ...}` when `trainer.stop_after_steps` stopped it.
    """
    cfg.check()
    data = data if data is not None else build_data(cfg)
    torch.manual_seed(cfg.seed)
    model = TinyCNN(data.num_classes, cfg.width)
    adapt_from = cfg.otd.warmup_epochs if cfg.otd.arm == "otd" else None
    module = OTDModule(model, cfg.otd, data.num_old, adapt_from)
    task = DomainTask(module, data, cfg.loop.batch_size, cfg.seed, mix_from=adapt_from)
    text = config_text or yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return run_stage(run_dir, None, loop_settings(cfg.loop, cfg.seed, trainer), task, text).result


class OTD:
    """Registry entry: OTD runs as a domain-adaptation task recipe (`kdforge.tasks.domain`)."""

    @classmethod
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "otd is taxonomy-adaptive domain adaptation: its recipes are task recipes with a top-level "
            "`method: otd`; run kdforge train configs/methods/otd.yaml --out runs/otd"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: str | Path) -> dict[str, Any]:
        """Run a `configs/methods/otd.yaml` recipe into `run_dir` (see the module docstring)."""
        body, trainer = split_trainer(tree, source)
        cfg = load_task_config(OTDConfig, body, name=source)
        return run_otd(cfg, run_dir, trainer=trainer, config_text=yaml.safe_dump(tree, sort_keys=False))


METHODS.register(
    "otd",
    OTD,
    family="domain-adaptation",
    paper="Taxonomy Adaptive Cross-Domain Adaptation in Medical Imaging via Optimization Trajectory "
    "Distillation (Fan et al., ICCV 2023)",
    summary="cross-domain and cross-class matching of low-rank per-sample head-gradient statistics + "
    "navigation along the historical gradient subspace",
    task="domain",
)
