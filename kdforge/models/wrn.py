"""Wide ResNets wrn_16_1 / wrn_16_2 / wrn_40_1 / wrn_40_2 (pre-activation, depth 6n+4).

Layout and parameter names follow RepDistiller's `models/wrn.py`. Because the blocks are
pre-activation, a stage output is the raw residual sum (exactly RepDistiller's f1..f3);
its pre-ReLU "preact" is the next BatchNorm's output: `block2.layer.0.bn1`,
`block3.layer.0.bn1` and the final `bn1`, as in RepDistiller/mdistiller.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from kdforge.models._common import check_positive, init_conv_bn, stage_taps
from kdforge.registry import MODELS


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the projection shortcut sees the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        # Name kept from the reference so its checkpoints load unchanged.
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        identity = x if self.convShortcut is None else self.convShortcut(act)
        return identity + out


class NetworkBlock(nn.Module):
    """One stage: `n` wide blocks, the first one changing width/stride (kept as `.layer`)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: stem conv, 3 stages (16k, 32k, 64k), BN-ReLU, pool, fc."""

    reference_renames: tuple[tuple[str, str], ...] = ()

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)
        self.feature_taps = stage_taps(
            ["block1", "block2", "block3"],
            ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
            stem="conv1",
        )
        self.stage_channels = ch[1:]

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def _factory(depth: int, k: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> nn.Module:
        return WideResNet(depth, k, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)

    build.__name__ = f"wrn_{depth}_{k}"
    build.__doc__ = f"Wide ResNet, depth {depth}, widen factor {k}."
    return build


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    MODELS.register(f"wrn_{_depth}_{_k}", _factory(_depth, _k), family="cifar", input_size=32)
