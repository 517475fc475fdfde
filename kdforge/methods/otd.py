"""OTD: optimization trajectory distillation for taxonomy-adaptive cross-domain adaptation.

The distilled knowledge is the *learning dynamics*: the gradients of the reliable part of the
problem (labelled source domain, old classes) guide the unreliable part (target domain, new
classes with few labels). Official code `camwew/TADA-MI` (card p05; `models/hovernet/run_desc.py`,
`run_train.py`, `image_mix.py`), transcribed from HoVer-Net's segmentation heads to one linear
classification head z = W h + b (C x D) on a TinyCNN:

* **class-mixed target stream** (official `oneMix`): a region of few-shot labelled target image i
  is pasted into unlabelled target image i (`kdforge.tasks.domain.class_mix`); the unlabelled
  images are pseudo-labelled by the *current* model (no-grad forward in training mode, as the
  official step does) and a pseudo-label counts only when its softmax confidence is >=
  `pl_threshold` (official type head: 0.4). With one label per image the mixed target is soft:
  area · onehot(y_few) + (1 - area) · onehot(pseudo) (the pixel-average of the official per-pixel
  labels); an unconfident pseudo-label is dropped from it (the official sets such pixels to
  background, a class a classifier does not have). The mixed CE (weight `mix_weight`, official
  0.1) is the soft-label CE.
* **per-sample head gradients** G_i = ∂CE_i/∂[W, b] = (p_i·Σ_c y_ic - y_i) ⊗ [h_i, 1] (exact for a
  linear head, soft targets included; the test checks it against `torch.func.vmap(grad)`), kept
  in the graph (double backprop). Like BackPACK's `BatchGrad` of the official batch-mean loss,
  the rows are divided by the number of samples in that loss.
* **gradient subspaces** (`GradientSubspace`, official `GradientBank`): a circular bank of the last
  K detached statistics; every `svd_every` pushes U S = svd(bank), r = #singular values covering
  `energy` (98%) of Σ S², projector U_r U_rᵀ (identity before the first SVD). Means and
  variances have separate banks, as in the official code.
* **cross-domain stream** (official np / tp_source branches): source rows and mixed rows of one
  forward of [source; mixed] (shared BN statistics, as in the official step); μ, σ² over the
  batch of each, EMA'd (official `MovingAverage`: zero start, stored copy detached, current part in
  the graph: s ← m·s.detach() + (1-m)·current), source μ, σ² pushed into their banks,
  L_dom = mse(μ_s P_μ, μ_m P_μ) + mse(σ²_s P_σ, σ²_m P_σ).
* **cross-class stream** (official tp branch): per-class rows of the weight gradient on the mixed
  batch, μ_c, σ²_c (EMA); the mean of the reliable (old-class) rows is pushed into its bank and
  t_μ = mean(μ_rel P) (detached), likewise t_σ;
  L_cls = Σ_{c new} [mse(mean(μ_c P), t_μ) + mse(mean(σ²_c P_σ), t_σ)].
* **navigation** (official: every conv weight of the type decoder, after backward, before the
  step): per navigated *feature-layer* weight (`nav_layers`, default the TinyCNN's stem and body
  convs) a circular bank of flat gradients (K_l = 0.8 d if d < 500 else 300, capped by the run's
  length, below), re-SVD every K_l pushes; once the first SVD exists g ← g + η U_l U_lᵀ g.

L = CE_src + w_few·CE_few + w_mix·CE_mix + w_g·(L_dom + L_cls) (`grad_weight`, official 1000).
Arms (`otd.arm`): `finetune` (CE_src + w_few·CE_few, the paper's comparison), `mix` (finetune + the
class-mixed stream with its pseudo-labels, no OTD terms, no navigation) and `otd` (everything).
Mixing and the OTD terms start after `warmup_epochs`, as in the official step.

**Bank sizes follow the run.** The official banks (K = 0.8 d columns, statistics re-SVD'd every
10 K pushes, navigation every K ≤ 300 pushes) assume tens of thousands of steps; a CPU run has a
few hundred. With `bank_size`, `svd_every` and `nav_bank` at 0 (auto) a bank holds at most
`bank_frac` of the adaptation steps (A = (epochs - warmup_epochs) · steps per epoch) and is
re-SVD'd each time it refills, so the subspaces exist, and navigation acts, from step
`bank_frac`·A on. A setting under which a subspace would never be computed within the run is
refused with one line (the old default, a 300-column navigation bank against 175 adaptation
steps, never navigated).

One run of the one Trainer (`DomainTask` of `kdforge.tasks.domain` + `OTDModule`): the warm-up
and adaptation are epochs of a single stage (one AdamW and cosine schedule across the switch;
the official code switches to a second optimizer with fresh moments there). Batches are pure
functions of (seed, epoch, step) and the source and few-shot batches do not depend on the arm,
so the arms of one seed see the same batches (and the mixing arms the same unlabelled images and
regions). Navigation is a gradient hook on each navigated weight: it runs inside the Trainer's
backward, before clipping and the step (under fp16 AMP it sees loss-scaled gradients). The EMA
statistics, the subspaces (`OTDState`) and the diagnostic sums are task state in every
checkpoint, so stop-and-resume is bitwise exact. DDP is refused (`OTDModule.ddp_note`).

result.json adds to the target metrics: `adapt_steps`; `l_dom` / `l_cls` (mean *unweighted* value
per adaptation step; the loss columns `train_dom` / `train_cls` of metrics.csv are the weighted
w_g·L values averaged over all steps of the epoch), `pl_kept` (fraction of pseudo-labels above
the threshold) and `pl_acc` (accuracy of the kept ones, read from labels the training never
sees), `nav_steps` (steps whose gradients navigation edited) and the subspace ranks.

    kdforge train configs/methods/otd.yaml --out runs/otd [otd.arm=finetune|mix ...]
    kdforge train --resume runs/otd

Recipe schema (`configs/methods/otd.yaml`):

    method: otd
    seed: int
    data: {num_old, num_new, src_per_class, shots, unl_per_class, val_per_class, test_per_class,
           image_size, seed}
    width: int
    loop: {epochs, batch_size, optim, schedule, grad_clip, progress}      # LoopConfig
    trainer: {device, threads, progress, stop_after_steps, ...}          # optional (TrainerConfig)
    otd: {arm: otd|mix|finetune, few_weight, warmup_epochs, mix_weight, mix_area, pl_threshold,
          grad_weight, ema, energy, bank_size, svd_every, bank_frac, use_dom, use_cls, navigate,
          nav_weight, nav_bank, nav_layers}

Unknown keys fail with one line naming the key.
"""

