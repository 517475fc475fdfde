"""A frozen teacher's forward as an optimised TorchScript graph: `trainer.teacher_freeze`.

Why: online KD pays a teacher forward every step and the teacher never changes, so its forward
can be compiled once for inference: `torch.jit.freeze` inlines the weights and folds batch norm
into the convolutions, and `torch.jit.optimize_for_inference` prepacks the convolution weights
for oneDNN and fuses conv + ReLU. Same float32 arithmetic in another order: outputs agree with
the eager forward to ~1e-5 (results/teacher_precision.md has the speed and the demo teacher's
top-1 in both modes).

The graph returns the teacher's outputs and every tapped feature the terms read (the taps' hooks
run while tracing, so their tensors become graph outputs). One graph per input shape (the last,
smaller batch of an epoch gets its own), each checked against the eager forward on the batch it
was traced on, and on the next few batches too when the trace took a Python branch on a tensor
(a branch on the data would be baked in). Never silently wrong: a teacher that does not trace
(e.g. non-tensor outputs) or whose graph disagrees keeps the eager forward, with one logged
line; a graph is dropped when the teacher's weights change in place or move (parameter versions
and storage pointers are checked on every call), and a teacher whose weights keep changing goes
back to eager. Writes through `.data` bypass version counters: code that
edits a teacher that way after training started must call `Distiller.set_teacher_execution` again.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.models.taps import FeatureTap

__all__ = ["FrozenTeacher", "MAX_GRAPHS", "TOLERANCE", "cache_freeze", "freeze_plan"]

FREEZE_MODES = ("auto", "on", "off")   # trainer.teacher_freeze
MAX_GRAPHS = 4          # input shapes kept (training batch, last batch, ...): each holds prepacked weights
MAX_REBUILDS = 3        # weight changes tolerated (a checkpoint load); more: the teacher is not fixed
PROBATION = 3           # batches checked against eager after a trace that branched in Python
TOLERANCE = 1e-3        # largest |graph - eager| allowed, relative to the eager output's largest magnitude


class _Tapped(nn.Module):
    """The teacher's forward returning (outputs, tapped features in the tap's order): what gets traced."""

    def __init__(self, model: nn.Module, tap: FeatureTap) -> None:
        super().__init__()
        self.model = model
        self.tap = tap

    def forward(self, images: Tensor) -> tuple[Any, tuple[Tensor, ...]]:
        self.tap.clear()
        out = self.model(images)
        return out, tuple(self.tap.features[n] for n in self.tap.names)


def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _flatten(v)]
    raise TypeError(f"the teacher returned {type(out).__name__}, not tensors")


def _disagreement(graph_out: Any, eager_out: Any) -> float:
    """Largest |graph - eager| over all tensors, relative to the eager tensor's largest magnitude."""
    worst = 0.0
    for g, e in zip(_flatten(graph_out), _flatten(eager_out), strict=True):
        if g.shape != e.shape:
            return float("inf")
        scale = float(e.detach().abs().max()) if e.numel() else 0.0
        diff = float((g.detach().float() - e.detach().float()).abs().max()) if e.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-6))
    return worst


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes whenever a parameter or buffer is modified in place (version counter) or replaced/moved."""
    return tuple((t._version, t.data_ptr()) for t in (*model.parameters(), *model.buffers()))


class FrozenTeacher:
    """Runs `model` (with `tap`'s features) through per-shape frozen graphs; `None` means use eager."""

    def __init__(self, model: nn.Module, tap: FeatureTap, name: str,
                 log: Callable[[str], None] | None = None) -> None:
        self.model, self.tap, self.name, self.log = model, tap, name, log
        self._graphs: OrderedDict[tuple, list] = OrderedDict()     # shape key -> [graph, checks left]
        self._fingerprint: tuple | None = None
        self.failed: str | None = None      # why the eager forward is kept (None while graphs work)
        self.rebuilds = 0                   # times the weights changed after a graph was built

    def _give_up(self, why: str) -> None:
        self.failed = why
        self._graphs.clear()
        if self.log is not None:
            self.log(f"teacher '{self.name}' freeze off: {why} (eager teacher forward)")

    def _build(self, images: Tensor) -> tuple[torch.jit.ScriptModule, int, Any] | None:
        """(graph, batches still to check against eager, its outputs on `images`), or None when the
        eager forward must stay."""
        wrapper = _Tapped(self.model, self.tap).eval()
        with torch.no_grad():
            eager = wrapper(images)               # the teacher's own errors are raised, not hidden
        try:
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                traced = torch.jit.trace(wrapper, images, check_trace=False, strict=False)
                graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
                frozen = graph(images)
        except Exception as exc:  # noqa: BLE001  (any tracing failure means: keep the eager forward)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._give_up(f"it does not trace ({first[:160]})")
            return None
        finally:
            self.tap.clear()
        if not self._agrees(frozen, eager):
            return None
        # A tracer warning means a Python branch was taken on a tensor's value (or shape: shapes
        # are fixed per graph): check the next batches against eager too, in case it was data.
        branched = any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
        return graph, PROBATION if branched else 0, frozen

    def _agrees(self, frozen: Any, eager: Any) -> bool:
        err = _disagreement(frozen, eager)
        if err <= TOLERANCE:
            return True
        self._give_up(f"the frozen graph disagrees with the eager forward (relative error {err:.2g} "
                      f"> {TOLERANCE:g})")
        return False

    @torch.compiler.disable       # under trainer.compile: a call out of the compiled step, not traced into
    def __call__(self, images: Tensor) -> tuple[Any, dict[str, Tensor]] | None:
        if self.failed is not None:
            return None
        fingerprint = _fingerprint(self.model)
        if fingerprint != self._fingerprint:      # new weights or device: every graph is stale
            if self._fingerprint is not None:
                self.rebuilds += 1
                if self.rebuilds > MAX_REBUILDS:  # written every step: tracing each time would cost more
                    self._give_up(f"its weights changed in place {self.rebuilds} times")
                    return None
            self._graphs.clear()
            self._fingerprint = fingerprint
        key = (tuple(images.shape), images.dtype, images.device, images.is_contiguous())
        entry = self._graphs.get(key)
        if entry is None:
            built = self._build(images)
            if built is None:
                return None
            graph, checks, (out, feats) = built
            self._graphs[key] = [graph, checks]
            if len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
            self._fingerprint = _fingerprint(self.model)
        else:
            self._graphs.move_to_end(key)
            out, feats = entry[0](images)
            if entry[1] > 0:                       # on probation: compare with the eager forward
                entry[1] -= 1
                eager = _Tapped(self.model, self.tap)(images)
                self.tap.clear()
                if not self._agrees((out, feats), eager):
                    return None
        return out, dict(zip(self.tap.names, feats, strict=True))


def _mode(mode: str | bool) -> str:
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode    # YAML: on/off
    if mode not in FREEZE_MODES:
        raise ConfigError(f"trainer.teacher_freeze must be one of {', '.join(FREEZE_MODES)}, got {mode!r}")
    return mode


def cache_freeze(mode: str | bool, device: torch.device) -> bool:
    """`trainer.teacher_freeze` for building a teacher-output cache (the teacher is fixed there)."""
    mode = _mode(mode)
    return mode == "on" or (mode == "auto" and device.type == "cpu")


def freeze_plan(mode: str | bool, device: torch.device, teacher_dtype: torch.dtype | None,
                module: nn.Module) -> bool:
    """Whether to freeze the teachers' forward, for `trainer.teacher_freeze`.

    `auto` freezes on CPU for float32 teachers that never change (results/teacher_precision.md:
    faster, same top-1); CUDA keeps the eager forward there (not measured). `on` freezes wherever
    the teacher is fixed and float32 (CUDA included) and refuses otherwise; `off` never freezes.
    """
    mode = _mode(mode)
    teachers = getattr(module, "teachers", None)
    if mode == "off" or not teachers or not hasattr(module, "set_teacher_execution"):
        return False
    why = None
    if teacher_dtype is not None:
        why = "the teacher runs in bf16 autocast (trainer.teacher_precision); freezing is for float32"
    elif not getattr(module, "teacher_outputs_ahead", False):
        why = f"{type(module).__name__}'s teacher follows the student, so its weights change"
    if why is not None:
        if mode == "on":
            raise ConfigError(f"trainer.teacher_freeze=on: {why}; use auto or off")
        return False
    return mode == "on" or device.type == "cpu"
