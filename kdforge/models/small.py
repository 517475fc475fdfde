"""Small models for tiny data (8x8 digits, 28x28 MNIST, tabular): `mlp` and `convnet`.

They let a full teacher -> student run finish in seconds on a CPU, and follow the same
conventions as the zoo (logits only, `feature_taps`, `stage_channels`, classifier `fc`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.models._common import check_positive, init_conv_bn, stage_taps
from kdforge.registry import MODELS


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU (-> Dropout)] per hidden size -> `fc`.

    The input width is fixed at construction (no lazy layers, so parameter counts and
    optimizers are known up front): `in_features`, else `in_channels * H * W` from
    `input_size` (an int for square images, or (H, W)).
    """

    reference_renames: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 3072,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_features=in_features)
        for width in hidden:
            check_positive(hidden=width)
        self.in_features = in_features
        self.flatten = nn.Flatten()
        layers = []
        width = in_features
        for h in hidden:
            items: list[tuple[str, nn.Module]] = [("linear", nn.Linear(width, h)), ("act_out", nn.ReLU())]
            if dropout > 0:
                items.append(("dropout", nn.Dropout(dropout)))
            layers.append(nn.Sequential(OrderedDict(items)))
            width = h
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        n = len(layers)
        self.feature_taps = stage_taps(
            [f"layers.{i}.act_out" for i in range(n)], [f"layers.{i}.act_out:input" for i in range(n)]
        )
        self.stage_channels = list(hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        if x.shape[1] != self.in_features:
            raise KdforgeError(
                f"mlp was built for {self.in_features} input features but got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); set in_features or input_size/in_channels to match"
            )
        return self.fc(self.layers(x))


NORMS = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(min(8, c), c), "none": lambda c: nn.Identity()}


class ConvNet(nn.Module):
    """`depth` stages of conv3x3-norm-ReLU (width doubling), 2x2 max-pool between stages,
    global average pool and `fc`. Works for any input size (ceil-mode pools, adaptive pool).

    `norm`: "batch" (BatchNorm, the default), "group" (GroupNorm with up to 8 groups: per-sample,
    so data-parallel ranks compute exactly what one process does, also on CPU where SyncBatchNorm
    does not exist) or "none"."""

    reference_renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, depth: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
        if norm not in NORMS:
            raise KdforgeError(f"convnet norm must be one of {', '.join(NORMS)}, got {norm!r}")
        channels = [width * 2 ** min(i, 2) for i in range(depth)]
        prev = in_channels
        for i, c in enumerate(channels, start=1):
            stage = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(prev, c, kernel_size=3, padding=1, bias=norm == "none")),
                ("bn" if norm == "batch" else "norm", NORMS[norm](c)),
                ("act_out", nn.ReLU()),
            ]))
            self.add_module(f"layer{i}", stage)
            if i < depth:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, ceil_mode=True))
            prev = c
        self.depth = depth
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        init_conv_bn(self)
        stages = [f"layer{i}" for i in range(1, depth + 1)]
        self.feature_taps = stage_taps(stages, [f"{s}.act_out:input" for s in stages])
        self.stage_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
            if i < self.depth:
                x = getattr(self, f"pool{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def mlp(
    num_classes: int = 100,
    in_channels: int = 3,
    input_size: int | Sequence[int] = 32,
    hidden: Sequence[int] = (256, 128),
    in_features: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """MLP over flattened inputs of `in_channels x input_size x input_size` (or `in_features`)."""
    if in_features is None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2:
            raise KdforgeError(f"mlp input_size must be an int or (H, W), got {input_size!r}")
        h, w = size
        check_positive(input_size=h, in_channels=in_channels)
        check_positive(input_size=w)
        in_features = in_channels * h * w
    return MLP(num_classes=num_classes, in_features=in_features, hidden=tuple(hidden), dropout=dropout)


def convnet(num_classes: int = 100, in_channels: int = 3, width: int = 32, depth: int = 3,
            norm: str = "batch") -> nn.Module:
    """Small ConvNet (`depth` 1-4 stages of widths width, 2*width, 4*width, 4*width; norm batch/group/none)."""
    if depth > 4:
        raise KdforgeError(f"convnet depth must be 1-4, got {depth}")
    return ConvNet(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth, norm=norm)


MODELS.register("mlp", mlp, family="small", input_size=None)
MODELS.register("convnet", convnet, family="small", input_size=None)
