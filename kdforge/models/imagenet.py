"""ImageNet-style networks of the ImageNet KD tables: ResNet18/34/50 and MobileNetV1.

The ResNets use torchvision's layout and parameter names, so torchvision (or mdistiller)
ImageNet checkpoints load with `load_state_dict(..., strict=True)`. MobileNetV1 follows
mdistiller's `imagenet/mobilenetv1.py` (the ResNet50 -> MobileNetV1 row), names included.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from kdforge.models._blocks import BasicBlock, Bottleneck, make_layer, resnet_taps
from kdforge.models._common import check_positive, init_conv_bn, stage_taps
from kdforge.registry import MODELS


class ImageNetResNet(nn.Module):
    """7x7/2 stem + 3x3/2 max-pool, four stages, global average pool, `fc`."""

    reference_renames: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
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
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + pointwise 1x1; the last ReLU is `act_out` (index-free name for taps)."""
    return nn.Sequential(OrderedDict([
        ("0", nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False)),
        ("1", nn.BatchNorm2d(inp)),
        ("2", nn.ReLU()),
        ("3", nn.Conv2d(inp, oup, 1, 1, 0, bias=False)),
        ("4", nn.BatchNorm2d(oup)),
        ("act_out", nn.ReLU()),
    ]))


class MobileNetV1(nn.Module):
    """Depthwise-separable MobileNetV1 (width 1.0); stages end at model.3/5/11/13."""

    reference_renames: tuple[tuple[str, str], ...] = ()
    _PLAN = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
             (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
             (512, 1024, 2), (1024, 1024, 1)]
    _STAGE_ENDS = (3, 5, 11, 13)

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        blocks = [_conv_bn(in_channels, 32, 2)] + [_conv_dw(i, o, s) for i, o, s in self._PLAN]
        self.model = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)
        self.feature_taps = stage_taps(
            [f"model.{i}" for i in self._STAGE_ENDS],
            [f"model.{i}.act_out:input" for i in self._STAGE_ENDS],
            stem="model.0",
        )
        self.stage_channels = [128, 256, 512, 1024]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.model(x)).flatten(1))


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 (11.69M parameters at 1000 classes)."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


def resnet34(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-34 (21.80M parameters at 1000 classes)."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50 (25.56M parameters at 1000 classes)."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


def mobilenetv1(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """MobileNetV1 as in mdistiller (4.23M parameters at 1000 classes)."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels)


for _fn in (resnet18, resnet34, resnet50, mobilenetv1):
    MODELS.register(_fn.__name__, _fn, family="imagenet", input_size=224)
