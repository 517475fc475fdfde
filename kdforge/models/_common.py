"""Shared helpers for the model zoo: weight init, tap tables and reference checkpoints.

Every zoo model follows the same conventions so that methods never special-case an
architecture: `forward(x)` returns logits only, activations are non-inplace modules (hooks
see the real tensors), `feature_taps` names the stage outputs / pre-activations / pooled
vector as module paths, and `stage_channels` lists the channels of `feat1..featK`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kdforge.errors import KdforgeError


def init_conv_bn(model: nn.Module, conv_bias_zero: bool = True) -> None:
    """He-normal (fan_out) convs and unit/zero BN, as the reference CIFAR code does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None and conv_bias_zero:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_linear_small(model: nn.Module, std: float = 0.01) -> None:
    """N(0, std) weights and zero bias for every Linear (VGG / MobileNetV2 reference init)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


def stage_taps(
    stages: Sequence[str],
    preacts: Sequence[str | None],
    pool: str = "fc:input",
    stem: str | None = None,
) -> dict[str, str]:
    """Build a `feature_taps` dict: `stem`, `feat1..K`, `preact1..K` (where known), `pool`."""
    taps: dict[str, str] = {}
    if stem is not None:
        taps["stem"] = stem
    for i, path in enumerate(stages, start=1):
        taps[f"feat{i}"] = path
    for i, path in enumerate(preacts, start=1):
        if path is not None:
            taps[f"preact{i}"] = path
    taps["pool"] = pool
    return taps


def check_positive(**values: int) -> None:
    """Reject zero/negative sizes with one readable line instead of a deep shape error."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KdforgeError(f"{key} must be a positive integer, got {value!r}")


def adapt_reference_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Rename RepDistiller / mdistiller checkpoint keys to this model's parameter names.

    Zoo models keep the reference parameter names except where a kdforge convention
    differs (the classifier is always `fc`); `model.reference_renames` lists those
    `(old, new)` substitutions: a prefix, or an infix when `old` starts with ".". A
    `{"model": state_dict}` checkpoint and DataParallel `module.` prefixes are accepted.
    The result loads into `model` with `strict=True`.
    """
    inner = state_dict.get("model") if "model" in state_dict else None
    state = inner if isinstance(inner, Mapping) else state_dict
    renames = getattr(model, "reference_renames", ())
    out = {}
    for key, value in state.items():
        new = key.removeprefix("module.")
        for old, repl in renames:
            if old.startswith("."):
                new = new.replace(old, repl)
            elif new.startswith(old):
                new = repl + new[len(old):]
        out[new] = value
    return out
