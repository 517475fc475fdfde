"""The one training loop: every task (classification, multi-label, SSL, ...) runs through it.

The trainer owns *how*: optimizer and per-step schedule, loss groups (DOT), AMP, gradient
clipping, a non-finite guard, DDP, progress bars, `metrics.csv`, TensorBoard, checkpoints,
exact resume, the run directory and `result.json`. The task (`kdforge.tasks.base.Task`) owns
*what*: data, batches, the training module, metrics and pictures.

Exactness: a task's batch k of epoch e is a pure function of (seed, e, k); checkpoints hold the
weights, optimizer, RNG states, task state and the partial sums of the interrupted epoch, so a
run stopped at any step (trainer.stop_after_steps, Ctrl-C, SIGTERM) and resumed reaches the
same weights and the same metrics rows as an uninterrupted run. A kill -9 loses at most the
steps since the last epoch-end checkpoint, and resuming from it is just as exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kdforge.config import RunConfig, dump_config
from kdforge.distill.distiller import Step
from kdforge.distill.frozen_teacher import freeze_plan
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Task
from kdforge.tasks.classification import epoch_order, epoch_slices  # noqa: F401  (re-exported)
from kdforge.train.build import RunData
from kdforge.train.checkpoint import (
    atomic_write_text,
    ensure_writable_dir,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from kdforge.train.distributed import DistEnv, device_for, dist_env_from_environment
from kdforge.train.log import MetricsLog, TensorBoard, json_safe, progress
from kdforge.train.optim import build_optimizer, lr_factor, param_groups, set_lr, wants_loss_groups
from kdforge.train.teacher_pipeline import TeacherPipeline, pipeline_plan


class Interrupted(KdforgeError):
    """Ctrl-C or SIGTERM: the run saved a resumable checkpoint; exit with the conventional code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(KdforgeError):
    """A loss became NaN/inf: training stops before a non-finite step reaches a checkpoint."""


@contextlib.contextmanager
def _threads(count: int | None) -> Any:
    """CPU intra-op threads for the duration (each side of the teacher pipeline), restored after."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log_line(line: str) -> None:
    """A line printed between progress-bar updates (the bar is redrawn below it)."""
    tqdm.write(line)


def teacher_dtype(name: str) -> torch.dtype | None:
    """`trainer.teacher_precision` -> the teacher forward's autocast dtype (None: float32)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise KdforgeError(f"trainer.teacher_precision must be fp32 or bf16, got {name!r}")
    return dtypes[name]


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """A config's device string (`auto`, `cpu`, `cuda`, `cuda:N`) as a device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KdforgeError(f"{key}={name} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdforgeError(f"{key}={name} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KdforgeError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast dtype, or None. `auto` uses AMP only on CUDA (bf16 where supported)."""
    if mode == "none":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


