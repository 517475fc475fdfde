"""CIFAR MobileNetV2 (RepDistiller `mobilenetv2.py`); `mobilenetv2_x0_5` is the tables' "MobileNetV2".

The tables' student is `mobile_half`: expansion 6, width 0.5, stride-2 stem, a 1280-wide
1x1 head. Unlike torchvision, the first (t=1) block keeps its 1x1 expansion conv, which the
parameter count (0.81M at 100 classes) depends on. Blocks end in a linear BN (no ReLU), so
`preactK` is the same tensor as `featK`, matching the reference's feature lists.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.models._common import check_positive, init_conv_bn, init_linear_small, stage_taps
from kdforge.registry import MODELS

# t (expansion), c (channels), n (blocks), s (first stride)
_SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
_STAGE_ENDS = (1, 2, 4, 6)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shapes agree."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """Stem (stride 2), 7 inverted-residual groups `blocks.0..6`, 1x1 head `conv2`, pool, `fc`."""

    reference_renames: tuple[tuple[str, str], ...] = (("classifier.0.", "fc."),)

    def __init__(
        self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        widths = []
        for t, c, n, s in _SETTING:
            out_c = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out_c, s if i == 0 else 1, t or expansion))
                channels = out_c
            self.blocks.append(nn.Sequential(*layers))
            widths.append(out_c)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_conv_bn(self)
        init_linear_small(self)
        stages = [f"blocks.{i}" for i in _STAGE_ENDS]
        self.feature_taps = stage_taps(stages, stages, stem="conv1")
        self.stage_channels = [widths[i] for i in _STAGE_ENDS]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.avgpool(self.conv2(x)).flatten(1))


def mobilenetv2_x0_5(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """RepDistiller's `mobile_half`: MobileNetV2, expansion 6, width 0.5."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes, in_channels=in_channels)


MODELS.register("mobilenetv2_x0_5", mobilenetv2_x0_5, family="cifar", input_size=32)
