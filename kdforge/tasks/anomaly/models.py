"""Reverse distillation (RD, Deng & Li, CVPR 2022) parts at a small scale.

* `TeacherEncoder`: a frozen zoo network read through `FeatureTap` at several scales (any model
  and tap names work, so a user's own pretrained encoder slots in);
* `OneClassBottleneck`: RD's multi-scale fusion (every scale brought to the coarsest resolution by
  strided convs, concatenated) followed by the one-class embedding block (a stride-2 residual
  block), the compact code the student starts from;
* `ReverseDecoder`: the student, upsampling blocks from the code back through the teacher's
  scales, coarsest first; each block's output `S^l` goes through `adapters[l]` (identity for RD;
  MemKD fuses the recalled normality there) before it is compared with the teacher and fed on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.models.taps import FeatureTap

__all__ = ["OneClassBottleneck", "ReverseDecoder", "TeacherEncoder", "build_teacher"]


def _cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TeacherEncoder(nn.Module):
    """A frozen network whose tapped features (finest first) are the distillation targets."""

    def __init__(self, net: nn.Module, taps: Sequence[str]) -> None:
        super().__init__()
        if not taps:
            raise ConfigError("teacher.taps must name at least one feature")
        self.net, self.taps = net, list(taps)
        self._tap = FeatureTap(net, self.taps)

    @torch.no_grad()
    def forward(self, x: Tensor) -> list[Tensor]:
        self._tap.clear()
        self.net(x)
        return [self._tap.features[t] for t in self.taps]

    def train(self, mode: bool = True) -> TeacherEncoder:
        return super().train(False)       # always in eval mode (frozen batch-norm statistics)

    @torch.no_grad()
    def shapes(self, size: int, in_channels: int = 3) -> list[tuple[int, int]]:
        """(channels, side) of every tapped scale for a square input of `size`."""
        feats = self(torch.zeros(1, in_channels, size, size, device=next(self.net.parameters()).device))
        out = [(int(f.shape[1]), int(f.shape[-1])) for f in feats]
        sides = [s for _, s in out]
        if any(a <= b for a, b in zip(sides, sides[1:])):
            raise ConfigError(f"teacher.taps must go from fine to coarse resolution; got sides {sides}")
        if any(a != 2 * b for a, b in zip(sides, sides[1:])):
            raise ConfigError(f"teacher.taps must halve the resolution from one tap to the next; got sides {sides}")
        return out


def build_teacher(backbone: str, backbone_args: dict[str, Any], taps: Sequence[str], in_channels: int = 3,
                  net: nn.Module | None = None) -> TeacherEncoder:
    """The frozen teacher: `net` when given (e.g. pretrained), else the zoo's `backbone` at its own init."""
    from kdforge.models import create_model

    if net is None:
        net = create_model(backbone, num_classes=4, in_channels=in_channels, **backbone_args)
    return TeacherEncoder(net.eval().requires_grad_(False), taps)


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion to the coarsest scale, then RD's one-class embedding (stride-2 residual)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], embed: int) -> None:
        super().__init__()
        c_last, side_last = shapes[-1]
        self.down = nn.ModuleList()
        for c, side in shapes:
            steps, layers, prev = 0, [], c
            while side > side_last:
                layers.append(_cbr(prev, c_last, stride=2))
                prev, side, steps = c_last, side // 2, steps + 1
            self.down.append(nn.Sequential(*layers) if layers else nn.Identity())
        fused = sum(c_last if s > side_last else c for c, s in shapes)
        self.fuse = nn.Sequential(nn.Conv2d(fused, embed, 1, bias=False), nn.BatchNorm2d(embed), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(embed, embed, 3, 2, 1, bias=False), nn.BatchNorm2d(embed), nn.ReLU(),
                                   nn.Conv2d(embed, embed, 3, 1, 1, bias=False), nn.BatchNorm2d(embed))
        self.skip = nn.Sequential(nn.Conv2d(embed, embed, 1, 2, bias=False), nn.BatchNorm2d(embed))
        self.act = nn.ReLU()

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.fuse(torch.cat([d(f) for d, f in zip(self.down, feats, strict=True)], 1))
        return self.act(self.block(x) + self.skip(x))


class ReverseDecoder(nn.Module):
    """Student: from the code, one upsampling block per teacher scale (coarsest first); returns the
    outputs finest first, aligned with the teacher's taps."""

    def __init__(self, shapes: Sequence[tuple[int, int]], embed: int, adapters: Sequence[nn.Module] | None = None):
        super().__init__()
        self.blocks = nn.ModuleList()
        prev = embed
        for c, _ in reversed(shapes):
            self.blocks.append(nn.Sequential(nn.ConvTranspose2d(prev, c, 2, 2, bias=False), nn.BatchNorm2d(c),
                                             nn.ReLU(), _cbr(c, c), nn.Conv2d(c, c, 3, 1, 1)))
            prev = c
        adapters = list(adapters) if adapters is not None else [nn.Identity() for _ in shapes]
        if len(adapters) != len(shapes):
            raise KdforgeError(f"ReverseDecoder: {len(adapters)} adapters for {len(shapes)} scales")
        self.adapters = nn.ModuleList(reversed(adapters))     # stored coarsest first, like the blocks

    def forward(self, code: Tensor) -> list[Tensor]:
        outs, x = [], code
        for block, adapter in zip(self.blocks, self.adapters):
            x = adapter(block(x))
            outs.append(x)
        return outs[::-1]
