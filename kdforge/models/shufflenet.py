"""CIFAR ShuffleNetV1 (g=3) and ShuffleNetV2 (1x) students of the KD tables (RepDistiller layout).

Both use a 1x1 stride-1 stem and three stride-2 stages, so 32x32 inputs end at 4x4.
Blocks end in a named `act_out` ReLU whose input is the reference "preact" feature:
for V1 the (concatenated or summed) pre-ReLU output; for V2 the unshuffled concat of the
passthrough half and the pre-ReLU branch, exactly as RepDistiller returns it. In V2 the
passthrough half is always non-negative (it comes from a ReLU), so applying the ReLU to the
whole concat before shuffling gives the same output as the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdforge.models._common import check_positive, stage_taps
from kdforge.registry import MODELS


class ChannelShuffle(nn.Module):
    """[N, g*c, H, W] -> interleave the g groups' channels."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an avg-pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, group_first: bool) -> None:
        super().__init__()
        mid = out_planes // 4
        g1 = groups if group_first else 1
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(g1)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.act_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.act_out(pre)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 with widths (240, 480, 960), blocks (4, 8, 4), groups 3."""

    reference_renames: tuple[tuple[str, str], ...] = (("linear.", "fc."),)

    def __init__(
        self, out_planes: tuple[int, ...] = (240, 480, 960), num_blocks: tuple[int, ...] = (4, 8, 4),
        groups: int = 3, num_classes: int = 100, in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        planes = 24
        for s, (width, n) in enumerate(zip(out_planes, num_blocks), start=1):
            blocks = []
            for i in range(n):
                # The first block concatenates its pooled input, so its branch makes the rest.
                branch = width - planes if i == 0 else width
                stride = 2 if i == 0 else 1
                blocks.append(ShuffleV1Block(planes, branch, stride, groups, group_first=s > 1 or i > 0))
                planes = width
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        self.feature_taps = stage_taps(
            [f"layer{s}" for s in range(1, len(num_blocks) + 1)],
            [f"layer{s}.{n - 1}.act_out:input" for s, n in enumerate(num_blocks, start=1)],
            stem="relu",
        )
        self.stage_channels = list(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class ShuffleV2Block(nn.Module):
    """Split channels in half; transform one half (1x1 - dw3x3 - 1x1), concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        c = self.half
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.act_out = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half:]
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2)))))
        pre = torch.cat([x1, self.bn3(self.conv3(out))], 1)
        return self.shuffle(self.act_out(pre))


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches see the whole input; their concat doubles the channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1x: widths (116, 232, 464), blocks (3, 7, 3) after each down unit, 1024 head."""

    reference_renames: tuple[tuple[str, str], ...] = (("linear.", "fc."),)

    def __init__(
        self, out_channels: tuple[int, ...] = (116, 232, 464, 1024), num_blocks: tuple[int, ...] = (3, 7, 3),
        num_classes: int = 100, in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        planes = 24
        for s, (width, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            blocks: list[nn.Module] = [ShuffleV2Down(planes, width)]
            blocks += [ShuffleV2Block(width) for _ in range(n)]
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            planes = width
        self.conv2 = nn.Conv2d(planes, out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels[3], num_classes)
        self.feature_taps = stage_taps(
            [f"layer{s}" for s in range(1, 4)],
            [f"layer{s}.{n}.act_out:input" for s, n in enumerate(num_blocks, start=1)],
            stem="relu",
        )
        self.stage_channels = list(out_channels[:3])

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.avgpool(x).flatten(1))


def shufflenetv1(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """RepDistiller's ShuffleV1 (groups 3); 0.95M parameters at 100 classes."""
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)


def shufflenetv2(num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """RepDistiller's ShuffleV2 (1x); 1.36M parameters at 100 classes."""
    return ShuffleNetV2(num_classes=num_classes, in_channels=in_channels)


MODELS.register("shufflenetv1", shufflenetv1, family="cifar", input_size=32)
MODELS.register("shufflenetv2", shufflenetv2, family="cifar", input_size=32)
