"""A zoo backbone with a query-per-class decoder head: label-wise embeddings and logits.

Why: label-wise embedding distillation (L2D's LED) needs one D-dim embedding per (image,
class). This head is a small ML-Decoder: the backbone's last spatial map becomes tokens, C
learnable class queries cross-attend to them (one transformer decoder layer: attention, then
a feed-forward block, post-norm), giving embeddings E (N, C, D); a group FC (one weight vector
per class) turns E into logits (N, C). As in ML-Decoder with `num_of_groups = num_classes`.

The model returns logits only; E is the output of the `decoder` submodule, so distillers read
it through `FeatureTap(model, ["label_embed"])` (alias in `model.feature_taps`). The backbone
is any zoo model (`kdforge.models.create_model`); its spatial map is read through a FeatureTap
on its last stage, and its own classifier is replaced by an identity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.models import create_model
from kdforge.models.taps import FeatureTap

__all__ = ["GroupFC", "LabelWiseNet", "QueryDecoder", "labelwise_net"]


class QueryDecoder(nn.Module):
    """C class queries cross-attending to the spatial tokens of a (N, Cf, H, W) map -> (N, C, D)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dim: int = 64,
        heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise KdforgeError(f"QueryDecoder: embed dim {dim} must be divisible by heads {heads}")
        self.embed = nn.Linear(in_channels, dim)
        self.queries = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.ReLU(), nn.Linear(ffn_mult * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, feat: Tensor) -> Tensor:
        if feat.dim() != 4:
            raise KdforgeError(f"QueryDecoder expects a spatial map (N, C, H, W), got {tuple(feat.shape)}")
        tokens = torch.relu(self.embed(feat.flatten(2).transpose(1, 2)))  # (N, HW, D)
        q = self.queries.unsqueeze(0).expand(feat.shape[0], -1, -1)  # (N, C, D)
        e = self.norm1(q + self.attn(q, tokens, tokens, need_weights=False)[0])
        return self.norm2(e + self.ffn(e))


class GroupFC(nn.Module):
    """One linear score per class from its own embedding: logits[n, c] = <E[n, c], W[c]> + b[c]."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_normal_(self.weight)

    def forward(self, e: Tensor) -> Tensor:
        return (e * self.weight).sum(-1) + self.bias


class LabelWiseNet(nn.Module):
    """backbone -> last spatial map -> QueryDecoder (label-wise embeddings) -> GroupFC (logits)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        dim: int = 64,
        heads: int = 4,
        tap: str | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = getattr(backbone, "stage_channels", None)
        if tap is None:
            if not channels:
                raise KdforgeError("LabelWiseNet: the backbone has no stage_channels; name its spatial tap")
            tap = f"feat{len(channels)}"
        if hasattr(backbone, "fc"):
            backbone.fc = nn.Identity()  # its own classifier is unused
        self.backbone = backbone
        self._tap_name = tap
        self._tap = FeatureTap(backbone, [tap])
        if channels and tap == f"feat{len(channels)}":
            width = int(channels[-1])
        else:
            width = self._probe_channels(in_channels)
        self.decoder = QueryDecoder(width, num_classes, dim, heads)
        self.group_fc = GroupFC(num_classes, dim)
        self.num_classes = num_classes
        self.feature_taps = {"label_embed": "decoder", "spatial": f"backbone.{_resolve(backbone, tap)}"}

    @torch.no_grad()
    def _probe_channels(self, in_channels: int) -> int:
        was = self.backbone.training
        self.backbone.eval()
        self.backbone(torch.zeros(1, in_channels, 32, 32))
        self.backbone.train(was)
        return int(self._tap.features[self._tap_name].shape[1])

    def forward(self, x: Tensor) -> Tensor:
        self._tap.clear()
        self.backbone(x)
        feat = self._tap.features[self._tap_name]
        return self.group_fc(self.decoder(feat))


def _resolve(model: nn.Module, name: str) -> str:
    return (getattr(model, "feature_taps", {}) or {}).get(name, name)


def labelwise_net(
    backbone: str,
    num_classes: int,
    in_channels: int = 3,
    dim: int = 64,
    heads: int = 4,
    backbone_args: dict[str, Any] | None = None,
    tap: str | None = None,
) -> LabelWiseNet:
    """A zoo backbone (`create_model(backbone, **backbone_args)`) with a label-wise decoder head."""
    net = create_model(backbone, num_classes=num_classes, in_channels=in_channels, **(backbone_args or {}))
    return LabelWiseNet(net, num_classes, dim, heads, tap, in_channels)
