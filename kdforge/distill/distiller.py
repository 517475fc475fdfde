"""Distiller(student, teachers, terms): turns one batch into student outputs and named losses.

Teachers are frozen: kept in eval mode, run under no_grad, never handed to the optimizer and
never saved in run checkpoints. Their outputs may instead come from the teacher-output cache
(`Batch.teacher_outputs`), in which case no teacher forward pass happens at all.

Methods that need more than loss terms (several students, experts, EMA teachers...) subclass
`Distiller` and override `forward`; the trainer only relies on the interface below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.frozen_teacher import FrozenTeacher
from kdforge.distill.terms import LOGITS, Term
from kdforge.errors import KdforgeError
from kdforge.losses.base import LossContext
from kdforge.models.taps import FeatureTap


@dataclass
class Batch:
    """One training batch as the trainer hands it over (images already augmented/normalized)."""

    images: Tensor
    target: Tensor
    index: Tensor
    epoch: int = 0
    step: int = 0
    soft_target: Tensor | None = None                              # mixup / cutmix labels
    teacher_outputs: dict[str, dict[str, Tensor]] | None = None    # teacher_id -> tap -> tensor


def _map_tensors(fn: Callable[[Tensor], Tensor], out: Any) -> Any:
    """`fn` applied to a model output: a tensor, or each value of a dict of tensors (multi-task models)."""
    return {k: fn(v) for k, v in out.items()} if isinstance(out, dict) else fn(out)


@dataclass
class Step:
    """What one forward produced: the student's logits and the weighted, named losses."""

    outputs: Tensor
    losses: dict[str, Tensor]
    groups: dict[str, str]
    teacher_logits: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def total(self) -> Tensor:
        return torch.stack([v.float() for v in self.losses.values()]).sum()

    def by_group(self) -> dict[str, Tensor]:
        """Sum of the losses in each group ("task", "distill", ...)."""
        out: dict[str, Tensor] = {}
        for name, value in self.losses.items():
            g = self.groups[name]
            out[g] = out[g] + value.float() if g in out else value.float()
        return out


def _as_teacher_dict(teachers: nn.Module | dict[str, nn.Module] | None) -> dict[str, nn.Module]:
    if teachers is None:
        return {}
    if isinstance(teachers, nn.Module) and not isinstance(teachers, nn.ModuleDict):
        return {"teacher": teachers}
    return dict(teachers)


