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

Recipe schema (`configs/methods/otd.yaml`; `python -m kdforge.tasks.common configs/methods/otd.yaml`):

    method: otd
    seed: int
    data: {num_old, num_new, src_per_class, shots, unl_per_class, test_per_class, image_size, seed}
    width: int
    loop: {epochs, batch_size, optim, schedule, grad_clip, progress}      # LoopConfig
    otd: {arm: otd|finetune, few_weight, warmup_epochs, grad_weight, mix_weight, ema, energy,
          bank_size, svd_every, use_dom, use_cls, navigate, nav_weight, nav_bank}

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
from kdforge.tasks.common import LoopConfig, augment_images, load_task_config, predict, prepare_images
from kdforge.tasks.common import seeded_generator as _gen
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.domain import DomainData, build_domains
from kdforge.train.optim import build_optimizer, lr_factor, set_lr

__all__ = [
    "GradientSubspace",
    "OTDConfig",
    "ema_stat",
    "energy_rank",
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


class GradientSubspace:
    """Bank of the last `size` vectors (columns); every `every` pushes U_r from an SVD at `energy`."""

    def __init__(self, dim: int, size: int, every: int, energy: float = 0.98) -> None:
        if dim < 1 or size < 1 or every < 1:
            raise KdforgeError(f"otd: subspace dim, size and every must be >= 1, got {dim}, {size}, {every}")
        self.dim, self.size, self.every, self.energy = dim, size, every, energy
        self.bank = torch.zeros(dim, 0)
        self.pushes = 0
        self.basis: Tensor | None = None  # (dim, r) or None (identity projector)

    def push(self, v: Tensor) -> None:
        self.bank = torch.cat([self.bank, v.detach().reshape(-1, 1).float()], 1)[:, -self.size :]
        self.pushes += 1
        if self.pushes % self.every == 0:
            u, s, _ = torch.linalg.svd(self.bank, full_matrices=False)
            self.basis = u[:, : energy_rank(s, self.energy)]

    def project(self, x: Tensor) -> Tensor:
        """x (..., dim) -> x U Uᵀ (identity before the first SVD)."""
        if self.basis is None:
            return x
        b = self.basis.to(x.dtype)
        return (x @ b) @ b.T

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "pushes": self.pushes, "basis": self.basis}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank, self.pushes, self.basis = state["bank"].clone(), int(state["pushes"]), state["basis"]


def navigate(grad: Tensor, subspace: GradientSubspace, weight: float = 0.1) -> Tensor:
    """g + η U Uᵀ g once the subspace exists (before that, g unchanged); pushes g into the bank first."""
    flat = grad.reshape(-1)
    subspace.push(flat)
    if subspace.basis is None or subspace.bank.shape[1] < subspace.size:
        return grad
    return (flat + weight * subspace.project(flat)).reshape(grad.shape)


def mix_domains(source: Tensor, target: Tensor, gen: torch.Generator, frac: float = 0.5) -> Tensor:
    """Paste a random square target patch (side `frac` of the image) into each source image (uint8)."""
    if source.shape != target.shape:
        raise KdforgeError(f"otd: mix needs equal shapes, got {tuple(source.shape)}, {tuple(target.shape)}")
    n, _, h, w = source.shape
    ph, pw = max(int(h * frac), 1), max(int(w * frac), 1)
    out = source.clone()
    ys = torch.randint(0, h - ph + 1, (n,), generator=gen)
    xs = torch.randint(0, w - pw + 1, (n,), generator=gen)
    for i in range(n):
        y, x = int(ys[i]), int(xs[i])
        out[i, :, y : y + ph, x : x + pw] = target[i, :, y : y + ph, x : x + pw]
    return out


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
        self.nav = GradientSubspace(nav_dim, min(int(0.8 * nav_dim), a.nav_bank), min(int(0.8 * nav_dim),
                                                                                         a.nav_bank), a.energy)
        self.ema: dict[str, Tensor | None] = {}

    def smooth(self, name: str, value: Tensor, momentum: float) -> Tensor:
        out = ema_stat(self.ema.get(name), value, momentum)
        self.ema[name] = out.detach()
        return out


def otd_losses(
    state: OTDState, a: OTDArgs, h_src: Tensor, z_src: Tensor, y_src: Tensor, h_mix: Tensor, z_mix: Tensor,
    y_mix: Tensor, h_tgt: Tensor, z_tgt: Tensor, y_tgt: Tensor, num_old: int,
) -> tuple[Tensor, dict[str, float]]:
    """L_dom + L_cls of one step (see the module docstring)."""
    logs: dict[str, float] = {}
    loss = z_src.new_zeros(())
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
        loss = loss + a.grad_weight * l_dom
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
        loss = loss + a.grad_weight * l_cls
        logs["l_cls"] = float(l_cls.detach())
    return loss, logs


