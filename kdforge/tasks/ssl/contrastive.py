"""A SimCLR-style contrastive representation trained without labels (the WAD teacher), as a Task.

`nt_xent_loss` is SimCLR's normalised-temperature cross-entropy over 2B projected views: each
view's positive is the other view of the same sample, the other 2B - 2 views are negatives.
`ContrastiveTask` fits an encoder with it on any unlabelled tensor pool through the Trainer;
`vector_augment` is the augmentation for feature vectors (random per-feature scaling, feature
dropout and Gaussian noise), so the card's 16-D blob demo gets a learnt teacher too.

Batch k of epoch e is a pure function of (seed, e, k): the indices come from `stream_batch`
and both views from a generator seeded by (seed, e, k), drawn for the whole global batch.

DDP is exact: NT-Xent couples every sample of the batch, so each rank projects its share of
the global batch and all-gathers the projections *with* gradient (`gather_with_grad`), so every
rank computes the global loss. The gather's backward sums the ranks' (equal) gradients, W * dL/dz
for the own share, and DDP's average divides by W again: the update is that of one process on
the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Task, TaskModule, rank_share, seeded_generator, stream_batch
from kdforge.tasks.common import predict
from kdforge.train.distributed import DistEnv, gather_with_grad

__all__ = [
    "ContrastiveEncoder",
    "ContrastiveModule",
    "ContrastiveTask",
    "embed",
    "nt_xent_loss",
    "vector_augment",
]

POOL_STREAM, VIEW_STREAM = 41, 43   # seed parts of the index stream and of the views


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR loss for two views (B, D) of the same B samples; mean over the 2B anchors."""
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise KdforgeError(
            f"nt_xent_loss: views must both be (B, D) with B >= 2, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise KdforgeError(f"nt_xent_loss: temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, positive)


def vector_augment(
    x: Tensor, gen: torch.Generator, noise: float = 0.3, drop: float = 0.2, scale: float = 0.2
) -> Tensor:
    """A random view of vectors (N, D): per-feature gain exp(N(0, scale)), dropout `drop`, + N(0, noise)."""
    gain = torch.exp(torch.randn(x.shape, generator=gen) * scale)
    keep = (torch.rand(x.shape, generator=gen) >= drop).to(x.dtype)
    return x * gain * keep + torch.randn(x.shape, generator=gen) * noise


class ContrastiveEncoder(nn.Module):
    """backbone -> projection MLP; `forward` returns the projection (SimCLR's `simclr` layer)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_dim: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, proj_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class ContrastiveModule(TaskModule):
    """The encoder trained with NT-Xent over the global batch (all-gathered projections under DDP)."""

    def __init__(self, encoder: nn.Module, temperature: float, world: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.world = world

    def eval_model(self) -> nn.Module:
        return self.encoder

    def forward(self, batch: tuple[Tensor, Tensor]) -> Step:
        v1, v2 = batch
        b = len(v1)
        z = self.encoder(torch.cat([v1, v2]))
        if self.world > 1:     # every rank's [z1_share; z2_share], in rank order = the global batch order
            parts = gather_with_grad(z).split(2 * b)
            z1, z2 = torch.cat([p[:b] for p in parts]), torch.cat([p[b:] for p in parts])
        else:
            z1, z2 = z[:b], z[b:]
        loss = nt_xent_loss(z1, z2, self.temperature)
        return Step(outputs=z1, losses={"nt_xent": loss}, groups={"nt_xent": "task"})


class ContrastiveTask(Task):
    """NT-Xent on two augmented views of shuffled batches of an unlabelled pool (no labels read)."""

    name = "contrastive"

    def __init__(
        self,
        pool: Tensor,
        make_encoder: Callable[[], nn.Module],
        batch_size: int,
        temperature: float = 0.5,
        seed: int = 0,
        augment: Callable[..., Tensor] = vector_augment,
        **augment_args: Any,
    ) -> None:
        if len(pool) < 2:
            raise KdforgeError(f"contrastive teacher: the pool needs >= 2 samples, got {len(pool)}")
        self.pool = pool.float().cpu()
        self.make_encoder = make_encoder
        self.batch_size = batch_size
        self.temperature = temperature
        self.seed = seed
        self.augment = augment
        self.augment_args = augment_args

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return ContrastiveModule(self.make_encoder(), self.temperature, env.world).to(device)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.pool) // self.batch_size)

    def batch(self, epoch: int, step: int, env: DistEnv) -> tuple[Tensor, Tensor]:
        """Both views of the global batch (one generator per step), then this rank's share of them."""
        k = epoch * self.steps_per_epoch() + step
        x = self.pool[stream_batch(len(self.pool), self.batch_size, k, self.seed, POOL_STREAM)]
        gen = seeded_generator(self.seed, VIEW_STREAM, epoch, step)
        v1 = self.augment(x, gen, **self.augment_args)
        v2 = self.augment(x, gen, **self.augment_args)
        mine = rank_share(torch.arange(len(x)), env)
        return v1[mine].to(self.device), v2[mine].to(self.device)

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        return {"pool": len(self.pool)}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "temperature": self.temperature, "batch_size": self.batch_size}


def embed(encoder: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """L2-normalised embeddings of `x` (no augmentation: the deterministic view)."""
    return F.normalize(predict(encoder, x, batch_size).float(), dim=1)
