"""Detector kinds behind one interface, built from a recipe's `model` block.

Every detector here is an nn.Module with
    forward(images) -> raw, pre-NMS outputs (a dict; distillation terms read them),
    loss(out, boxes, labels, stats=None) -> dict of named loss tensors (stats may receive
        `num_pos`, the normaliser distillation terms share),
    decode(out) -> per image {"boxes" (xyxy pixels), "scores", "labels" (0..K-1)},
so `DetectionTask`, `kdforge eval` and every method treat them alike. Kinds: `fcos` (dense
one-stage, `fcos.py`), `two_stage` (RPN + RoIAlign head, `two_stage.py`), `query` (DETR-style
set prediction with Hungarian matching, `query.py`). Builders are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from kdforge.errors import ConfigError
from kdforge.models import create_model

__all__ = ["DETECTOR_KINDS", "build_detector"]

DETECTOR_KINDS: dict[str, str] = {
    "fcos": "kdforge.tasks.detection.fcos:build_fcos",
    "two_stage": "kdforge.tasks.detection.two_stage:build_two_stage",
    "query": "kdforge.tasks.detection.query:build_query",
}


def build_detector(kind: str, backbone: str, backbone_args: dict[str, Any], taps: list[str], num_classes: int,
                   width: int, size: int, **head: Any) -> nn.Module:
    """A detector of `kind` on a zoo backbone; `head` holds the kind's own options (e.g. tower, queries)."""
    if kind not in DETECTOR_KINDS:
        raise ConfigError(f"model.kind: unknown detector kind {kind!r}; choose from {', '.join(DETECTOR_KINDS)}")
    module, name = DETECTOR_KINDS[kind].split(":")
    builder = getattr(importlib.import_module(module), name)
    net = create_model(backbone, num_classes=num_classes, **backbone_args)
    try:
        return builder(net, taps, num_classes, width=width, size=size, **head)
    except TypeError as err:          # an option the kind does not take
        raise ConfigError(f"model: {kind} detector: {err}") from None
