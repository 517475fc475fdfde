"""Connectors: small trainable modules mapping a student feature onto the teacher's shape.

A connector is built from the probed (batch-including) shapes of one student tap and the
matching teacher tap, so recipes only name the kind ("conv1x1", "linear", "mlp").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.registry import CONNECTORS, build

Shape = tuple[int, ...]


class Identity(nn.Module):
    """No projection; shapes must already agree."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def identity(student_shape: Shape, teacher_shape: Shape) -> nn.Module:
    return Identity()


def conv1x1(student_shape: Shape, teacher_shape: Shape, bn: bool = True, relu: bool = False) -> nn.Module:
    """1x1 conv (+BN) on (N, C, H, W) maps; resizes spatially when the grids differ (FitNet hint)."""
    _require_dims(student_shape, teacher_shape, 4, "conv1x1")
    c_in, c_out = student_shape[1], teacher_shape[1]
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    if student_shape[2:] != teacher_shape[2:]:
        layers.append(nn.Upsample(size=tuple(teacher_shape[2:]), mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


def conv3x3(student_shape: Shape, teacher_shape: Shape, bn: bool = True) -> nn.Module:
    """3x3 conv (+BN) regressor, the FitNets original hint regressor for conv features."""
    _require_dims(student_shape, teacher_shape, 4, "conv3x3")
    layers: list[nn.Module] = [nn.Conv2d(student_shape[1], teacher_shape[1], 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(teacher_shape[1]))
    if student_shape[2:] != teacher_shape[2:]:
        layers.append(nn.Upsample(size=tuple(teacher_shape[2:]), mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


def linear(student_shape: Shape, teacher_shape: Shape, bias: bool = True) -> nn.Module:
    """Flatten then a linear map to the teacher's flattened size."""
    d_in, d_out = _numel(student_shape), _numel(teacher_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_out, bias=bias), _Reshape(teacher_shape[1:]))


def mlp(student_shape: Shape, teacher_shape: Shape, hidden: int = 256) -> nn.Module:
    """Flatten -> Linear -> ReLU -> Linear, for vector features of different widths."""
    d_in, d_out = _numel(student_shape), _numel(teacher_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out), _Reshape(teacher_shape[1:]))


class _Reshape(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _require_dims(s: Shape, t: Shape, dims: int, name: str) -> None:
    if len(s) != dims or len(t) != dims:
        raise KdforgeError(f"connector {name} needs {dims}-d features, got student {s} and teacher {t}")


def build_connector(name: str | None, student_shape: Shape, teacher_shape: Shape | None,
                    **kwargs: Any) -> nn.Module:
    """Build connector `name` (None = identity) for one student/teacher tap pair."""
    if name is None or name == "identity":
        return Identity()
    if teacher_shape is None:
        raise KdforgeError(f"connector '{name}' needs a teacher tap to take its output shape from")
    return build(CONNECTORS, name, student_shape=tuple(student_shape), teacher_shape=tuple(teacher_shape),
                 **kwargs)


CONNECTORS.register("identity", identity)
CONNECTORS.register("conv1x1", conv1x1)
CONNECTORS.register("conv3x3", conv3x3)
CONNECTORS.register("linear", linear)
CONNECTORS.register("mlp", mlp)
