"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) of the CRD/DKD benchmark tables.

Same layout as RepDistiller's `models/resnet.py` (3x3 stem, three stages of 6n+2-depth basic
blocks, global average pool, linear head), so parameter counts match the published ones
and reference checkpoints load via `adapt_reference_state_dict` (keys are identical).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from kdforge.models._blocks import BasicBlock, make_layer, resnet_taps
from kdforge.models._common import check_positive, init_conv_bn
from kdforge.registry import MODELS


class CifarResNet(nn.Module):
    """3-stage basic-block ResNet; `filters` = [stem, stage1, stage2, stage3] channels."""

    reference_renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, depth: int, filters: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU()
        planes = filters[0]
        self.layer1, planes = make_layer(BasicBlock, planes, filters[1], n, stride=1)
        self.layer2, planes = make_layer(BasicBlock, planes, filters[2], n, stride=2)
        self.layer3, planes = make_layer(BasicBlock, planes, filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_conv_bn(self)
        self.feature_taps = resnet_taps([n, n, n])
        self.stage_channels = list(filters[1:])

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


_CONFIGS = {
    "resnet8": (8, [16, 16, 32, 64]),
    "resnet14": (14, [16, 16, 32, 64]),
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]),
    "resnet44": (44, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


def _factory(name: str, depth: int, filters: list[int]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, filters, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, stage widths {filters[1:]}."
    return build


for _name, (_depth, _filters) in _CONFIGS.items():
    MODELS.register(_name, _factory(_name, _depth, _filters), family="cifar", input_size=32)