class _StopRequests:
    """SIGINT/SIGTERM while training: remembered and acted on between steps (a consistent checkpoint).

    A second Ctrl-C while the first is pending interrupts at once (KeyboardInterrupt).
    """

    CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.CODES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Train a task into `run_dir`; `fit()` returns the final result dict (also `result.json`).

    `Trainer(cfg, run_dir)` trains the labelled-classification task of a `RunConfig`; any other
    task is passed as `task=` with a `cfg` whose `optim`, `schedule` and `trainer` sections (and
    `data.batch_size` for classification) set the optimisation. `config_text` replaces the
    resolved RunConfig written to `config.yaml` (task recipes write their own recipe).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                 data: RunData | None = None, quiet: bool = False, env: DistEnv | None = None,
                 task: Task | None = None, config_text: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.config_text = config_text
        self.env = env or dist_env_from_environment()
        self.quiet = quiet or not self.env.is_main
        if not resume and (self.ckpt_dir / "last.json").is_file():
            raise KdforgeError(f"{self.run_dir} already holds a run; pass --resume to continue it or "
                               "choose another --out")
        if self.env.is_main:      # before any data is loaded: an unwritable --out fails at once
            ensure_writable_dir(self.run_dir, "run directory")
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self._full_threads = torch.get_num_threads()
        self.device = resolve_device(device_for(self.env, cfg.trainer.device))
        if task is None:
            from kdforge.tasks.classification import ClassificationTask

            task = ClassificationTask(cfg, data)
        self.task = task
        if self.env.enabled and task.ddp_note:
            raise KdforgeError(f"{task.name} cannot run distributed: {task.ddp_note}")
        torch.manual_seed(cfg.trainer.seed)
        self.module = task.build(self.device, self.env)
        self.distiller = self.module            # the name classification code and benchmarks know
        if hasattr(self.module, "set_teacher_execution"):
            dtype = teacher_dtype(cfg.trainer.teacher_precision)
            freeze = freeze_plan(cfg.trainer.teacher_freeze, self.device, dtype, self.module)
            self.module.set_teacher_execution(dtype, cfg.trainer.teacher_channels_last, freeze=freeze,
                                              log=None if self.quiet else _log_line)
        self._place_teachers()
        self.steps_per_epoch = task.steps_per_epoch()
        self._build_optimizer()
        if self.grouped and cfg.trainer.grad_clip:
            raise KdforgeError("trainer.grad_clip is not supported with optim.name=dot")
        self.amp = amp_dtype(cfg.trainer.amp, self.device)
        use_scaler = self.amp == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self.forward_fn: Callable[[Any], Step] = self._wrap_distributed()
        pipelined, line, self._pipeline_threads = pipeline_plan(
            self.module, task, cfg.trainer.teacher_pipeline, self.device, cfg.trainer.threads,
            cfg.trainer.teacher_threads)
        if line and not self.quiet:
            print(line, flush=True)
        self.pipeline = TeacherPipeline(self.module, self.device, self._autocast) if pipelined else None
        if cfg.trainer.compile:
            self.forward_fn = torch.compile(self.forward_fn)
        self.epoch = 0
        self.step = 0          # global optimizer steps done
        self.step_in_epoch = 0
        self.best = -math.inf
        self.stopped_early = False      # the task ended training after an evaluation (patience)
        self._partial: dict[str, dict[str, float]] | None = None   # sums of an interrupted epoch
        self._bad_step = torch.tensor(-1, device=self.device)       # first step with a non-finite loss
        self._stops = _StopRequests()
        self.metrics = MetricsLog(self.run_dir / "metrics.csv")
        if resume:
            self._resume()

    # -- pieces the classification task, methods and benchmarks reach --------------------------------

    @property
    def data(self) -> Any:
        return getattr(self.task, "data", None)

    def _prepare(self, images_uint8: Tensor) -> Tensor:
        return self.task.prepare(images_uint8)

    def make_batch(self, *args: Any, **kwargs: Any) -> Any:
        return self.task.make_batch(*args, **kwargs)

    def _place_teachers(self) -> None:
        """`teacher.device` / `teachers.<id>.device`: run that frozen teacher on a device of its own."""
        for tid, tcfg in self.cfg.all_teachers().items():
            if tcfg.device is None:
                continue
            key = "teacher.device" if tid == "teacher" else f"teachers.{tid}.device"
            if self.env.enabled:
                raise KdforgeError(f"{key} is not supported in distributed runs (each process owns one device)")
            if not hasattr(self.module, "place_teacher"):
                raise KdforgeError(f"{key}: the {self.task.name} task's module runs its teachers itself")
            self.module.place_teacher(tid, resolve_device(tcfg.device, key))

    def _build_optimizer(self) -> None:
        names = {id(p): n for n, p in self.module.named_parameters()}
        named = [(names.get(id(p), "?"), p) for p in self.module.trainable_parameters()]
        self.optimizer = build_optimizer(self.cfg.optim, param_groups(self.cfg.optim, named))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.grouped = wants_loss_groups(self.optimizer)

    def _wrap_distributed(self) -> Callable[[Any], Step]:
        """DistributedDataParallel over the training module (teachers have no trainable parameters)."""
        if not self.env.enabled:
            return self.module
        if self.grouped:
            raise KdforgeError("optim.name=dot is not supported in distributed runs yet (its two gradients "
                               "bypass DDP's all-reduce); run it in one process")
        if self.cfg.trainer.sync_bn:
            if self.device.type != "cuda":
                raise KdforgeError("trainer.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernels); on CPU "
                                   "drop it, or use a per-sample normalisation (e.g. convnet norm: group)")
            self.module.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module.student)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.module, device_ids=None)    # buffers follow rank 0 (the default)

    # -- checkpoints ---------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                 "best": self.best if math.isfinite(self.best) else None,
                 "steps_per_epoch": self.steps_per_epoch, "stopped_early": self.stopped_early}
        if self._partial is not None:
            state["epoch_partial"] = self._partial
        return state

    def save(self, tag: str = "last") -> None:
        if not self.env.is_main:
            return
        save_checkpoint(self.ckpt_dir, tag, self.module.checkpoint_state(), self._trainer_state(),
                        self.optimizer, self.scaler.state_dict() if self.scaler else None,
                        task_state=self.task.state_dict())

    def _resume(self) -> None:
        weights, state, optim_state, task_state = load_checkpoint(self.ckpt_dir, "last", with_task=True)
        self.module.load_checkpoint_state(weights)
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise KdforgeError(f"cannot resume {self.run_dir}: the data/batch size changed "
                               f"({state.get('steps_per_epoch')} -> {self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.task.load_state_dict(task_state)
        if self.task.fresh_optimizer(self.epoch) and self.step_in_epoch == 0:
            optim_state = None        # the epoch starts with a fresh optimizer anyway
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)
        self.best = state["best"] if state.get("best") is not None else -math.inf
        self.stopped_early = bool(state.get("stopped_early", False))
        self._partial = state.get("epoch_partial")
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
        self.metrics.load(upto_epoch=self.epoch - 1)   # rows of the epochs the checkpoint completed

    # -- loop ----------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self, batch: Any) -> tuple[Step, Tensor]:
        """One optimizer step; returns the step's outputs and the (detached) total loss."""
        set_lr(self.optimizer, self.base_lrs,
               lr_factor(self.cfg.schedule, self.step, self.steps_per_epoch, self.cfg.trainer.epochs))
        with self._autocast():
            out = self.task.forward(self.forward_fn, batch)
        if self.grouped:
            groups = out.by_group()
            zero = out.total().detach() * 0.0
            self.optimizer.step_losses(groups.get("task", zero), groups.get("distill", zero),
                                       grad_scaler=self.scaler)
            total = sum(groups.values(), zero)
        else:
            total = out.total()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                total.backward()
            if self.cfg.trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.module.trainable_parameters(), self.cfg.trainer.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.module.after_optimizer_step(self.step)
        return out, total.detach()

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.config_text or dump_config(cfg))
        tb = TensorBoard(self.run_dir / "tensorboard", cfg.trainer.tensorboard and self.env.is_main)
        start = time.time()
        self._cpu_start = time.process_time()
        try:
            with self._stops:
                while self.epoch < cfg.trainer.epochs and not self.stopped_early:
                    if self._train_epoch(tb) == "stopped":
                        return {"stopped_at_step": self.step}
        except KeyboardInterrupt:     # a second Ctrl-C: the last epoch-end checkpoint stays the resume point
            raise Interrupted(f"interrupted at step {self.step}; continue from the last checkpoint with "
                              f"--resume {self.run_dir}", 130) from None
        finally:
            tb.close()
            if self.pipeline is not None:      # join the teacher worker before evaluation and process exit
                self.pipeline.close()
        return self._finish(time.time() - start)

    def _stop_requested(self) -> int | None:
        """The pending signal, agreed by all ranks (they must stop at the same step)."""
        flag = self._stops.signum or 0
        if self.env.enabled:
            flag = int(self.env.all_reduce_max(torch.tensor(flag, device=self.device)))
        return flag or None

    def _check_finite(self, sums: dict[str, Tensor]) -> None:
        if int(self._bad_step) < 0:
            return
        bad = [k for k, v in sums.items() if k != "loss" and not bool(torch.isfinite(v))] or ["loss"]
        raise NonFiniteLoss(f"loss term '{bad[0]}' became non-finite at step {int(self._bad_step) + 1} "
                            f"(epoch {self.epoch + 1}); training stopped before saving it (the last checkpoint "
                            f"is the previous epoch's): lower optim.lr, set trainer.grad_clip or check the data")

    def _train_epoch(self, tb: TensorBoard) -> str:
        cfg, epoch, task = self.cfg, self.epoch, self.task
        if self.step_in_epoch == 0 and epoch > 0 and task.fresh_optimizer(epoch):
            self._build_optimizer()
        self.module.train()
        self.module.on_epoch_start(epoch)
        task.on_epoch_start(self.module, epoch)
        sums: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        elapsed = 0.0
        if self._partial is not None:      # resumed mid-epoch: continue the interrupted epoch's sums
            sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                    for k, v in self._partial["sums"].items()}
            counts = {k: torch.tensor(v, dtype=torch.float64, device=self.device)
                      for k, v in self._partial["counts"].items()}
            elapsed = self._partial.get("time_s", 0.0)
            self._partial = None
        bar = progress(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.trainer.epochs}",
                       cfg.trainer.progress and not self.quiet, initial=self.step_in_epoch)
        t0 = time.time()
        batches = task.batches(epoch, self.step_in_epoch, self.env)
        if self.pipeline is not None:
            batches = self.pipeline.batches(batches)
        with _threads(self._pipeline_threads):
            return self._run_batches(tb, batches, sums, counts, elapsed, t0, bar)

    def _run_batches(self, tb: TensorBoard, batches: Any, sums: dict[str, Tensor], counts: dict[str, Tensor],
                     elapsed: float, t0: float, bar: Any) -> str:
        cfg, task = self.cfg, self.task
        for batch in batches:
            out, total = self.train_step(batch)
            self._bad_step = torch.where((self._bad_step < 0) & ~torch.isfinite(total),
                                         self._bad_step.new_full((), self.step), self._bad_step)
            for name, value in {"loss": total, **out.losses}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            for name, value in task.train_counts(out, batch).items():
                counts[name] = counts.get(name, 0.0) + value.double()
            self.step += 1
            self.step_in_epoch += 1
            if bar.n % 25 == 0 or self.step_in_epoch == self.steps_per_epoch:   # syncs: keep them rare
                self._check_finite(sums)
                shown = task.train_metrics({k: float(v) for k, v in counts.items()})
                bar.set_postfix(loss=f"{float(total):.3f}",
                                **{k.removeprefix("train_"): f"{v:.1f}" for k, v in shown.items()
                                   if isinstance(v, float)})
            bar.update(1)
            signum = self._stop_requested()
            if signum or (cfg.trainer.stop_after_steps is not None and self.step >= cfg.trainer.stop_after_steps):
                bar.close()
                self._check_finite(sums)
                if self.step_in_epoch < self.steps_per_epoch:
                    self._partial = {"sums": {k: float(v) for k, v in sums.items()},
                                     "counts": {k: float(v) for k, v in counts.items()},
                                     "time_s": elapsed + time.time() - t0}
                    self.save("last")
                    self._partial = None
                else:     # the epoch's last step: close the epoch normally, then stop
                    self._end_epoch(tb, sums, counts, elapsed + time.time() - t0)
                if signum:
                    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                    raise Interrupted(f"{name}: saved step {self.step} to {self.ckpt_dir}; continue with "
                                      f"kdforge train --resume {self.run_dir}", _StopRequests.CODES[signum])
                return "stopped"
        bar.close()
        self._check_finite(sums)
        self._end_epoch(tb, sums, counts, elapsed + time.time() - t0)
        return "ok"

    def _end_epoch(self, tb: TensorBoard, sums: dict[str, Tensor], counts: dict[str, Tensor],
                   epoch_time: float) -> None:
        with _threads(self._full_threads if self._pipeline_threads else None):    # evaluation: every thread
            self._close_epoch(tb, sums, counts, epoch_time)

    def _close_epoch(self, tb: TensorBoard, sums: dict[str, Tensor], counts: dict[str, Tensor],
                     epoch_time: float) -> None:
        cfg, epoch, task = self.cfg, self.epoch, self.task
        steps_done = max(1, self.steps_per_epoch) * self.env.world
        names, cnames = list(sums), list(counts)
        packed = [torch.as_tensor(sums[k], device=self.device).double() for k in names]
        packed += [torch.as_tensor(counts[k], device=self.device).double() for k in cnames]
        totals = self.env.all_reduce_sum(torch.stack(packed)) if packed else torch.zeros(0)
        row: dict[str, Any] = {"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update(task.train_metrics({k: float(v) for k, v in zip(cnames, totals[len(names):])}))
        row["epoch_time_s"] = round(epoch_time, 3)
        row.update({f"train_{k}": float(v) / steps_done for k, v in zip(names, totals[:len(names)])})
        task.on_epoch_end(self.module, epoch)
        self.epoch += 1
        self.step_in_epoch = 0
        split = task.eval_split
        if split is not None and ((epoch + 1) % cfg.trainer.eval_every == 0 or self.epoch == cfg.trainer.epochs):
            ev = task.evaluate(self.module, split, self.env, self._autocast if self.amp is not None else None)
            row.update({f"{split}_{k}": v for k, v in ev.items()})
            metric = task.selection_metric
            if metric is not None and metric in ev:
                score = ev[metric] if task.higher_is_better else -ev[metric]
                if score > self.best:
                    self.best = score
                    if self.env.is_main:
                        save_checkpoint(self.ckpt_dir, "best", self.module.checkpoint_state(), self._trainer_state())
            self.stopped_early = bool(task.should_stop(epoch, ev))
            if not self.quiet:
                shown = "  ".join(f"{k} {v:.2f}" for k, v in list(ev.items())[:3] if isinstance(v, float))
                print(f"epoch {epoch + 1}/{cfg.trainer.epochs}  loss {row['train_loss']:.3f}  {split} {shown}",
                      flush=True)
        if self.env.is_main:
            self.metrics.append(row)
        tb.scalars({k: float(v) for k, v in row.items() if k not in ("epoch", "step")}, self.step)
        self.save("last")

    def _finish(self, wall: float) -> dict[str, Any]:
        task = self.task
        result = task.result(self.module, self.env, self._autocast if self.amp is not None else None)
        if task.eval_split is not None and task.selection_metric is not None:
            best = self.best if task.higher_is_better else -self.best
            result[f"best_{task.eval_split}_{task.selection_metric}"] = best if math.isfinite(best) else None
        if self.stopped_early:
            result["stopped_early_at_epoch"] = self.epoch
        result.update({"epochs": self.cfg.trainer.epochs, "steps": self.step, "wall_time_s": round(wall, 2),
                       "cpu_time_s": round(time.process_time() - self._cpu_start, 2),
                       "device": str(self.device), **task.describe()})
        if self.env.is_main:
            if task.draw(self.module, self.run_dir / "predictions.png"):
                result["picture"] = "predictions.png"
            atomic_write_text(self.run_dir / "result.json", json.dumps(json_safe(result), indent=2))
        return result
