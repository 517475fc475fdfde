"""CIFAR VGG-8/11/13/16/19 with BatchNorm and a single linear head (RepDistiller `vgg.py`).

Five conv blocks separated by 2x2 max-pools; no 4096-wide FC layers, which is why vgg13
has 9.46M parameters rather than ImageNet VGG's 133M. As in the reference, the pool after
block3 is only applied for inputs of 64 pixels and more (Tiny-ImageNet), so a 32x32 image
reaches block4 at 4x4. Each block keeps the reference's numbered conv/BN layers and ends in
a named `act_out` ReLU, so `block{i}.act_out:input` is the pre-ReLU stage output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from kdforge.models._common import check_positive, init_conv_bn, init_linear_small, stage_taps
from kdforge.registry import MODELS

_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated; reference indices 0,1,2,3,... then the final ReLU `act_out`."""
    layers: list[tuple[str, nn.Module]] = []
    for width in widths:
        if layers:
            layers.append((str(len(layers)), nn.ReLU()))
        layers.append((str(len(layers)), nn.Conv2d(in_channels, width, kernel_size=3, padding=1)))
        layers.append((str(len(layers)), nn.BatchNorm2d(width)))
        in_channels = width
    layers.append(("act_out", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


class VGG(nn.Module):
    """block0 (stem) and block1..4 (stages); `fc` on the globally average-pooled block4."""

    reference_renames: tuple[tuple[str, str], ...] = (("classifier.", "fc."),)

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        self.block0 = _block(cfg[0], in_channels)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.block1 = _block(cfg[1], cfg[0][-1])
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.block2 = _block(cfg[2], cfg[1][-1])
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.block3 = _block(cfg[3], cfg[2][-1])
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.block4 = _block(cfg[4], cfg[3][-1])
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[4][-1], num_classes)
        init_conv_bn(self)
        init_linear_small(self)
        self.feature_taps = stage_taps(
            [f"block{i}" for i in range(1, 5)],
            [f"block{i}.act_out:input" for i in range(1, 5)],
            stem="block0",
        )
        self.stage_channels = [widths[-1] for widths in cfg[1:]]

    def forward(self, x: Tensor) -> Tensor:
        large = x.shape[-2] >= 64
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.block3(self.pool2(self.block2(x)))
        if large:
            x = self.pool3(x)
        x = self.pool4(self.block4(x))
        return self.fc(x.flatten(1))


def _factory(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
        return VGG(_CFG[name], num_classes=num_classes, in_channels=in_channels)

    build.__name__ = name
    build.__doc__ = f"CIFAR {name.upper()} with BatchNorm."
    return build


for _name in _CFG:
    MODELS.register(_name, _factory(_name), family="cifar", input_size=32)