def train_otd(cfg: OTDConfig, data: DomainData) -> tuple[TinyCNN, dict[str, Any]]:
    """The adaptation loop: own loop because navigation edits .grad between backward and step."""
    a, loop = cfg.otd, cfg.loop
    torch.manual_seed(cfg.seed)
    model = TinyCNN(data.num_classes, cfg.width)
    state = OTDState(model, a)
    gen = _gen(cfg.seed, 7)
    opt = build_optimizer(loop.optim, list(model.parameters()))
    base = [g["lr"] for g in opt.param_groups]
    n = len(data.src_images)
    steps = max(n // loop.batch_size, 1)
    few_bs = min(len(data.few_images), loop.batch_size)
    m, s, seed = data.mean, data.std, cfg.seed
    pseudo_labeller: TinyCNN | None = None
    logs_sum: dict[str, float] = {}
    step = 0
    for epoch in range(loop.epochs):
        active = a.arm == "otd" and epoch >= a.warmup_epochs
        if active and pseudo_labeller is None:
            pseudo_labeller = copy.deepcopy(model).eval().requires_grad_(False)
        order = torch.randperm(n, generator=gen)
        for i in range(steps):
            set_lr(opt, base, lr_factor(loop.schedule, step, steps, loop.epochs))
            idx = order[i * loop.batch_size : (i + 1) * loop.batch_size]
            fidx = torch.randperm(len(data.few_images), generator=gen)[:few_bs]
            x_src = augment_images(data.src_images[idx], idx, epoch, seed * 16, m, s)
            x_few = augment_images(data.few_images[fidx], fidx, epoch, seed * 16 + 1, m, s)
            h_src = model.features(x_src)
            z_src = model.fc(h_src)
            h_few = model.features(x_few)
            z_few = model.fc(h_few)
            loss = F.cross_entropy(z_src, data.src_labels[idx]) + a.few_weight * F.cross_entropy(
                z_few, data.few_labels[fidx]
            )
            if active:
                uidx = torch.randint(0, len(data.unl_images), (len(idx),), generator=gen)
                mixed = mix_domains(data.src_images[idx], data.unl_images[uidx], gen)
                x_mix = prepare_images(mixed, m, s)
                with torch.no_grad():
                    y_mix = pseudo_labeller(x_mix).argmax(1)
                h_mix = model.features(x_mix)
                z_mix = model.fc(h_mix)
                loss = loss + a.mix_weight * F.cross_entropy(z_mix, y_mix)
                h_tgt = torch.cat([h_few, h_mix])
                z_tgt = torch.cat([z_few, z_mix])
                y_tgt = torch.cat([data.few_labels[fidx], y_mix])
                extra, logs = otd_losses(state, a, h_src, z_src, data.src_labels[idx], h_mix, z_mix, y_mix,
                                         h_tgt, z_tgt, y_tgt, data.num_old)
                loss = loss + extra
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v
            if not torch.isfinite(loss):
                raise KdforgeError(f"otd: loss became {float(loss)} at epoch {epoch}, step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if active and a.navigate and model.fc.weight.grad is not None:
                model.fc.weight.grad = navigate(model.fc.weight.grad, state.nav, a.nav_weight)
            if loop.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
            opt.step()
            step += 1
    info = {k: v / max(step, 1) for k, v in logs_sum.items()}
    info["head_subspace_rank"] = None if state.head.basis is None else int(state.head.basis.shape[1])
    return model.eval(), info


def evaluate_target(model: nn.Module, data: DomainData) -> dict[str, float]:
    """Target-domain test accuracy (%): all, old classes, new classes, and mean per-class F1."""
    logits = predict(model, data.test_images, 500, lambda v: prepare_images(v, data.mean, data.std))
    pred, y = logits.argmax(1), data.test_labels
    old = y < data.num_old
    f1 = []
    for c in range(data.num_classes):
        tp = float(((pred == c) & (y == c)).sum())
        prec, rec = tp / max(float((pred == c).sum()), 1.0), tp / max(float((y == c).sum()), 1.0)
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return {
        "target_top1": 100.0 * float((pred == y).float().mean()),
        "target_old_top1": 100.0 * float((pred[old] == y[old]).float().mean()),
        "target_new_top1": 100.0 * float((pred[~old] == y[~old]).float().mean()) if bool((~old).any()) else 0.0,
        "target_macro_f1": 100.0 * sum(f1) / len(f1),
    }


def run_otd(cfg: OTDConfig, data: DomainData | None = None) -> dict[str, Any]:
    """Build the two domains, adapt (OTD or plain source + few-target fine-tuning), evaluate on the target."""
    cfg.check()
    d = cfg.data
    if data is None:
        data = build_domains(d.num_old, d.num_new, d.src_per_class, d.shots, d.unl_per_class, d.test_per_class,
                             d.image_size, d.seed)
    model, info = train_otd(cfg, data)
    return {**evaluate_target(model, data), **info}


class OTD:
    """Registry entry: OTD runs in the domain-adaptation loop (`kdforge.tasks.domain`)."""

    @classmethod
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "otd runs in the taxonomy-adaptive domain-adaptation loop, not the classification Trainer: "
            "python -m kdforge.tasks.common configs/methods/otd.yaml"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
        """Run a `configs/methods/otd.yaml` recipe (see the module docstring)."""
        return run_otd(load_task_config(OTDConfig, tree, name=source))


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
