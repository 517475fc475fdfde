"""DINO-style self-distillation: student + EMA teacher, multi-crop, centring and sharpening.

`DINOModule` is the training module the Trainer drives (`kdforge.tasks.selfsup.task`): the
student is trained; the EMA teacher is part of the module (no gradient, so never in the
optimizer) and saved in its checkpoints, as is the centre, so a resumed run is exact. AdaSim
changes only which dataset item view 2 comes from (the task's `partners`).

    t_k = softmax((g_T(v_k) - c) / τ_t)        s_v = log_softmax(g_S(v) / τ_s)
    L   = mean over pairs (k global, v any view, v != k) of  -Σ t_k · s_v
    c  <- m_c c + (1 - m_c) mean_batch g_T(v_1..2)             teacher <- EMA(student), m: cosine -> 1
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import TaskModule
from kdforge.train.distributed import DistEnv, gather_rows

__all__ = ["DINOHead", "DINOModule", "DINOSpec", "SelfDistillNet", "ViewBatch", "cosine_momentum", "dino_loss",
           "ema_update"]


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




@dataclass
class ViewBatch:
    """One rank's share of a batch: views of x_i (g1, locals) and of its partner x_j (g2)."""

    index: Tensor                      # dataset ids of x_i (view 1, local crops)
    partner: Tensor                    # dataset ids of x_j (view 2); == index for plain DINO
    g1: Tensor
    g2: Tensor
    locals: list[Tensor] = field(default_factory=list)
    epoch: int = 0
    step: int = 0


class DINOModule(TaskModule):
    """Student + EMA teacher + centre: `forward(ViewBatch) -> Step` with the DINO loss.

    The teacher runs in train mode (batch statistics, as the student) under no_grad; its
    BatchNorm running statistics are copied from the student by the EMA. Under DDP the centre
    and the logged teacher entropy use the teacher outputs of all ranks (`gather_rows`).
    """

    frozen: tuple[str, ...] = ()      # the teacher is state of this run: checkpointed, never optimised

    def __init__(self, student: SelfDistillNet, spec: DINOSpec, total_steps: int, env: DistEnv | None = None) -> None:
        super().__init__()
        spec.check("dino")
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(spec.out_dim))
        self.spec, self.total_steps, self.env = spec, total_steps, env or DistEnv()

    def forward(self, batch: ViewBatch) -> Step:
        s, b = self.spec, len(batch.index)
        self.teacher.train()
        with torch.no_grad():
            h_t, t_out = self.teacher(torch.cat([batch.g1, batch.g2]))
        _, s_glob = self.student(torch.cat([batch.g1, batch.g2]))
        s_out = [s_glob[:b], s_glob[b:]] + [self.student(v)[1] for v in batch.locals]
        loss = dino_loss(s_out, [t_out[:b], t_out[b:]], self.center, s.tau_s, s.tau_t)
        with torch.no_grad():
            t_all = gather_rows(t_out.float(), self.env)
            self.center.copy_(s.center_momentum * self.center + (1 - s.center_momentum) * t_all.mean(0))
            t_prob = F.softmax((t_all - self.center) / s.tau_t, -1).mean(0)
            entropy = -(t_prob * t_prob.clamp_min(1e-12).log()).sum()
        return Step(outputs=s_glob[:b], losses={"dino": loss}, groups={"dino": "distill"},
                    extras={"feat": F.normalize(h_t[:b].float(), dim=-1), "teacher_entropy": entropy})

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, cosine_momentum(step, self.total_steps, self.spec.teacher_momentum))

    def eval_model(self) -> nn.Module:
        """The EMA teacher: what DINO evaluates."""
        return self.teacher
