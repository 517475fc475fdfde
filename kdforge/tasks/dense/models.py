"""Encoder-decoder networks for dense prediction: one shared encoder + decoder, one head per task.

`MultiTaskNet(tasks, arch, width)`: a 4-stage convolutional encoder (strides 1, 2, 4, 8; widths
w, 2w, 4w, 8w), a `unet` decoder (upsample, concatenate the skip, convolve; its full-resolution block
2w wide) or an `fpn` decoder (1x1 laterals, top-down sum, every level upsampled to
full resolution and summed, 2w channels), and per task a
light head (3x3 conv, ReLU, 1x1 conv) at full resolution. `forward(x)` returns {task: output}
(semseg: K logits, depth: 1 channel, normals: 3 channels, boundary: 1 logit). Teacher and student
differ by `width` (and may differ by `arch`).

Feature taps (`model.feature_taps`, read with `kdforge.models.taps.FeatureTap` or a Term): `enc1`..
`enc4` (encoder stages), `dec` (the decoder's full-resolution feature) and one per task, named
after the task (its head's output, i.e. the prediction), so a distillation term can read several
task outputs at once: `Term(loss, student=["semseg", "depth"], teacher=["semseg", "depth"])`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError

__all__ = ["ARCHS", "TASK_CHANNELS", "MultiTaskNet", "task_channels"]

ARCHS = ("unet", "fpn")
TASK_CHANNELS = {"depth": 1, "normals": 3, "boundary": 1}      # semseg: num_classes


def task_channels(tasks: list[str] | tuple[str, ...], num_classes: int) -> dict[str, int]:
    """Output channels of each task's head."""
    out = {}
    for t in tasks:
        if t == "semseg":
            out[t] = num_classes
        elif t in TASK_CHANNELS:
            out[t] = TASK_CHANNELS[t]
        else:
            raise KdforgeError(f"unknown dense task '{t}'; known: semseg, {', '.join(TASK_CHANNELS)}")
    return out


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(_block(chans[i], chans[i + 1], 1 if i == 0 else 2) for i in range(len(widths)))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Coarse to fine: upsample x2, concatenate the encoder's skip, two 3x3 convs. The last (full-resolution)
    block is twice as wide as the first encoder stage (2 widths[0] channels), so that the heads of several
    tasks do not all share the narrowest feature."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        outs = [2 * widths[0], *widths[1:]]
        self.blocks = nn.ModuleList(_block(outs[i + 1] + widths[i], outs[i]) for i in reversed(range(len(widths) - 1)))
        self.out_channels = outs[0]

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return x


class FPNDecoder(nn.Module):
    """1x1 laterals to `dim` channels, top-down sum, 3x3 smoothing; all levels upsampled and summed."""

    def __init__(self, widths: list[int], dim: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in widths)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                                                  nn.ReLU(inplace=True)) for _ in widths)
        self.out_channels = dim

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = self.laterals[-1](feats[-1])
        levels = [self.smooth[-1](x)]
        for i in reversed(range(len(feats) - 1)):
            x = self.laterals[i](feats[i]) + F.interpolate(x, size=feats[i].shape[-2:], mode="nearest")
            levels.append(self.smooth[i](x))
        size = feats[0].shape[-2:]
        return sum(F.interpolate(lv, size=size, mode="bilinear", align_corners=False) if lv.shape[-2:] != size else lv
                   for lv in levels)


class Head(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MultiTaskNet(nn.Module):
    """Shared encoder + decoder, one head per task; forward(x) -> {task: (N, C_t, H, W)}."""

    def __init__(self, tasks: dict[str, int], arch: str = "unet", width: int = 16, in_channels: int = 3,
                 depth: int = 4) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise KdforgeError(f"unknown dense architecture '{arch}'; known: {', '.join(ARCHS)}")
        if width < 1 or not 2 <= depth <= 5 or not tasks:
            raise KdforgeError(f"MultiTaskNet needs width >= 1, 2 <= depth <= 5 and a task, got {width}, {depth}, "
                               f"{list(tasks)}")
        widths = [width * 2 ** i for i in range(depth)]
        self.tasks = dict(tasks)
        self.arch, self.width = arch, width
        self.encoder = Encoder(in_channels, widths)
        self.decoder = UNetDecoder(widths) if arch == "unet" else FPNDecoder(widths, 2 * width)
        self.heads = nn.ModuleDict({t: Head(self.decoder.out_channels, c) for t, c in tasks.items()})
        self.feature_taps = {**{f"enc{i + 1}": f"encoder.stages.{i}" for i in range(depth)}, "dec": "decoder",
                             **{t: f"heads.{t}" for t in tasks}}
        self.stride = 2 ** (depth - 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise KdforgeError(f"MultiTaskNet: input {tuple(x.shape[-2:])} must be divisible by {self.stride}")
        y = self.decoder(self.encoder(x))
        return {t: head(y) for t, head in self.heads.items()}