from __future__ import annotations

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
from kdforge.tasks.base import TaskModule
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.domain import DomainBatch, DomainData, DomainTask, build_domains, class_mix, evaluate_target
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = [
    "GradientSubspace",
    "OTDConfig",
    "OTDModule",
    "OTDState",
    "class_mix",
    "ema_stat",
    "energy_rank",
    "evaluate_target",
    "mixed_targets",
    "navigate",
    "per_sample_head_grads",
    "run_otd",
]

ARMS = ("otd", "mix", "finetune")


def per_sample_head_grads(features: Tensor, logits: Tensor, targets: Tensor, bias: bool = False) -> Tensor:
    """Per-sample ∂CE_i/∂W (B, C, D) of a linear head z = W h + b (with `bias`: ∂/∂[W, b], (B, C, D + 1)).

    `targets`: class indices (B,) or soft targets (B, C) (rows need not sum to 1: CE_i = -Σ_c y_ic
    log p_ic, whose logit gradient is p_i Σ_c y_ic - y_i). Differentiable w.r.t. h and W.
    """
    if features.dim() != 2 or logits.dim() != 2 or len(features) != len(logits) or not (
            targets.shape == (len(features),) or targets.shape == logits.shape):
        raise KdforgeError(
            f"otd: need features (B, D), logits (B, C), targets (B,) or (B, C), got {tuple(features.shape)}, "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    err = logits.softmax(-1) * targets.sum(1, keepdim=True) - targets
    if bias:
        features = torch.cat([features, features.new_ones(len(features), 1)], 1)
    return err[:, :, None] * features[:, None, :]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch mean of -Σ_c y_ic log p_ic (soft targets, rows summing to at most 1)."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def mixed_targets(few_labels: Tensor, pseudo_probs: Tensor, area: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Soft targets of class-mixed images and the mask of kept pseudo-labels.

    area · onehot(few label) + (1 - area) · onehot(argmax pseudo) where max pseudo prob >= threshold;
    an unconfident pseudo-label is dropped (that part of the image then carries no loss).
    """
    conf, pseudo = pseudo_probs.max(1)
    keep = conf >= threshold
    c = pseudo_probs.shape[1]
    y = area[:, None] * F.one_hot(few_labels, c).to(pseudo_probs.dtype)
    y = y + ((1 - area) * keep.to(area.dtype))[:, None] * F.one_hot(pseudo, c).to(pseudo_probs.dtype)
    return y, keep


def energy_rank(singular_values: Tensor, energy: float = 0.98) -> int:
    """Smallest r with Σ_{i<r} S_i² >= energy · Σ S² (at least 1)."""
    if not 0 < energy <= 1:
        raise KdforgeError(f"otd: energy must be in (0, 1], got {energy}")
    e = singular_values.pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-30)
    return int(min(int((cum < energy - 1e-9).sum()) + 1, len(singular_values)))


def ema_stat(stored: Tensor | None, current: Tensor, momentum: float) -> Tensor:
    """m · stored.detach() + (1 - m) · current; the official `MovingAverage` starts from zero
    (first call: (1 - m) · current). The current step keeps its graph."""
    if stored is None:
        return (1 - momentum) * current
    return momentum * stored.detach() + (1 - momentum) * current


def _canonical(x: Tensor) -> Tensor:
    """A copy with row-major strides, as a checkpoint loads it (strides, even of size-1 dims, pick
    the matmul kernel; an in-run view and its reloaded copy must give the same bits on resume)."""
    return x.clone(memory_format=torch.contiguous_format)


class GradientSubspace:
    """Circular bank of `size` columns (zeros at first, as the official `GradientBank`); after every
    `every`-th push, U_r from an SVD of the bank at `energy`.

    The bank lives on the device of the pushed vectors; `state_dict` is checkpointed as task state.
    """

    def __init__(self, dim: int, size: int, every: int, energy: float = 0.98) -> None:
        if dim < 1 or size < 1 or every < 1:
            raise KdforgeError(f"otd: subspace dim, size and every must be >= 1, got {dim}, {size}, {every}")
        self.dim, self.size, self.every, self.energy = dim, size, every, energy
        self.bank = torch.zeros(dim, size)
        self.pushes = 0
        self.basis: Tensor | None = None  # (dim, r) or None (identity projector)

    def push(self, v: Tensor) -> None:
        col = v.detach().reshape(-1).float()
        if col.numel() != self.dim:
            raise KdforgeError(f"otd: pushed a vector of {col.numel()} values into a subspace of dim {self.dim}")
        if self.bank.device != col.device:
            self.bank = self.bank.to(col.device)
        self.bank[:, self.pushes % self.size] = col
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
        if tuple(state["bank"].shape) != (self.dim, self.size):
            raise KdforgeError(f"otd: checkpointed subspace bank has shape {tuple(state['bank'].shape)}, "
                               f"expected {(self.dim, self.size)}")
        self.bank = _canonical(state["bank"]).to(device)
        self.pushes = int(state["pushes"])
        self.basis = None if state["basis"] is None else _canonical(state["basis"]).to(device)


def navigate(grad: Tensor, subspace: GradientSubspace, weight: float = 0.1) -> Tensor:
    """Push g into the bank; then g + η U Uᵀ g once the subspace exists (before that, g unchanged)."""
    flat = grad.reshape(-1)
    subspace.push(flat)
    if subspace.basis is None:
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
    val_per_class: int = 0
    test_per_class: int = 100
    image_size: int = 16
    seed: int = 0


@dataclass
class OTDArgs:
    arm: str = "otd"
    few_weight: float = 1.0
    warmup_epochs: int = 1
    mix_weight: float = 0.1
    mix_area: float = 0.5
    pl_threshold: float = 0.4
    grad_weight: float = 1000.0
    ema: float = 0.95
    energy: float = 0.98
    bank_size: int = 0          # 0: min(0.8 d, bank_frac · adaptation steps)
    svd_every: int = 0          # 0: the bank size (re-SVD at every refill)
    bank_frac: float = 0.2
    use_dom: bool = True
    use_cls: bool = True
    navigate: bool = True
    nav_weight: float = 0.1
    nav_bank: int = 0           # 0: min(0.8 d if d < 500 else 300, bank_frac · adaptation steps)
    nav_layers: list[str] = field(default_factory=lambda: ["stem", "body"])


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

    def steps_per_epoch(self) -> int:
        return max(self.data.num_old * self.data.src_per_class // self.loop.batch_size, 1)

    def adapt_steps(self) -> int:
        """Optimizer steps with mixing and the OTD terms (epochs after the warm-up)."""
        return max(self.loop.epochs - self.otd.warmup_epochs, 0) * self.steps_per_epoch()

    def check(self) -> None:
        a = self.otd
        if a.arm not in ARMS:
            raise ConfigError(f"otd recipe: otd.arm must be one of {', '.join(ARMS)}, got {a.arm!r}")
        if not (0 <= a.ema < 1 and 0 < a.energy <= 1 and 0 < a.bank_frac <= 1) or min(
                a.bank_size, a.svd_every, a.nav_bank) < 0:
            raise ConfigError("otd recipe: otd.ema in [0, 1), energy and bank_frac in (0, 1], bank_size, svd_every "
                              "and nav_bank >= 0 (0: sized to the run)")
        if not (0 < a.mix_area <= 1 and 0 <= a.pl_threshold <= 1):
            raise ConfigError(f"otd recipe: otd.mix_area in (0, 1] and pl_threshold in [0, 1], got {a.mix_area}, "
                              f"{a.pl_threshold}")
        if a.warmup_epochs < 0 or self.loop.epochs < 1:
            raise ConfigError(f"otd recipe: need otd.warmup_epochs >= 0 and loop.epochs >= 1, got "
                              f"{a.warmup_epochs}, {self.loop.epochs}")
        if a.arm != "finetune" and self.adapt_steps() < 1:
            raise ConfigError(f"otd recipe: arm {a.arm} needs loop.epochs ({self.loop.epochs}) > otd.warmup_epochs "
                              f"({a.warmup_epochs}): no step would mix")
        bad = [n for n in a.nav_layers if n not in ("stem", "body", "fc")]
        if bad or not a.nav_layers:
            raise ConfigError(f"otd recipe: otd.nav_layers must name TinyCNN parts among stem, body, fc, got "
                              f"{a.nav_layers}")
        if self.loop.optim.name == "dot":
            raise ConfigError("otd recipe: loop.optim.name=dot is not supported (navigation edits the one "
                              "summed gradient); use adamw or sgd")
        self.loop.check("otd recipe: loop")


def _stats(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Batch mean and (biased) variance over dim 0, as the official code computes them."""
    mean = rows.mean(0)
    return mean, (rows - mean).pow(2).mean(0)


def _auto(size: int, dim: int, cap: int, steps: int, frac: float) -> int:
    """A bank size: `size` if set, else min(cap, frac · steps) (at least 1, at most dim's card cap)."""
    if size:
        return size
    return max(1, min(cap, int(frac * steps)))


def _nav_params(model: TinyCNN, layers: list[str]) -> list[tuple[str, nn.Parameter]]:
    """The multi-dimensional weights (conv / linear) under the named TinyCNN parts (official: `len(shape) > 1`)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and n.split(".")[0] in layers]


class OTDState:
    """EMA statistics, the statistic subspaces and the navigation subspaces (resumable via `state_dict`)."""

    def __init__(self, model: TinyCNN, a: OTDArgs, adapt_steps: int, navigated: bool = True) -> None:
        c, d = model.fc.weight.shape
        steps, frac = max(adapt_steps, 1), a.bank_frac
        k_head = _auto(a.bank_size, c * (d + 1), int(0.8 * c * (d + 1)), steps, frac)
        k_rows = _auto(a.bank_size, d, int(0.8 * d), steps, frac)
        self.head_mu = GradientSubspace(c * (d + 1), k_head, a.svd_every or k_head, a.energy)
        self.head_var = GradientSubspace(c * (d + 1), k_head, a.svd_every or k_head, a.energy)
        self.rows_mu = GradientSubspace(d, k_rows, a.svd_every or k_rows, a.energy)
        self.rows_var = GradientSubspace(d, k_rows, a.svd_every or k_rows, a.energy)
        self.nav: dict[str, GradientSubspace] = {}
        for name, p in _nav_params(model, a.nav_layers) if navigated else []:
            n = p.numel()
            k = _auto(a.nav_bank, n, int(0.8 * n) if n < 500 else 300, steps, frac)
            self.nav[name] = GradientSubspace(n, k, k, a.energy)
        self.ema: dict[str, Tensor] = {}

    def subspaces(self) -> dict[str, GradientSubspace]:
        return {"head_mu": self.head_mu, "head_var": self.head_var, "rows_mu": self.rows_mu,
                "rows_var": self.rows_var, **{f"nav:{k}": v for k, v in self.nav.items()}}

    def smooth(self, name: str, value: Tensor, momentum: float) -> Tensor:
        out = ema_stat(self.ema.get(name), value, momentum)
        self.ema[name] = out.detach()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ema": dict(self.ema), **{k: s.state_dict() for k, s in self.subspaces().items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        if set(state) != {"ema", *self.subspaces()}:
            raise KdforgeError(f"otd: the checkpoint's subspaces {sorted(set(state) - {'ema'})} are not this run's "
                               f"{sorted(self.subspaces())}")
        self.ema = {k: v.clone().to(device) for k, v in state["ema"].items()}
        for name, sub in self.subspaces().items():
            sub.load_state_dict(state[name], device)


def otd_losses(
    state: OTDState, a: OTDArgs, h_src: Tensor, z_src: Tensor, y_src: Tensor, h_mix: Tensor, z_mix: Tensor,
    y_mix: Tensor, num_old: int,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The weighted terms {dom: w_g·L_dom, cls: w_g·L_cls} of one step and the raw values (see the docstring).

    `y_src`: source class indices; `y_mix`: soft targets of the mixed images.
    """
    logs: dict[str, float] = {}
    terms: dict[str, Tensor] = {}
    c = z_src.shape[1]
    if a.use_dom:        # one batch-mean loss over [source; mixed] rows, as the official np / tp_source branch
        n = len(h_src) + len(h_mix)
        y_all = torch.cat([F.one_hot(y_src, c).to(z_src.dtype), y_mix])
        g = per_sample_head_grads(torch.cat([h_src, h_mix]), torch.cat([z_src, z_mix]), y_all, bias=True)
        g = g.flatten(1) / n
        mu_s, var_s = _stats(g[: len(h_src)])
        mu_m, var_m = _stats(g[len(h_src):])
        mu_s, var_s = state.smooth("mu_s", mu_s, a.ema), state.smooth("var_s", var_s, a.ema)
        mu_m, var_m = state.smooth("mu_m", mu_m, a.ema), state.smooth("var_m", var_m, a.ema)
        state.head_mu.push(mu_s)
        state.head_var.push(var_s)
        pm, pv = state.head_mu.project, state.head_var.project
        l_dom = F.mse_loss(pm(mu_s), pm(mu_m)) + F.mse_loss(pv(var_s), pv(var_m))
        terms["dom"] = a.grad_weight * l_dom
        logs["l_dom"] = float(l_dom.detach())
    if a.use_cls and c > num_old:   # the official tp branch: the mixed rows' batch-mean loss, weight rows only
        rows = per_sample_head_grads(h_mix, z_mix, y_mix) / len(h_mix)      # (B, C, D)
        mu, var = _stats(rows)
        mu, var = state.smooth("mu_c", mu, a.ema), state.smooth("var_c", var, a.ema)
        rel_mu, rel_var = mu[:num_old].mean(0), var[:num_old].mean(0)
        state.rows_mu.push(rel_mu)
        state.rows_var.push(rel_var)
        pm, pv = state.rows_mu.project, state.rows_var.project
        t_mu, t_var = pm(rel_mu).mean().detach(), pv(rel_var).mean().detach()
        l_cls = sum(
            (F.mse_loss(pm(mu[k]).mean(), t_mu) + F.mse_loss(pv(var[k]).mean(), t_var) for k in range(num_old, c)),
            start=z_src.new_zeros(()),
        )
        terms["cls"] = a.grad_weight * l_cls
        logs["l_cls"] = float(l_cls.detach())
    return terms, logs


_LOG_KEYS = ("l_dom", "l_cls", "pl_seen", "pl_kept", "pl_correct", "nav_steps", "adapt_steps")


class OTDModule(TaskModule):
    """TinyCNN trained on source + few-shot target CE, plus (arms mix / otd, from `adapt_from`) the
    class-mixed stream with current-model pseudo-labels, and (arm otd) the OTD terms and navigation.

    Holds the `OTDState` and the diagnostic sums (task state) and the navigation hooks on the
    feature-layer weights' gradients.
    """

    frozen = ()
    ddp_note = ("OTD's losses are statistics of per-sample head gradients over the whole batch and its "
                "subspace banks and gradient navigation read the whole gradient; run it in one process")

    def __init__(self, model: TinyCNN, args: OTDArgs, num_old: int, adapt_from: int | None,
                 adapt_steps: int = 0) -> None:
        super().__init__()
        self.model, self.args, self.num_old, self.adapt_from = model, args, num_old, adapt_from
        self.mixes = adapt_from is not None and args.arm in ("mix", "otd")
        self.distils = adapt_from is not None and args.arm == "otd"
        self.otd = OTDState(model, args, adapt_steps, navigated=self.distils and args.navigate)
        if self.distils and adapt_steps > 0:
            never = {k: s.every for k, s in self.otd.subspaces().items() if s.every > adapt_steps}
            if never:
                name, every = next(iter(never.items()))
                raise ConfigError(f"otd recipe: subspace {name} is first computed after {every} pushes but the run "
                                  f"has {adapt_steps} adaptation steps, so it would never act; lower "
                                  "otd.bank_size / svd_every / nav_bank or set them to 0 (sized to the run)")
        self.logs: dict[str, float] = {}
        self.steps = 0
        self._navigating = False
        self._nav_edited = False
        if self.distils and args.navigate:
            for name, p in _nav_params(model, args.nav_layers):
                p.register_hook(self._nav_hook(name))

    def eval_model(self) -> TinyCNN:
        return self.model

    def _nav_hook(self, name: str):
        def hook(grad: Tensor) -> Tensor | None:
            if not self._navigating:
                return None
            sub = self.otd.nav[name]
            out = navigate(grad, sub, self.args.nav_weight)
            if sub.basis is not None:
                self._nav_edited = True
            return out
        return hook

    def _log(self, key: str, value: float) -> None:
        self.logs[key] = self.logs.get(key, 0.0) + value

    def forward(self, batch: DomainBatch) -> Step:
        a, m = self.args, self.model
        mixing = self.mixes and batch.mixed is not None
        if self.mixes and batch.mixed is None and self.adapt_from is not None and batch.epoch >= self.adapt_from:
            raise KdforgeError("otd: an adaptation epoch arrived without a mixed batch (the task's mix_from and "
                               "the module's adapt_from differ)")
        n = len(batch.src)
        if mixing:
            with torch.no_grad():            # current-model pseudo-labels (training mode, as the official step)
                probs = m(batch.unl).softmax(1)
            y_mix, keep = mixed_targets(batch.mix_labels, probs, batch.mix_area, a.pl_threshold)
            h = m.features(torch.cat([batch.src, batch.mixed]))     # one forward, as [source; mixed] officially
            h_src, h_mix = h[:n], h[n:]
            z_all = m.fc(h)
            z_src, z_mix = z_all[:n], z_all[n:]
        else:
            h_src = m.features(batch.src)
            z_src = m.fc(h_src)
        z_few = m(batch.few)
        losses = {"ce_src": F.cross_entropy(z_src, batch.src_labels),
                  "ce_few": a.few_weight * F.cross_entropy(z_few, batch.few_labels)}
        groups = {"ce_src": "task", "ce_few": "task"}
        self._navigating = False
        self._nav_edited = False
        if self.mixes:      # the same loss columns in every epoch (zero in the warm-up)
            zero = z_src.new_zeros(())
            extra = {"ce_mix": zero}
            if self.distils:
                extra.update({**({"dom": zero} if a.use_dom else {}), **({"cls": zero} if a.use_cls else {})})
            if mixing:
                extra["ce_mix"] = a.mix_weight * soft_cross_entropy(z_mix, y_mix)
                self._log("adapt_steps", 1.0)
                self._log("pl_seen", float(len(keep)))
                self._log("pl_kept", float(keep.sum()))
                if batch.unl_labels is not None:
                    self._log("pl_correct", float(((probs.argmax(1) == batch.unl_labels) & keep).sum()))
                if self.distils:
                    terms, logs = otd_losses(self.otd, a, h_src, z_src, batch.src_labels, h_mix, z_mix, y_mix,
                                             self.num_old)
                    extra.update(terms)
                    for k, v in logs.items():
                        self._log(k, v)
                    self._navigating = a.navigate
            losses.update(extra)
            groups.update({k: "task" if k == "ce_mix" else "distill" for k in extra})
        self.steps += 1
        return Step(outputs=z_src, losses=losses, groups=groups)

    def after_optimizer_step(self, step: int) -> None:
        if self._navigating and self._nav_edited:
            self._log("nav_steps", 1.0)
        self._navigating = False

    def diagnostics(self) -> dict[str, Any]:
        """Adaptation-step means of the raw l_dom / l_cls, pseudo-label use, navigation and subspace ranks."""
        lg = self.logs
        adapt = lg.get("adapt_steps", 0.0)
        info: dict[str, Any] = {"adapt_steps": int(adapt)}
        if self.mixes:
            seen = lg.get("pl_seen", 0.0)
            info["pl_kept"] = lg.get("pl_kept", 0.0) / seen if seen else None
            info["pl_acc"] = 100.0 * lg.get("pl_correct", 0.0) / lg["pl_kept"] if lg.get("pl_kept") else None
        if self.distils:
            for k in ("l_dom", "l_cls"):
                if k in lg:
                    info[k] = lg[k] / max(adapt, 1.0)
            info["nav_steps"] = int(lg.get("nav_steps", 0.0))
            for name, sub in self.otd.subspaces().items():
                info[f"rank_{name}"] = None if sub.basis is None else int(sub.basis.shape[1])
            info["nav_bank_sizes"] = {k: s.size for k, s in self.otd.nav.items()}
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
                         d.image_size, d.seed, d.val_per_class)


