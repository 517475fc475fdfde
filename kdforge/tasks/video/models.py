"""Clip classifiers: one small conv network per modality, a late-fusion multimodal network, and their cost.

* `ClipNet`: a modality's clip -> action logits. Visual clips (C, T, H, W) go through 3D convs
  (space-time), spectrograms (1, F, A) through 2D convs; three conv-BN-ReLU blocks (the last two
  strided), global average pooling and a linear head. Every network takes the batch's dict of
  modalities and reads its own, so teachers and students are called alike.
* `FusionNet`: one `ClipNet` trunk per modality, pooled features concatenated, one linear head:
  the multimodal model trained on the labels (the paper's "multimodal model trained with ground truth").
* `cost(model, inputs)`: forward FLOPs (torch's `FlopCounterMode`, 2 per multiply-add) and parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError

__all__ = ["ClipNet", "FusionNet", "clip_model", "cost"]


NORMS = ("batch", "group")


def _block(conv: type[nn.Module], norm: Any, c_in: int, c_out: int, stride: int | tuple) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out, 3, stride, 1, bias=False), norm(c_out), nn.ReLU(inplace=True))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 4), channels)


class ClipNet(nn.Module):
    """A one-modality clip classifier (3D convs for (C, T, H, W) clips, 2D convs for (C, F, A) spectrograms).

    `norm`: batch (default) or group (per-sample statistics: a run split over processes gives the
    one-process result without synchronised batch norm, which PyTorch has only on CUDA).
    """

    def __init__(self, modality: str, shape: Sequence[int], num_classes: int, width: int = 8,
                 norm: str = "batch") -> None:
        super().__init__()
        if len(shape) not in (3, 4):
            raise KdforgeError(f"ClipNet: modality {modality!r} has shape {tuple(shape)}; expected (C, T, H, W) "
                               "or (C, F, A)")
        if width < 1:
            raise ConfigError(f"model width must be >= 1, got {width}")
        if norm not in NORMS:
            raise ConfigError(f"model norm must be batch or group, got {norm!r}")
        self.modality, self.modalities = modality, (modality,)
        visual = len(shape) == 4
        conv, batch_norm = (nn.Conv3d, nn.BatchNorm3d) if visual else (nn.Conv2d, nn.BatchNorm2d)
        norm = batch_norm if norm == "batch" else _group_norm
        spatial = (1, 2, 2) if visual else 2
        self.trunk = nn.Sequential(_block(conv, norm, shape[0], width, 1),
                                   _block(conv, norm, width, 2 * width, spatial),
                                   _block(conv, norm, 2 * width, 4 * width, 2),
                                   nn.AdaptiveAvgPool3d(1) if visual else nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features_dim = 4 * width
        self.head = nn.Linear(self.features_dim, num_classes)

    def features(self, inputs: dict[str, Tensor]) -> Tensor:
        if self.modality not in inputs:
            raise KdforgeError(f"the {self.modality} model got a batch without {self.modality} "
                               f"(it holds {', '.join(inputs)})")
        return self.trunk(inputs[self.modality])

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.head(self.features(inputs))


class FusionNet(nn.Module):
    """Late fusion: a `ClipNet` trunk per modality, the pooled features concatenated, one linear head."""

    def __init__(self, shapes: dict[str, Sequence[int]], modalities: Sequence[str], num_classes: int,
                 width: int = 8, norm: str = "batch") -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(f"a fusion model needs at least two modalities, got {list(modalities)}")
        self.modalities = tuple(modalities)
        self.trunks = nn.ModuleDict({m: ClipNet(m, shapes[m], num_classes, width, norm) for m in modalities})
        for trunk in self.trunks.values():
            trunk.head = nn.Identity()          # only the trunk's features are used
        self.head = nn.Linear(sum(t.features_dim for t in self.trunks.values()), num_classes)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat([self.trunks[m].features(inputs) for m in self.modalities], 1))


def clip_model(name: str, shapes: dict[str, Sequence[int]], num_classes: int, width: int,
               fusion: Sequence[str] = ("rgb", "flow", "audio"), norm: str = "batch") -> nn.Module:
    """The model of one ensemble member: a modality's `ClipNet`, or `fusion` (a `FusionNet` over `fusion`)."""
    if name == "fusion":
        missing = [m for m in fusion if m not in shapes]
        if missing:
            raise ConfigError(f"fusion modalities {missing} are not in the data (modalities: {', '.join(shapes)})")
        return FusionNet(shapes, fusion, num_classes, width, norm)
    if name not in shapes:
        raise ConfigError(f"unknown model {name!r}: a modality ({', '.join(shapes)}) or fusion")
    return ClipNet(name, shapes[name], num_classes, width, norm)


@torch.no_grad()
def cost(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, float]:
    """Forward FLOPs per clip (torch.utils.flop_counter, 2 per multiply-add) and the parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    one = {k: v[:1] for k, v in inputs.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        model(one)
    model.train(was)
    return {"flops": float(counter.get_total_flops()), "params": float(sum(p.numel() for p in model.parameters()))}
