"""A SimCLR-style contrastive representation trained without labels (the WAD teacher).

`nt_xent_loss` is SimCLR's normalised-temperature cross-entropy over 2B projected views: each
view's positive is the other view of the same sample, the other 2B - 2 views are negatives.
`train_contrastive` fits an encoder with it on any unlabelled tensor pool, given an augmentation
function; `vector_augment` is the augmentation for feature vectors (random per-feature scaling,
feature dropout and Gaussian noise), so the card's 16-D blob demo gets a learnt teacher too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.tasks.common import LoopConfig, epoch_batches, fit, predict, seeded_generator

__all__ = ["ContrastiveEncoder", "embed", "nt_xent_loss", "train_contrastive", "vector_augment"]


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


def train_contrastive(
    encoder: nn.Module,
    pool: Tensor,
    loop: LoopConfig,
    augment: Callable[..., Tensor],
    temperature: float = 0.5,
    seed: int = 0,
    **augment_args: Any,
) -> list[dict[str, float]]:
    """Fit `encoder` with NT-Xent on two augmented views of every batch of the unlabelled `pool`."""
    loop.check("contrastive teacher")
    gen = seeded_generator(seed, 41)
    aug_gen = seeded_generator(seed, 43)
    batches: list[Tensor] = []
    steps = max(1, len(pool) // loop.batch_size)

    def on_epoch(epoch: int) -> None:
        batches[:] = epoch_batches(len(pool), loop.batch_size, gen)

    def step_fn(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        x = pool[batches[i % len(batches)]]
        return nt_xent_loss(
            encoder(augment(x, aug_gen, **augment_args)),
            encoder(augment(x, aug_gen, **augment_args)),
            temperature,
        ), {}

    encoder.train()
    torch.manual_seed(seed)
    return fit(list(encoder.parameters()), step_fn, steps, loop, "contrastive", on_epoch_start=on_epoch)


def embed(encoder: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """L2-normalised embeddings of `x` (no augmentation: the deterministic view)."""
    return F.normalize(predict(encoder, x, batch_size).float(), dim=1)
