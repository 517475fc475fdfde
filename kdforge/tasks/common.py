"""Helpers every task package shares (recipes, views, inference); the training loop is the Trainer's.

* `load_task_config(schema, path_or_mapping, overrides)`: a YAML recipe (plus `a.b=value`
  overrides) validated into the task's own dataclass schema; an unknown key fails with one line
  naming the key, a close valid spelling and the file (same rules as `kdforge.config`).
* `LoopConfig`: the optimisation part of a task recipe; `kdforge.train.stages.loop_settings`
  turns it into the Trainer's settings.
* `augment_images` / `prepare_images`: the batched, counter-based crop/flip of
  `kdforge.data.transforms` and normalisation, so a view is a pure function of (seed, epoch, index).
* `predict(...)`: batched no-grad inference in eval mode (restoring the previous mode).
* `mean_std(...)`: the {mean, std, runs} summary of the results schema.

Index-addressable batches (`stream_batch`, `rank_share`) and `seeded_generator` live in
`kdforge.tasks.base` with the Task interface.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from kdforge.config import (
    OptimConfig,
    ScheduleConfig,
    apply_override,
    from_dict,
    load_yaml,
    parse_override,
)
from kdforge.data.transforms import normalize, random_crop_flip, to_normalized
from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = [
    "LoopConfig",
    "augment_images",
    "load_task_config",
    "mean_std",
    "predict",
    "prepare_images",
    "seeded_generator",
]

T = TypeVar("T")


# ------------------------------------------------------------------------------------- config


def load_task_config(
    schema: type[T],
    source: str | Path | dict[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
    name: str = "<config>",
) -> T:
    """Validate a YAML file or mapping (plus `a.b=value` overrides) into the dataclass `schema`."""
    if isinstance(source, dict):
        tree, where = copy.deepcopy(source), name     # overrides must not change the caller's mapping
    elif source is None:
        tree, where = {}, name
    else:
        tree, where = load_yaml(source), str(source)
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    if overrides:
        where += " + overrides"
    return from_dict(schema, tree, where)


@dataclass
class LoopConfig:
    """The optimisation part of a task recipe (reuses the run config's optimizer/schedule schema)."""

    epochs: int = 10
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine"))
    grad_clip: float | None = None
    progress: bool = False

    def check(self, where: str) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(
                f"{where}: epochs must be >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )
        if self.optim.lr <= 0:
            raise ConfigError(f"{where}: optim.lr must be > 0, got {self.optim.lr}")


# ------------------------------------------------------------------------------------- images


def prepare_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (or [0, 1] float) images -> normalised float, no augmentation (evaluation)."""
    return to_normalized(images, mean, std)


def augment_images(
    images: Tensor,
    index: Tensor,
    epoch: int,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    padding: int = 2,
    flip: bool = True,
) -> Tensor:
    """Seeded crop/flip of a uint8 batch (a pure function of seed, epoch, index), then normalised.

    Different views of the same samples use different `seed`s (e.g. run seed * 16 + view).
    """
    if padding == 0 and not flip:
        return prepare_images(images, mean, std)
    views, _ = random_crop_flip(images, index, epoch, seed, padding=padding, flip=flip)
    return normalize(views, mean, std)


# ------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: Tensor,
    batch_size: int = 512,
    prepare: Callable[[Tensor], Tensor] | None = None,
    output: Callable[[Any], Any] | None = None,
) -> Any:
    """Batched inference in eval mode; concatenates tensors (or dicts/tuples of tensors) along dim 0.

    Every output tensor must have the batch on dim 0; `output` may select or reorder it first.
    """
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size]
            out = model(prepare(x) if prepare is not None else x)
            outs.append(output(out) if output is not None else out)
    finally:
        model.train(was_training)
    return _concat(outs)


def _concat(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(outs)
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outs]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))
    raise KdforgeError(f"predict: cannot concatenate model outputs of type {type(first).__name__}")


# ------------------------------------------------------------------------------------- results


def mean_std(values: Sequence[float | None], digits: int = 3) -> dict[str, Any]:
    """{mean, std (sample, 0 for one run), runs} over the finite values, as the results schema wants."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    runs = [None if v is None else round(float(v), digits) for v in values]
    if not vals:
        return {"mean": None, "std": None, "runs": runs}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": round(statistics.mean(vals), digits), "std": round(std, digits), "runs": runs}
