"""Pieces every detector here shares: the backbone taps' shapes, and the FPN top-down pathway."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.models.taps import FeatureTap

__all__ = ["tap_shapes", "top_down"]


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
