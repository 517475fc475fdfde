"""ResNet18/ResNet50 for 32x32 inputs (RepDistiller `resnetv2.py`, the "ResNet50 -> X" rows).

ImageNet widths (64..512, x4 for bottlenecks) with a 3x3 stride-1 stem and no max-pool, so
a 32x32 image reaches layer4 at 4x4.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.models._blocks import BasicBlock, Bottleneck, make_layer, resnet_taps
from kdforge.models._common import check_positive, init_conv_bn
from kdforge.registry import MODELS


class CifarResNetV2(nn.Module):
    """4-stage ResNet with a CIFAR stem."""

    # RepDistiller names the projection `shortcut` and the classifier `linear`.
    reference_renames: tuple[tuple[str, str], ...] = ((".shortcut.", ".downsample."), ("linear.", "fc."))

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        planes = 64
        self.layer1, planes = make_layer(block, planes, 64, layers[0], stride=1)
        self.layer2, planes = make_layer(block, planes, 128, layers[1], stride=2)
        self.layer3, planes = make_layer(block, planes, 256, layers[2], stride=2)
        self.layer4, planes = make_layer(block, planes, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_conv_bn(self)
        self.feature_taps = resnet_taps(layers)
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18_cifar(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-18 (basic blocks 2-2-2-2) with a CIFAR stem; 11.2M parameters."""
    return CifarResNetV2(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


def resnet50_cifar(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-50 (bottlenecks 3-4-6-3) with a CIFAR stem; 23.7M parameters."""
    return CifarResNetV2(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


MODELS.register("resnet18_cifar", resnet18_cifar, family="cifar", input_size=32)
MODELS.register("resnet50_cifar", resnet50_cifar, family="cifar", input_size=32)
