"""Post-activation ResNet blocks shared by the CIFAR ResNets, ResNet18/50-CIFAR and ImageNet ResNets.

Parameter names follow torchvision (`conv1`, `bn1`, ..., `downsample.0/1`) so ImageNet
checkpoints load unchanged. Each block ends in its own `act_out` ReLU module: tapping
`<block>.act_out:input` yields the pre-ReLU sum that OFD/ReviewKD-style methods want.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.models._common import stage_taps


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (it is followed by BN)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection when the shape changes, else None (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs + identity/projection shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = shortcut(in_planes, planes, stride)
        self.act_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act_out(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision "v1.5"), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = shortcut(in_planes, out_planes, stride)
        self.act_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act_out(out + identity)


def make_layer(
    block: type[BasicBlock] | type[Bottleneck], in_planes: int, planes: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """A stage of `blocks` blocks (the first one strides); returns it and its out channels."""
    layers = []
    for i in range(blocks):
        layers.append(block(in_planes, planes, stride if i == 0 else 1))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers), in_planes


def resnet_taps(layer_sizes: list[int], stem: str = "relu") -> dict[str, str]:
    """feature_taps for a model with stages `layer1..K` of the given block counts."""
    stages = [f"layer{i}" for i in range(1, len(layer_sizes) + 1)]
    preacts = [f"layer{i}.{n - 1}.act_out:input" for i, n in enumerate(layer_sizes, start=1)]
    return stage_taps(stages, preacts, stem=stem)
