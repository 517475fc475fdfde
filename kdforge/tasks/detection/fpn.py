"""Pieces every detector here shares: the backbone taps' shapes, and the FPN top-down pathway."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.models.taps import FeatureTap

__all__ = ["freeze_unused", "tap_shapes", "top_down"]


@torch.no_grad()
def tap_shapes(backbone: nn.Module, taps: list[str], size: int, in_channels: int = 3) -> list[torch.Size]:
    """Shapes of the `taps` for one `size` x `size` image (probed in eval mode, the mode restored), so a
    detector can size its lateral convs and read its strides (size // width) before training."""
    was = backbone.training
    backbone.eval()
    with FeatureTap(backbone, taps) as tap:
        backbone(torch.zeros(1, in_channels, size, size))
        shapes = [tap.features[t].shape for t in taps]
    backbone.train(was)
    return shapes


def top_down(laterals: list[Tensor]) -> list[Tensor]:
    """FPN's top-down pathway: each level (finest first) plus the nearest-upsampled coarser sum."""
    out = list(laterals)
    for i in range(len(out) - 2, -1, -1):
        out[i] = out[i] + F.interpolate(out[i + 1], size=out[i].shape[-2:], mode="nearest")
    return out


def freeze_unused(backbone: nn.Module, taps: list[str], size: int, in_channels: int = 3) -> list[str]:
    """Stop training the backbone parameters no tap depends on (e.g. a classifier's pooling + fc head).

    They never receive a gradient in a detector, so optimizers skip them either way; DDP, however,
    refuses parameters that get no gradient. Found by one backward from the taps (in eval mode,
    gradients cleared after). Returns the names frozen."""
    was = backbone.training
    backbone.eval()
    with torch.enable_grad(), FeatureTap(backbone, taps) as tap:
        backbone(torch.zeros(1, in_channels, size, size))
        sum(tap.features[t].float().sum() for t in taps).backward()
    backbone.train(was)
    frozen = []
    for name, p in backbone.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen.append(name)
        p.grad = None
    return frozen
