"""Contrastive representation distillation (Tian et al., ICLR 2020) with momentum memory banks.

Follows RepDistiller's `crd/` (CRDLoss + ContrastMemory): two linear embedding heads map
the pooled student/teacher vectors to `feat_dim`, L2-normalised; each anchor is scored
against its positive and `nce_k` negatives drawn from the *other* model's memory bank, with
the NCE loss of the paper's Eq. 18 in both directions. Differences from RepDistiller:

* negatives are drawn uniformly from all other data set indices (never the positive itself),
  with torch's global CPU generator so a resumed run that restores the RNG state draws the
  same negatives; RepDistiller's CIFAR loader instead draws them from other classes;
* the memory banks and the normalisation constants Z are only updated in training mode, so
  computing the loss on validation batches does not write validation indices into the bank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.losses._common import flat, single
from kdforge.losses.base import DistillLoss, Features, LossContext, Shape
from kdforge.registry import LOSSES

_EPS = 1e-7


def crd_nce_loss(scores: Tensor, num_samples: int) -> Tensor:
    """NCE loss (Eq. 18) on (N, 1 + K) scores whose column 0 is the positive.

    A score P is classified "from data" against K noise draws of probability 1/num_samples:
    loss = -[sum log P_pos / (P_pos + K/n) + sum log (K/n) / (P_neg + K/n)] / N.
    """
    n, k1 = scores.shape
    m_pn = (k1 - 1) / float(num_samples)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + m_pn + _EPS))
    log_d0 = torch.log(m_pn / (neg + m_pn + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / n


def sample_negatives(index: Tensor, num_samples: int, k: int) -> Tensor:
    """(N, K) indices drawn uniformly with replacement from [0, num_samples) minus each row's positive.

    Drawn on the CPU with torch's global generator (checkpointed by the trainer), then moved.
    """
    draws = torch.randint(0, num_samples - 1, (index.shape[0], k)).to(index.device)
    return draws + (draws >= index.unsqueeze(1)).long()


class _Embed(nn.Module):
    """Linear projection to the contrastive space followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(flat(x)).float(), dim=1)


def _feature_dim(shapes: Sequence[Shape], role: str) -> int:
    if len(shapes) != 1:
        raise KdforgeError(f"crd: expects exactly one {role} tap (the pooled penultimate vector), "
                           f"got {len(shapes)}")
    shape = tuple(shapes[0])
    if len(shape) < 2:
        raise KdforgeError(f"crd: {role} tap shape {shape} must include the batch dimension")
    return math.prod(shape[1:])


class CRDLoss(DistillLoss):
    """CRD term. `setup` builds the heads and banks; `forward` needs `ctx.index`.

    State: `embed_s`/`embed_t` (trainable, created in `setup`, so the optimizer must be built
    after it), buffers `memory_s`/`memory_t` of shape (num_samples, feat_dim) and `z_norm`
    (the two normalisation constants, fixed on the first training batch as in RepDistiller),
    all in `state_dict`. Call `setup` before loading a checkpoint and before `.to(device)`.
    """

    def __init__(self, feat_dim: int = 128, nce_k: int = 4096, nce_t: float = 0.07,
                 nce_m: float = 0.5) -> None:
        super().__init__()
        if feat_dim < 1 or nce_k < 1 or nce_t <= 0 or not 0.0 <= nce_m < 1.0:
            raise KdforgeError(f"crd: need feat_dim >= 1, nce_k >= 1, nce_t > 0 and 0 <= nce_m < 1; got "
                               f"feat_dim={feat_dim}, nce_k={nce_k}, nce_t={nce_t}, nce_m={nce_m}")
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.nce_m = float(nce_m)
        self.num_samples = 0
        self.embed_s: _Embed | None = None
        self.embed_t: _Embed | None = None

    def setup(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
              num_samples: int) -> None:
        """Build the heads from the probed (batch-first) tap shapes and the banks for `num_samples`."""
        if num_samples < 2:
            raise KdforgeError(f"crd: needs a training set of at least 2 samples, got {num_samples}")
        self.num_samples = int(num_samples)
        self.embed_s = _Embed(_feature_dim(student_shapes, "student"), self.feat_dim)
        self.embed_t = _Embed(_feature_dim(teacher_shapes, "teacher"), self.feat_dim)
        # ContrastMemory's initialisation: uniform in [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3).
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, self.feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(num_samples, self.feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z_norm", torch.full((2,), -1.0))

    @property
    def num_negatives(self) -> int:
        """`nce_k` capped so that negatives never need the positive index."""
        return min(self.nce_k, self.num_samples - 1)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        if self.embed_s is None or self.embed_t is None:
            raise KdforgeError("crd: setup() was not called; the Distiller must call it with the tap "
                               "shapes and data set size before training")
        if ctx.index is None:
            raise KdforgeError("crd: needs the data set indices of the batch (ctx.index); use a data "
                               "loader that returns sample indices")
        s = flat(single(student, "crd", "student"))
        t = flat(single(teacher, "crd", "teacher").detach())
        index = ctx.index.reshape(-1).long().to(self.memory_s.device)
        n = s.shape[0]
        if t.shape[0] != n or index.shape[0] != n:
            raise KdforgeError(f"crd: student {tuple(s.shape)}, teacher {tuple(t.shape)} and index "
                               f"{tuple(index.shape)} must share the batch size")
        for x, head, role in ((s, self.embed_s, "student"), (t, self.embed_t, "teacher")):
            if x.shape[1] != head.linear.in_features:
                raise KdforgeError(f"crd: {role} feature has {x.shape[1]} values per sample but setup() "
                                   f"saw {head.linear.in_features}")
        if n and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise KdforgeError(f"crd: ctx.index must lie in [0, {self.num_samples}) (the size given to "
                               f"setup), got [{int(index.min())}, {int(index.max())}]")

        v_s = self.embed_s(s)
        v_t = self.embed_t(t)
        idx = torch.cat([index.unsqueeze(1), sample_negatives(index, self.num_samples,
                                                              self.num_negatives)], dim=1)
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            # exp(cos / 0.07) reaches ~1.6e6, beyond float16: score in float32.
            w_t = self.memory_t[idx].detach()          # (N, 1 + K, D) teacher bank
            w_s = self.memory_s[idx].detach()          # (N, 1 + K, D) student bank
            e_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.nce_t)
            e_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.nce_t)
            if self.training:
                with torch.no_grad():
                    first = torch.stack([e_s.mean(), e_t.mean()]) * self.num_samples
                    self.z_norm.copy_(torch.where(self.z_norm > 0, self.z_norm, first))
            z = self.z_norm.clamp(min=_EPS)  # an untrained (eval-only) module would otherwise divide by -1
            loss = crd_nce_loss(e_s / z[0], self.num_samples) + crd_nce_loss(e_t / z[1], self.num_samples)
            if self.training:
                self._update_memory(index, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """bank[index] = normalize(m * bank[index] + (1 - m) * embedding), per bank."""
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            mixed = bank[index] * self.nce_m + v.to(bank.dtype) * (1.0 - self.nce_m)
            bank.index_copy_(0, index, F.normalize(mixed, dim=1))

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}, "
                f"num_samples={self.num_samples}")


LOSSES.register("crd", CRDLoss, family="contrastive",
                paper="Tian et al. 2020, Contrastive Representation Distillation (ICLR)",
                group="distill", inputs="pooled")
