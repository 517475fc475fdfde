"""Shared pieces for task settings whose training does not fit the labelled-classification Trainer.

A task package (multi-label, novel class discovery, semi-supervised, ...) owns its data, metric
and loop; what every loop needs is here, generic and seeded:

* `load_task_config(schema, path_or_mapping, overrides)`: a YAML recipe (plus `a.b=value`
  overrides) validated into the task's own dataclass schema; an unknown key fails with one line
  naming the key, a close valid spelling and the file (same rules as `kdforge.config`).
* `IndexStream` / `epoch_batches`: seeded shuffled index batches (finite epochs or an endless
  stream, e.g. paired labelled/unlabelled streams in semi-supervised learning).
* `augment_images` / `prepare_images`: the batched, counter-based crop/flip of
  `kdforge.data.transforms` and normalisation, so a view is a pure function of (seed, epoch, index).
* `fit(...)`: the optimisation loop (lr schedule per step, grad clipping, tqdm progress bar,
  per-epoch loss means). It never sees a test split: evaluation is the caller's job, after training.
* `predict(...)`: batched no-grad inference in eval mode (restoring the previous mode).
* `mean_std(...)`: the {mean, std, runs} summary of the results schema.
* `run_config_file(path, overrides)`: run any recipe whose top-level `method:` names a registered
  method exposing `run_config(tree, source)` (`python -m kdforge.tasks.common recipe.yaml k=v`).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

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
from kdforge.train.optim import build_optimizer, lr_factor, set_lr

__all__ = [
    "IndexStream",
    "LoopConfig",
    "augment_images",
    "epoch_batches",
    "fit",
    "load_task_config",
    "mean_std",
    "predict",
    "prepare_images",
    "run_config_file",
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
        tree, where = dict(source), name
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


# ------------------------------------------------------------------------------------- sampling


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integer parts (e.g. run seed and a stream id)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> list[Tensor]:
    """One epoch of shuffled index batches; the last partial batch is dropped unless it is the only one."""
    if n < 1 or batch_size < 1:
        raise KdforgeError(f"epoch_batches: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class IndexStream:
    """An endless stream of shuffled index batches over `n` samples (reshuffled every pass).

    Batches never straddle two passes, so each pass visits every sample once; a pass shorter
    than a batch yields one smaller batch.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        if n < 1 or batch_size < 1:
            raise KdforgeError(f"IndexStream: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self._queue: list[Tensor] = []
        self.passes = 0

    def __iter__(self) -> IndexStream:
        return self

    def __next__(self) -> Tensor:
        if not self._queue:
            self._queue = epoch_batches(self.n, self.batch_size, self.generator, drop_last=True)
            self.passes += 1
        return self._queue.pop(0)


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


# ------------------------------------------------------------------------------------- loop


StepFn = Callable[[int, int], tuple[Tensor, dict[str, float]]]


def fit(
    params: Sequence[nn.Parameter],
    step_fn: StepFn,
    steps_per_epoch: int,
    loop: LoopConfig,
    desc: str = "train",
    on_epoch_start: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Minimise `step_fn(epoch, step) -> (loss, logs)` for `loop.epochs` x `steps_per_epoch` steps.

    The learning rate follows `loop.schedule` per global step (as the Trainer does); `after_step`
    runs after each optimizer update (prototype normalisation, EMA...). Returns the per-epoch
    means of the loss and of every logged value.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise KdforgeError(f"{desc}: nothing to train (no parameter requires grad)")
    if steps_per_epoch < 1:
        raise KdforgeError(f"{desc}: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    optimizer = build_optimizer(loop.optim, params)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history: list[dict[str, float]] = []
    total = loop.epochs * steps_per_epoch
    bar = tqdm(total=total, desc=desc, disable=not loop.progress, leave=False, dynamic_ncols=True)
    step = 0
    for epoch in range(loop.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        sums: dict[str, float] = {}
        for i in range(steps_per_epoch):
            set_lr(optimizer, base_lrs, lr_factor(loop.schedule, step, steps_per_epoch, loop.epochs))
            loss, logs = step_fn(epoch, i)
            if not torch.isfinite(loss):
                raise KdforgeError(f"{desc}: loss became {float(loss)} at epoch {epoch}, step {i}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if loop.grad_clip:
                nn.utils.clip_grad_norm_(params, loop.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        history.append({k: v / steps_per_epoch for k, v in sums.items()})
    bar.close()
    return history


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


# ------------------------------------------------------------------------------------- entry point


def run_config_file(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run a task recipe: its top-level `method:` names a registered method with `run_config`."""
    from kdforge.methods.catalog import list_methods
    from kdforge.registry import METHODS

    tree = load_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    name = tree.get("method")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: a task recipe needs a top-level 'method: <id>' string")
    list_methods()  # imports every method module, so all registrations have run
    runner = getattr(METHODS.get(name), "run_config", None)
    if runner is None:
        raise ConfigError(f"{path}: method '{name}' is not a task recipe method; use `kdforge train`")
    return runner(tree, str(path) + (" + overrides" if overrides else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kdforge.tasks.common RECIPE.yaml [a.b=value ...]`: run it and print the result."""
    import json

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m kdforge.tasks.common RECIPE.yaml [a.b=value ...]")
        return 0 if args else 2
    start = time.time()
    try:
        result = run_config_file(args[0], args[1:])
    except KdforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({**result, "wall_time_s": round(time.time() - start, 1)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