class Distiller(nn.Module):
    """Student + frozen teachers + terms. `setup(sample)` must run before training.

    `setup` probes feature shapes with a tiny forward pass, builds connectors and loss state
    (CRD's memory bank) so that everything trainable exists before the optimizer is created.

    `teacher_outputs_ahead`: the teachers' outputs for a batch depend on the batch alone (frozen
    teachers), so the trainer may compute them ahead, overlapped with the student's step (the
    teacher pipeline), and through a frozen graph of the teacher (`trainer.teacher_freeze`). A
    subclass that overrides `forward` or `after_optimizer_step` (EMA teachers, role changes,
    mutual learning) is taken to depend on the student's state and gets False, unless its own
    body says `teacher_outputs_ahead = True`.
    """

    teacher_outputs_ahead: bool = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        overrides = {"forward", "after_optimizer_step", "_run_teacher"} & set(cls.__dict__)
        if overrides and "teacher_outputs_ahead" not in cls.__dict__:
            cls.teacher_outputs_ahead = False

    def __init__(self, student: nn.Module, teachers: nn.Module | dict[str, nn.Module] | None,
                 terms: list[Term]) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleDict(_as_teacher_dict(teachers))
        self.terms = nn.ModuleList(terms)
        names = [t.name for t in terms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise KdforgeError(f"terms must have unique names; repeated: {', '.join(dupes)} "
                               "(set `name:` on the terms)")
        for term in terms:
            if term.needs_teacher and term.teacher_id not in self.teachers:
                raise KdforgeError(f"term '{term.name}' reads teacher '{term.teacher_id}', but the "
                                   f"distiller has teachers: {', '.join(self.teachers) or 'none'}")
        for teacher in self.teachers.values():
            teacher.requires_grad_(False)
            teacher.eval()
        student_taps = [n for t in terms for n in t.student_taps if n != LOGITS]
        self._student_tap = FeatureTap(student, student_taps)
        self._teacher_taps = {
            tid: FeatureTap(model, [n for t in terms if t.teacher_id == tid
                                    for n in t.teacher_taps if n != LOGITS], detach=True)
            for tid, model in self.teachers.items()
        }
        self.is_setup = False

    # -- lifecycle -------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()    # teachers never leave eval mode (BN statistics stay fixed)
        return self

    @torch.no_grad()
    def setup(self, sample_images: Tensor, num_samples: int) -> None:
        """Probe tap shapes on two samples, then build connectors and loss state."""
        was_training = self.student.training
        self.student.eval()
        x = sample_images[:2]
        s_logits = self.student(x)
        s_feats = dict(self._student_tap.features)
        t_results = {tid: self._run_teacher(tid, x) for tid in self.teachers}
        self.student.train(was_training)
        self._check_classes(s_logits, t_results)
        for term in self.terms:
            s_shapes = [tuple((s_logits if n == LOGITS else s_feats[n]).shape) for n in term.student_taps]
            t_shapes: list[tuple[int, ...]] = []
            if term.needs_teacher:
                t_logits, t_feats = t_results[term.teacher_id]
                t_shapes = [tuple((t_logits if n == LOGITS else t_feats[n]).shape) for n in term.teacher_taps]
            term.setup(s_shapes, t_shapes, num_samples)
        self._student_tap.clear()
        self.is_setup = True

    def _check_classes(self, s_logits: Tensor, t_results: dict[str, tuple[Tensor, dict]]) -> None:
        for tid, (t_logits, _) in t_results.items():
            if t_logits.dim() == 2 and s_logits.dim() == 2 and t_logits.shape[1] != s_logits.shape[1]:
                raise KdforgeError(f"teacher '{tid}' predicts {t_logits.shape[1]} classes but the student "
                                   f"predicts {s_logits.shape[1]}; they must share the label space")

    def set_teacher_execution(self, dtype: torch.dtype | None = None, channels_last: bool = False,
                              freeze: bool = False, log: Callable[[str], None] | None = None) -> None:
        """Run the frozen teachers' forward in `dtype` (autocast; outputs handed out as float32) and/or
        channels_last memory format: a faster teacher forward on hardware that has it (bf16 on CPUs
        with AVX512-BF16 / AMX, channels_last for convolutions). `freeze`: through per-shape frozen
        TorchScript graphs (distill/frozen_teacher.py; float32 only), `log` told if one falls back
        to eager. Training state is unaffected."""
        if freeze and dtype is not None:
            raise KdforgeError("a frozen teacher graph runs in float32; teacher precision must be fp32")
        self.teacher_dtype, self.teacher_channels_last = dtype, channels_last
        self.frozen_teachers = ({tid: FrozenTeacher(model, self._teacher_taps[tid], tid, log)
                                 for tid, model in self.teachers.items()} if freeze else {})
        if channels_last:
            for teacher in self.teachers.values():
                teacher.to(memory_format=torch.channels_last)

    teacher_dtype: torch.dtype | None = None
    teacher_channels_last: bool = False
    teacher_devices: dict[str, torch.device] = {}
    frozen_teachers: dict[str, FrozenTeacher] = {}

    def place_teacher(self, tid: str, device: torch.device) -> None:
        """Run teacher `tid` on `device` (another GPU for a teacher that does not fit beside the student):
        its inputs are copied there and its outputs copied back to the student's device."""
        self.teachers[tid].to(device)
        self.teacher_devices = {**self.teacher_devices, tid: device}

    def _run_teacher(self, tid: str, images: Tensor) -> tuple[Any, dict[str, Tensor]]:
        """(outputs, tapped features) of teacher `tid`; outputs are a tensor or a dict of tensors (dense tasks)."""
        tap = self._teacher_taps[tid]
        tap.clear()
        home, there = images.device, self.teacher_devices.get(tid)
        if there is not None and there != home:
            logits, feats = self._run_teacher_on(tid, images.to(there))
            return _map_tensors(lambda v: v.to(home), logits), {k: v.to(home) for k, v in feats.items()}
        return self._run_teacher_on(tid, images)

    def _run_teacher_on(self, tid: str, images: Tensor) -> tuple[Any, dict[str, Tensor]]:
        tap = self._teacher_taps[tid]
        if self.teacher_channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        frozen = self.frozen_teachers.get(tid) if self.is_setup else None
        if frozen is not None:
            with torch.no_grad():      # not inference mode: the outputs need no copies for the backward
                result = frozen(images)
            if result is not None:
                return result
        precision = (torch.autocast(images.device.type, dtype=self.teacher_dtype) if self.teacher_dtype
                     else contextlib.nullcontext())
        with torch.inference_mode(), precision:
            logits = self.teachers[tid](images)
        feats = tap.features
        if self.teacher_dtype is not None:      # the terms see float32 whatever the teacher ran in
            logits, feats = _map_tensors(Tensor.float, logits), {k: v.float() for k, v in feats.items()}
        # inference tensors cannot be saved for the student's backward: hand out normal copies
        return _map_tensors(Tensor.clone, logits), {k: v.clone() for k, v in feats.items()}

    def needed_teachers(self) -> list[str]:
        """Ids of the teachers some term reads (the ones an online step must run)."""
        return sorted({term.teacher_id for term in self.terms if term.needs_teacher})

    def teacher_outputs(self, images: Tensor) -> dict[str, dict[str, Tensor]]:
        """Every needed teacher's outputs for `images` ({id: {"logits": ..., tap: ...}}), the form
        `Batch.teacher_outputs` takes (the teacher-output cache and the teacher pipeline fill it)."""
        out = {}
        for tid in self.needed_teachers():
            logits, feats = self._run_teacher(tid, images)
            out[tid] = {LOGITS: logits, **feats}
        return out

    # -- training interface ----------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student + connectors + loss heads; never teacher parameters."""
        teacher_ids = {id(p) for p in self.teachers.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher_ids]

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Everything a run saves: student, connectors and loss state, but not the teachers."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teachers.")}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teachers.")]
        if missing or unexpected:
            raise KdforgeError("checkpoint does not match this run's models: "
                               f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                               f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")

    def eval_model(self) -> nn.Module:
        """The network evaluated and exported: the student."""
        return self.student

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods with per-epoch state (e.g. schedules of their own)."""

    def after_optimizer_step(self, step: int) -> None:
        """Hook for methods that update state after each step (EMA teachers, role changes)."""

    def forward(self, batch: Batch) -> Step:
        if not self.is_setup:
            raise KdforgeError("Distiller.setup(sample_images, num_samples) must run before training")
        self._student_tap.clear()
        s_logits = self.student(batch.images)
        s_feats = self._student_tap.features
        t_results: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}
        needed = {term.teacher_id for term in self.terms if term.needs_teacher}
        cached = batch.teacher_outputs or {}
        for tid in needed:
            if tid in cached:
                outs = cached[tid]
                t_results[tid] = (outs.get(LOGITS), outs)
            else:
                t_results[tid] = self._run_teacher(tid, batch.images)
        main_t = t_results.get("teacher", next(iter(t_results.values()), (None, {})))[0]
        ctx = LossContext(target=batch.target, soft_target=batch.soft_target, index=batch.index,
                          student_logits=s_logits, teacher_logits=main_t, epoch=batch.epoch, step=batch.step)
        losses: dict[str, Tensor] = {}
        groups: dict[str, str] = {}
        for term in self.terms:
            s_in = [s_logits if n == LOGITS else s_feats[n] for n in term.student_taps]
            t_in = None
            if term.needs_teacher:
                t_logits, t_feats = t_results[term.teacher_id]
                t_in = [self._teacher_feature(term, t_logits, t_feats, n) for n in term.teacher_taps]
                ctx.teacher_logits = t_logits
            losses[term.name] = term(s_in, t_in, ctx)
            groups[term.name] = term.group
        return Step(outputs=s_logits, losses=losses, groups=groups, teacher_logits=main_t)

    @staticmethod
    def _teacher_feature(term: Term, logits: Tensor | None, feats: dict[str, Tensor], name: str) -> Tensor:
        value = logits if name == LOGITS else feats.get(name)
        if value is None:
            raise KdforgeError(f"term '{term.name}': teacher output '{name}' is missing (not in the "
                               "teacher-output cache?)")
        return value
