"""The Task interface: what a run trains. The one `Trainer` owns how it is trained.

A task provides its data (seeded, index-addressable batches: batch `k` of epoch `e` is a pure
function of the run seed, `e` and `k`, so a run resumes exactly at any step), a training module
whose `forward(batch)` returns the Distiller's `Step` (named, grouped losses), train-time counts,
evaluation of a split into named metrics, optional state of its own (banks, pseudo-labels) and
optionally a picture of its predictions. The Trainer does optimisation (optimizer, schedule,
loss groups, AMP, clipping, the non-finite guard), DDP, progress, `metrics.csv`, TensorBoard,
checkpoints, exact resume, the run directory and `result.json`, identically for every task.

The training module is a `Distiller` or anything with its training interface:
`trainable_parameters()`, `checkpoint_state()`, `load_checkpoint_state(state)`, `eval_model()`,
`on_epoch_start(epoch)`, `after_optimizer_step(step)` and `forward(batch) -> Step`.

To add a task: subclass `Task`, implement the abstract methods, and let a method's recipe
runner hand it to `kdforge.train.stages.run_stage` (see docs/extending.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.train.distributed import DistEnv

__all__ = ["SampledTask", "Task", "TaskModule", "rank_share", "seeded_generator", "stream_batch", "top1_counts",
           "top1_rate"]

Autocast = Callable[[], contextlib.AbstractContextManager]


class Task:
    """Base class of every task (labelled classification, multi-label, SSL, self-supervised ...).

    Attributes the Trainer reads:

    * `eval_split`: the split evaluated after every `trainer.eval_every` epochs and used to keep
      the `best` checkpoint, or None (no per-epoch evaluation, no `best`; never the test split
      unless the task says so, as classification without a validation split does);
    * `selection_metric` / `higher_is_better`: the metric of `eval_split` that picks `best`;
    * `ddp_note`: None when the task runs under torchrun, else one line saying why it cannot.
    """

    name = "task"
    eval_split: str | None = None
    selection_metric: str | None = None
    higher_is_better = True
    ddp_note: str | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        """Load data and build the training module on `device` (all trainable parts exist after this)."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------

    def batches(self, epoch: int, start_step: int, env: DistEnv) -> Iterator[Any]:
        """This rank's batches of `epoch` from step `start_step` on (index-addressable, seeded)."""
        for step in range(start_step, self.steps_per_epoch()):
            yield self.batch(epoch, step, env)

    def batch(self, epoch: int, step: int, env: DistEnv) -> Any:
        """Batch `step` of `epoch` for this rank; override this or `batches`."""
        raise NotImplementedError

    def forward(self, model: Callable[[Any], Step], batch: Any) -> Step:
        """The Step of one batch; `model` is the training module (DDP-wrapped in distributed runs)."""
        return model(batch)

    def train_counts(self, out: Step, batch: Any) -> dict[str, Tensor]:
        """Per-batch sums (summed over the epoch and all ranks) for `train_metrics`."""
        return {}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        """Epoch-level training metrics (metrics.csv columns) from the summed `train_counts`."""
        return {}

    def on_epoch_start(self, module: nn.Module, epoch: int) -> None:
        """Per-epoch task work before the first step (refresh pseudo-labels, ...)."""

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        """Per-epoch task work after the last step (move samples between sets, close a bank window ...)."""

    def should_stop(self, epoch: int, metrics: dict[str, float]) -> bool:
        """After `eval_split` was evaluated at the end of `epoch`: True ends training early (patience)."""
        return False

    def fresh_optimizer(self, epoch: int) -> bool:
        """True to rebuild the optimizer (fresh moments) at the start of `epoch` (e.g. WAD's rounds)."""
        return False

    # -- evaluation and results -----------------------------------------------------------------

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        """Named metrics of the trained module on `split` (every rank returns the same values)."""
        raise NotImplementedError

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        """The final metrics for result.json (by default every metric of the test split, `test_` prefixed)."""
        return {f"test_{k}": v for k, v in self.evaluate(module, "test", env, autocast).items()}

    def describe(self) -> dict[str, Any]:
        """What was trained (models, task), for result.json."""
        return {"task": self.name}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Write a PNG of predictions (against the ground truth) to `path`; False when the task has none."""
        return False

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Task state that training changes (tensors, numbers, lists, dicts), saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise KdforgeError(f"task '{self.name}' keeps no state but the checkpoint holds some")


class SampledTask(Task):
    """A task whose training batches are seeded draws of positions into `self.train`.

    Batch k = epoch * steps_per_epoch + step is `stream_batch(len(self.train), batch_size, k, seed,
    stream)` (shuffled passes, the remainder dropped), split over DDP ranks by `rank_share`. A
    subclass sets `stream` (its seed stream's salt, fixed so earlier runs replay exactly) and the
    attributes `train`, `batch_size` and `seed`, and builds its batch from `batch_index(...)`.
    """

    stream = 17

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def batch_index(self, epoch: int, step: int, env: DistEnv) -> Tensor:
        """This process's positions into `self.train` for training batch (epoch, step)."""
        k = epoch * self.steps_per_epoch() + step
        return rank_share(stream_batch(len(self.train), self.batch_size, k, self.seed, self.stream), env)


class TaskModule(nn.Module):
    """Training module of a task that needs more than a `Distiller`: the Trainer's interface, with defaults.

    Frozen parts (teachers, snapshots) live under attribute names in `frozen` (default
    `teachers`): they are never trained, never written into checkpoints and stay in eval mode
    (their batch-norm statistics stay fixed) whatever mode the module is put in. Subclasses
    implement `forward(batch) -> Step` and may override the hooks.
    """

    frozen: tuple[str, ...] = ("teachers",)

    def train(self, mode: bool = True) -> TaskModule:
        super().train(mode)
        for name in self.frozen:
            part = getattr(self, name, None)
            if isinstance(part, nn.Module):
                part.eval()
        return self

    def _is_frozen(self, key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in self.frozen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.named_parameters() if p.requires_grad and not self._is_frozen(k)]

    def checkpoint_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not self._is_frozen(k)}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._is_frozen(k)]
        if missing or unexpected:
            raise KdforgeError("checkpoint does not match this run's models: "
                               f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def eval_model(self) -> nn.Module:
        return self

    def on_epoch_start(self, epoch: int) -> None:
        """Per-epoch hook of the module (the Trainer calls it before the task's)."""

    def after_optimizer_step(self, step: int) -> None:
        """After every optimizer step (EMA teachers, prototype normalisation ...)."""


# ------------------------------------------------------------------------------------- helpers


def top1_counts(logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    """A task's `train_counts` for a top-1 training metric: correct predictions and samples (device ops only)."""
    return {"correct": (logits.detach().argmax(1) == target).sum(), "samples": target.new_full((), target.shape[0])}


def top1_rate(counts: dict[str, float], name: str = "train_top1") -> dict[str, float]:
    """The `train_metrics` of `top1_counts`: accuracy in % over the epoch's samples."""
    return {name: 100.0 * counts.get("correct", 0.0) / max(1.0, counts.get("samples", 0.0))}


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integer parts (e.g. run seed, stream id, epoch)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


_PASS_CACHE: dict[tuple[int, ...], Tensor] = {}


def stream_batch(n: int, batch_size: int, k: int, *seed: int) -> Tensor:
    """Batch `k` of an endless stream of shuffled passes over `n` samples: a pure function.

    Pass p is `randperm(n)` seeded by (`seed`..., p); it yields n // batch_size full batches
    (the remainder is dropped, as a `drop_last` loader does), or one batch of all n when
    n < batch_size. Epoch-based tasks use k = epoch * steps + step; two-stream settings (labelled
    + unlabelled) give each stream its own seed parts.
    """
    if n < 1 or batch_size < 1 or k < 0:
        raise KdforgeError(f"stream_batch: need n >= 1, batch_size >= 1 and k >= 0, got {n}, {batch_size}, {k}")
    per_pass = max(1, n // batch_size)
    p, j = divmod(k, per_pass)
    key = (n, *seed, p)
    perm = _PASS_CACHE.get(key)
    if perm is None:
        if len(_PASS_CACHE) > 64:
            _PASS_CACHE.clear()
        perm = _PASS_CACHE[key] = torch.randperm(n, generator=seeded_generator(*seed, p))
    return perm[j * batch_size:(j + 1) * batch_size]


def rank_share(index: Tensor, env: DistEnv) -> Tensor:
    """This rank's contiguous share of a global batch of positions (all of it in one process)."""
    if not env.enabled:
        return index
    if len(index) % env.world:
        raise KdforgeError(f"batch of {len(index)} does not split over {env.world} processes; "
                           "choose a batch size divisible by the process count")
    size = len(index) // env.world
    return index[env.rank * size:(env.rank + 1) * size]
