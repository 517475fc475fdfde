"""UNO-style discovery network: encoder, a known-class prototype head and H novel-class heads.

* encoder: any zoo backbone (`create_model`) with its classifier replaced by an identity, so
  it returns the pooled feature vector (N, F);
* known head: cosine logits between the L2-normalised feature and C_l prototypes;
* each novel head: an MLP projector (Linear-BN-ReLU-Linear) whose L2-normalised output meets
  C_u prototypes (cosine logits). Several heads give several clusterings of the same data.

`normalize_prototypes()` re-normalises every prototype to unit length; the training modules call it
before each forward pass, as UNO does. The output is a dict (the task's native output):
`logits_lab` (N, C_l), `logits_unlab` (H, N, C_u) and `feats` (N, F).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.models import create_model

__all__ = ["DiscoveryNet", "MultiHead", "Prototypes", "discovery_net"]


class Prototypes(nn.Module):
    """Bias-free linear layer whose rows (prototypes) are kept at unit norm."""

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(x)


class MultiHead(nn.Module):
    """H independent (projector -> normalise -> prototypes) heads; returns (H, N, C) logits."""

    def __init__(
        self, in_dim: int, hidden_dim: int, proj_dim: int, num_prototypes: int, num_heads: int
    ) -> None:
        super().__init__()
        self.projectors = nn.ModuleList(
            nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, proj_dim),
            )
            for _ in range(num_heads)
        )
        self.prototypes = nn.ModuleList(Prototypes(proj_dim, num_prototypes) for _ in range(num_heads))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        for p in self.prototypes:
            p.normalize_prototypes()

    def forward(self, feats: Tensor) -> Tensor:
        return torch.stack(
            [p(F.normalize(proj(feats), dim=1)) for proj, p in zip(self.projectors, self.prototypes)]
        )


class DiscoveryNet(nn.Module):
    """Encoder + known-class prototypes + novel multi-head (see module docstring)."""

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        num_known: int,
        num_novel: int,
        num_heads: int = 2,
        hidden_dim: int = 256,
        proj_dim: int = 64,
    ) -> None:
        super().__init__()
        if min(num_known, num_novel, num_heads, feat_dim) < 1:
            raise KdforgeError(
                f"DiscoveryNet: sizes must be >= 1 (known {num_known}, novel {num_novel}, "
                f"heads {num_heads}, features {feat_dim})"
            )
        self.encoder = encoder
        self.head_lab = Prototypes(feat_dim, num_known)
        self.head_unlab = MultiHead(feat_dim, hidden_dim, proj_dim, num_novel, num_heads)
        self.num_known, self.num_novel, self.num_heads = num_known, num_novel, num_heads

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.head_lab.normalize_prototypes()
        self.head_unlab.normalize_prototypes()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.encoder(x)
        if feats.dim() != 2:
            raise KdforgeError(
                f"DiscoveryNet: the encoder must return pooled features (N, F), got {tuple(feats.shape)}"
            )
        return {
            "logits_lab": self.head_lab(F.normalize(feats, dim=1)),
            "logits_unlab": self.head_unlab(feats),
            "feats": feats,
        }


def discovery_net(
    backbone: str,
    num_known: int,
    num_novel: int,
    in_channels: int = 3,
    num_heads: int = 2,
    hidden_dim: int = 256,
    proj_dim: int = 64,
    backbone_args: dict[str, Any] | None = None,
) -> DiscoveryNet:
    """A zoo backbone as encoder (classifier removed; its width from `stage_channels`)."""
    encoder = create_model(backbone, num_classes=num_known, in_channels=in_channels, **(backbone_args or {}))
    if not hasattr(encoder, "fc"):
        raise KdforgeError(f"discovery_net: backbone '{backbone}' has no `fc` classifier to remove")
    feat_dim = int(encoder.fc.in_features)
    encoder.fc = nn.Identity()
    return DiscoveryNet(encoder, feat_dim, num_known, num_novel, num_heads, hidden_dim, proj_dim)