def build_task(cfg: OTDConfig, data: DomainData | None = None) -> DomainTask:
    """The DomainTask of a recipe with its OTDModule (model initialised from `cfg.seed`)."""
    cfg.check()
    data = data if data is not None else build_data(cfg)
    torch.manual_seed(cfg.seed)
    model = TinyCNN(data.num_classes, cfg.width)
    adapt_from = cfg.otd.warmup_epochs if cfg.otd.arm != "finetune" else None
    module = OTDModule(model, cfg.otd, data.num_old, adapt_from, cfg.adapt_steps())
    return DomainTask(module, data, cfg.loop.batch_size, cfg.seed, mix_from=adapt_from, mix_area=cfg.otd.mix_area)


def run_otd(cfg: OTDConfig, run_dir: str | Path, data: DomainData | None = None,
            trainer: TrainerConfig | None = None, config_text: str = "") -> dict[str, Any]:
    """Adapt (otd, mix or finetune arm) into `run_dir`; evaluate on the target test split.

    One Trainer run (a finished `run_dir` is loaded, an interrupted one resumed). `data` lets
    several runs share one built `DomainData`. Returns the target metrics and the OTD
    diagnostics, or `{"stopped_at_step": ...}` when `trainer.stop_after_steps` stopped it.
    """
    task = build_task(cfg, data)
    text = config_text or yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return run_stage(run_dir, None, loop_settings(cfg.loop, cfg.seed, trainer), task, text).result


class OTD:
    """Registry entry: OTD runs as a domain-adaptation task recipe (`kdforge.tasks.domain`)."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: str | Path) -> dict[str, Any]:
        """Run a `configs/methods/otd.yaml` recipe into `run_dir` (see the module docstring)."""
        cfg, trainer, text = parse_recipe(tree, source, OTDConfig, method="otd")
        return run_otd(cfg, run_dir, trainer=trainer, config_text=text)


METHODS.register(
    "otd",
    OTD,
    family="domain-adaptation",
    paper="Taxonomy Adaptive Cross-Domain Adaptation in Medical Imaging via Optimization Trajectory "
    "Distillation (Fan et al., ICCV 2023)",
    summary="class-mixed target stream + cross-domain and cross-class matching of low-rank per-sample "
    "head-gradient statistics + navigation of the feature layers along their historical gradient subspace",
    task="domain",
)
