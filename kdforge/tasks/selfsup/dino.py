"""DINO-style self-distillation: student + EMA teacher, multi-crop, centring and sharpening.

The loop (`train_self_distillation`) is the baseline for AdaSim; AdaSim only plugs in a
`partner` function (which dataset item view 2 comes from) and a `bank_hook` (teacher features
of view 1, for the neighbour bank). With `partner=None` view 2 is another crop of x_i: plain DINO.

    t_k = softmax((g_T(v_k) - c) / τ_t)        s_v = log_softmax(g_S(v) / τ_s)
    L   = mean over pairs (k global, v any view, v != k) of  -Σ t_k · s_v
    c  <- m_c c + (1 - m_c) mean_batch g_T(v_1..2)             teacher <- EMA(student), m: cosine -> 1
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.tasks.common import LoopConfig, fit, seeded_generator
from kdforge.tasks.selfsup.views import random_view

__all__ = ["DINOHead", "DINOSpec", "SelfDistillNet", "dino_loss", "ema_update", "train_self_distillation"]


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (K outputs)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden: int = 128, bottleneck: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, h: Tensor) -> Tensor:
        return self.last(F.normalize(self.mlp(h), dim=-1))


class SelfDistillNet(nn.Module):
    """Backbone (any module with `features`) + DINO head."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone.features(x)
        return h, self.head(h)


def dino_loss(
    student_out: list[Tensor], teacher_out: list[Tensor], center: Tensor, tau_s: float, tau_t: float
) -> Tensor:
    """Cross-entropy between sharpened, centred teacher views and every *other* student view."""
    if tau_s <= 0 or tau_t <= 0:
        raise KdforgeError(f"dino: temperatures must be > 0, got {tau_s}, {tau_t}")
    if not teacher_out or len(student_out) < len(teacher_out):
        raise KdforgeError("dino: need >= 1 teacher view and at least as many student views (globals first)")
    targets = [F.softmax((t.detach() - center) / tau_t, -1) for t in teacher_out]
    logs = [F.log_softmax(s / tau_s, -1) for s in student_out]
    total, pairs = student_out[0].new_zeros(()), 0
    for k, t in enumerate(targets):
        for v, s in enumerate(logs):
            if v == k:
                continue
            total = total + (-(t * s).sum(-1)).mean()
            pairs += 1
    if pairs == 0:
        raise KdforgeError("dino: need at least two views")
    return total / pairs


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m teacher + (1 - m) student (parameters and buffers of matching names)."""
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers(), strict=True):
        bt.copy_(bs)


def cosine_momentum(step: int, total: int, base: float) -> float:
    """DINO's teacher momentum schedule: base -> 1 along a half cosine."""
    if total <= 1:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / (total - 1)) + 1) / 2


@dataclass
class DINOSpec:
    out_dim: int = 256
    hidden: int = 128
    bottleneck: int = 64
    tau_s: float = 0.1
    tau_t: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99
    global_scale: list[float] | None = None   # default [0.4, 1.0]
    local_scale: list[float] | None = None    # default [0.1, 0.4]
    num_local: int = 0
    local_size: int = 8

    def check(self, where: str) -> None:
        if self.tau_s <= 0 or self.tau_t <= 0 or not 0 <= self.center_momentum < 1:
            raise KdforgeError(f"{where}: temperatures must be > 0 and center_momentum in [0, 1)")
        if not 0 <= self.teacher_momentum <= 1 or self.num_local < 0:
            raise KdforgeError(f"{where}: teacher_momentum must be in [0, 1] and num_local >= 0")


PartnerFn = Callable[[Tensor, int], Tensor]
BankHook = Callable[[Tensor, Tensor], None]


def train_self_distillation(
    student: SelfDistillNet,
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    spec: DINOSpec,
    loop: LoopConfig,
    seed: int,
    partner: PartnerFn | None = None,
    bank_hook: BankHook | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> tuple[SelfDistillNet, list[dict[str, float]]]:
    """Self-distil `student` on unlabelled uint8 `images`; returns (EMA teacher, per-epoch logs)."""
    spec.check("dino")
    teacher = copy.deepcopy(student).requires_grad_(False)
    n = len(images)
    steps = max(n // loop.batch_size, 1)
    gen = seeded_generator(seed, 3)
    center = torch.zeros(spec.out_dim)
    gscale = tuple(spec.global_scale or (0.4, 1.0))
    lscale = tuple(spec.local_scale or (0.1, 0.4))
    size = images.shape[-1]
    state: dict[str, object] = {"batches": [], "step": 0}
    total = loop.epochs * steps

    def step(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        nonlocal center
        if i == 0:
            if epoch > 0 and on_epoch_end is not None:
                on_epoch_end(epoch - 1)
            order = torch.randperm(n, generator=gen)[: steps * loop.batch_size]
            state["batches"] = list(order.split(loop.batch_size))
        idx = state["batches"][i]  # type: ignore[index]
        idx2 = partner(idx, epoch) if partner is not None else idx
        g1 = random_view(images[idx], size, gscale, gen, mean, std)
        g2 = random_view(images[idx2], size, gscale, gen, mean, std)
        locs = [random_view(images[idx], spec.local_size, lscale, gen, mean, std) for _ in range(spec.num_local)]
        teacher.train()
        with torch.no_grad():
            h_t, t_out = teacher(torch.cat([g1, g2]))
        b = len(idx)
        if bank_hook is not None:
            bank_hook(idx, F.normalize(h_t[:b], dim=-1))
        _, s_glob = student(torch.cat([g1, g2]))
        s_out = [s_glob[:b], s_glob[b:]] + [student(v)[1] for v in locs]
        loss = dino_loss(s_out, [t_out[:b], t_out[b:]], center, spec.tau_s, spec.tau_t)
        with torch.no_grad():
            center = spec.center_momentum * center + (1 - spec.center_momentum) * t_out.mean(0)
            t_prob = F.softmax((t_out - center) / spec.tau_t, -1).mean(0)
            entropy = float(-(t_prob * t_prob.clamp_min(1e-12).log()).sum())
        return loss, {"teacher_entropy": entropy, "bootstrap": float((idx2 != idx).float().mean())}

    def after(global_step: int) -> None:
        ema_update(teacher, student, cosine_momentum(global_step, total, spec.teacher_momentum))

    student.train()
    history = fit(list(student.parameters()), step, steps, loop, desc="self-distillation", after_step=after)
    if on_epoch_end is not None and loop.epochs > 0:
        on_epoch_end(loop.epochs - 1)
    return teacher.eval(), history
