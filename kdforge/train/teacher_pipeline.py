"""The pipelined online teacher: while the student trains on batch k, the teacher runs on batch k+1.

Why: online KD pays teacher forward + student step in sequence, though the teacher's outputs for
the next batch depend on nothing the student step changes. Batches are pure functions of (seed,
epoch, position), so batch k+1 can be built early and handed to a worker thread that runs the
frozen teacher (every tap the terms read) while the main thread runs the student's forward,
backward and optimizer step; the outputs arrive in `Batch.teacher_outputs`, exactly where the
teacher-output cache puts them, so the Distiller skips its own teacher forward. The result is
the same computation in another order: same losses, same weights (tests/test_teacher_pipeline.py).

CPU (`trainer.teacher_pipeline: on`): PyTorch's intra-op thread count is process-wide, so while
pipelined both sides run with `trainer.teacher_threads` threads each (default half of
`trainer.threads` or of the cores): 2 threads = 1 teacher + 1 student, running at the same time.
`auto` does not pipeline on CPU: on the 2-core machine the teacher's forward alone on one thread
takes about as long as the whole 2-thread reference step (results/step_time.md: floor 0.93x, the
split measured 1.20x; with the frozen teacher graph of `trainer.teacher_freeze` floor 0.78x,
measured 0.93x, the same as the sequential step with that graph), so the cache and the cheaper
frozen forward are the CPU answers to the teacher's cost. CUDA: the teacher runs on a
second stream of the same device (the worker waits for the batch's event on the main stream,
the main stream waits for the outputs' event), so its kernels can overlap the student's.

Where it is not exact it is not used: a method whose teacher depends on the student's current
state (`Distiller.teacher_outputs_ahead` False: EMA teachers, role changes, mutual learning)
keeps the sequential path, with one logged line (`teacher_pipeline: on` refuses it instead).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError

__all__ = ["TeacherPipeline", "pipeline_plan"]

MODES = ("auto", "on", "off")


def pipeline_plan(module: nn.Module, task: Any, mode: str | bool, device: torch.device, threads: int | None,
                  teacher_threads: int | None) -> tuple[bool, str | None, int | None]:
    """(pipelined?, a line to log or None, per-side CPU threads) for this run.

    `auto` pipelines online KD on CUDA wherever it is exact; on CPU it keeps the sequential step,
    because PyTorch's intra-op threads scale well enough that one teacher thread + one student
    thread measured slower than both threads in sequence (results/step_time.md: 1.20x on 2
    cores, floor 0.93x); `on` pipelines wherever exact (CPU included) and refuses where it is not; `off` never.
    """
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode    # YAML: on/off
    if mode not in MODES:
        raise ConfigError(f"trainer.teacher_pipeline must be one of {', '.join(MODES)}, got {mode!r}")
    if teacher_threads is not None and teacher_threads < 1:
        raise ConfigError(f"trainer.teacher_threads must be >= 1, got {teacher_threads}")
    if mode == "off" or (mode == "auto" and device.type == "cpu"):
        return False, None, None               # CPU: measured slower than the sequential step (docstring)
    if not hasattr(module, "teacher_outputs") or len(module.teachers) == 0:
        return False, None, None               # no online teacher: nothing to overlap
    if getattr(task, "cache", None) is not None:
        return False, None, None               # the teacher-output cache already serves the outputs
    if not module.teacher_outputs_ahead:
        why = (f"{type(module).__name__} runs its teacher itself, on the student's current state, so the "
               "teacher's outputs cannot be computed ahead")
        if mode == "on":
            raise ConfigError(f"trainer.teacher_pipeline=on: {why}; use auto or off")
        return False, f"teacher pipeline off: {why} (sequential teacher)", None
    if not module.needed_teachers():
        return False, None, None
    if device.type != "cpu":
        return True, None, None
    total = threads or torch.get_num_threads() or os.cpu_count() or 1
    return True, None, teacher_threads or max(1, total // 2)


class TeacherPipeline:
    """Runs `module.teacher_outputs` one batch ahead in a worker thread (see the module docstring)."""

    def __init__(self, module: nn.Module, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.module, self.device, self.autocast = module, device, autocast
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdforge-teacher")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _run(self, images: Tensor, ready: Any) -> tuple[dict[str, dict[str, Tensor]], Any]:
        if self._stream is None:
            with self.autocast():
                return self.module.teacher_outputs(images), None
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)            # the batch was built on the main stream
            with self.autocast():
                outs = self.module.teacher_outputs(images)
            done = torch.cuda.Event()
            done.record(self._stream)
        return outs, done

    def submit(self, images: Tensor) -> Future:
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return self._pool.submit(self._run, images, ready)

    def _collect(self, future: Future) -> dict[str, dict[str, Tensor]]:
        outs, done = future.result()
        if done is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            for tensors in outs.values():
                for t in tensors.values():
                    t.record_stream(main)          # made on the teacher's stream, used on the main one
        return outs

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The same batches, each with `teacher_outputs` filled; the teacher runs one batch ahead."""
        source = iter(batches)
        pending: deque[tuple[Any, Future]] = deque()
        try:
            for batch in source:
                pending.append((batch, self.submit(batch.images)))
                if len(pending) == 2:
                    break
            while pending:
                batch, future = pending.popleft()
                batch.teacher_outputs = self._collect(future)
                following = next(source, None)            # built now, its teacher starts after this one's
                if following is not None:
                    pending.append((following, self.submit(following.images)))
                yield batch                               # the student's step overlaps the next teacher
        finally:
            for _, future in pending:                     # stopped early: let the worker finish quietly
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
