"""ORC: network group-based KD using online role change (Choi et al., ICCV 2023).

Several students train together with a pretrained *pivot* teacher. At every iteration the
students are ranked on the current batch (cross-entropy, lowest first) and the top ``k`` are
promoted into the **teacher group** (pivot + promoted); the rest form the **student group**.

* Teacher-group refinement ("training the teacher group using the error samples of the student
  group", the paper's abstract): the *whole* teacher group learns on the student group's *error
  samples* (inputs some student-group network misclassifies). The pivot is refined online with
  the labels (CE on the error samples; it is the group's most mature member, so nothing above it
  teaches it); each promoted network with the labels and the pivot's soft targets. The teachers
  are corrected exactly where the students fail.
* Group teaching: the teacher group's collaborative knowledge, the mean of the pivot's and the
  promoted networks' logits (detached), is distilled into every student-group network, with CE.

A promoted network never distils from an ensemble that contains itself. The official
repository (choijunyong/ORCKD) holds no training code; this follows the paper's abstract and
figure and the kdforge method card (``shared/methods/p27_orc.md``). Its unverified choices are
parameters here: ``num_promoted`` (k=1), the error rule (``any`` student-group network wrong),
logit averaging, the loss weights (CE 0.1 / KD 0.9, T=4) and the pivot's refinement weight
(``pivot_ce_weight``, default 1.0; its gradient scale is the pivot's effective learning-rate
scale, 0.1 in configs/methods/orc.yaml, chosen on validation). A refined pivot trains like the
students: in train mode (batch-norm on the batch, running statistics updated), with the students'
optimizer (with batch-norm frozen it diverged within 31 steps at lr 0.05 in a trial).
``refine_pivot=false`` keeps the pivot frozen (the teacher group is then the fixed pivot averaged
with the promoted student: an ablation, not the paper's method). The teacher group's logits are
those of the same forward pass (before this step's refinement update), so each network runs once
per batch.

All networks are trainable submodules (one optimizer covers them; as each loss reads only its
own network, and the targets are detached, one summed backward equals per-network updates); the
refined pivot is saved in the run's checkpoints (it changes), a frozen one is not.
``eval_model()`` is the student promoted most often recently (an exponential moving average of
the promotions, a training-batch signal, never the test split), or a fixed index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.distill.terms import LOGITS
from kdforge.errors import KdforgeError
from kdforge.losses.kd import kd_loss
from kdforge.registry import METHODS

__all__ = ["ORC", "ensemble_target", "error_mask", "false_knowledge_rate", "group_teaching_loss",
           "pivot_refine_loss", "promote", "refine_loss"]

_ERROR_RULES = ("any", "majority", "all")


# ------------------------------------------------------------------ the mechanism, as pure functions


def promote(batch_losses: Tensor, k: int) -> Tensor:
    """Bool mask (N,) of the ``k`` networks with the lowest batch loss: the role change.

    Ties go to the lower index (stable sort), so the split is deterministic; NaN ranks last.
    """
    if batch_losses.dim() != 1:
        raise KdforgeError(f"orc: promote expects one loss per network (N,), got {tuple(batch_losses.shape)}")
    n = batch_losses.numel()
    if not 0 <= k <= n:
        raise KdforgeError(f"orc: cannot promote {k} of {n} networks")
    keys = torch.nan_to_num(batch_losses.detach().float(), nan=float("inf"))
    order = torch.argsort(keys, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=batch_losses.device)
    mask[order[:k]] = True
    return mask


def error_mask(group_logits: Sequence[Tensor], target: Tensor, rule: str = "any") -> Tensor:
    """Bool mask (B,) of the student group's error samples.

    ``any``: some network of the group misclassifies the sample; ``majority``: more than half
    do; ``all``: every one does. An empty group has no errors.
    """
    if rule not in _ERROR_RULES:
        raise KdforgeError(f"orc: error rule must be one of {', '.join(_ERROR_RULES)}, got {rule!r}")
    if len(group_logits) == 0:
        return torch.zeros(target.shape[0], dtype=torch.bool, device=target.device)
    wrong = torch.stack([z.detach().argmax(1) != target for z in group_logits])  # (M, B)
    if rule == "any":
        return wrong.any(0)
    if rule == "all":
        return wrong.all(0)
    return wrong.sum(0) * 2 > wrong.shape[0]


def ensemble_target(pivot_logits: Tensor, promoted_logits: Sequence[Tensor]) -> Tensor:
    """Collaborative knowledge: the mean logits of the pivot and the promoted networks, detached."""
    stack = torch.stack([pivot_logits.detach().float()] + [z.detach().float() for z in promoted_logits])
    return stack.mean(0)


def refine_loss(logits: Tensor, pivot_logits: Tensor, target: Tensor, mask: Tensor, temperature: float,
                ce_weight: float, kd_weight: float) -> tuple[Tensor, Tensor]:
    """Teacher-group refinement of one promoted network on the error samples ``mask``.

    Returns (``ce_weight * CE``, ``kd_weight * KD(pivot, T)``), both averaged over the error
    samples only. No error sample: exact zeros that still belong to the graph (refinement skipped).
    """
    if not bool(mask.any()):
        zero = logits.sum() * 0.0
        return zero, zero
    z, t, y = logits[mask].float(), pivot_logits[mask].float(), target[mask]
    return ce_weight * F.cross_entropy(z, y), kd_weight * kd_loss(z, t, temperature)


def pivot_refine_loss(pivot_logits: Tensor, target: Tensor, mask: Tensor, weight: float) -> Tensor:
    """The pivot's online refinement: ``weight`` * CE on the student group's error samples ``mask``.

    No error sample: an exact zero that still belongs to the graph (refinement skipped).
    """
    if not bool(mask.any()):
        return pivot_logits.sum() * 0.0
    return weight * F.cross_entropy(pivot_logits[mask].float(), target[mask])


def group_teaching_loss(logits: Tensor, ensemble_logits: Tensor, target: Tensor, temperature: float,
                        ce_weight: float, kd_weight: float) -> tuple[Tensor, Tensor]:
    """(weighted CE, weighted KD) of one student-group network taught by the teacher-group ensemble."""
    z = logits.float()
    return ce_weight * F.cross_entropy(z, target), kd_weight * kd_loss(z, ensemble_logits, temperature)


def false_knowledge_rate(ensemble_logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of samples whose teaching target's argmax is wrong (the "false knowledge" taught)."""
    return (ensemble_logits.argmax(1) != target).float().mean()


# ------------------------------------------------------------------ the training module


class ORC(Distiller):
    """A pretrained pivot teacher and N students whose roles change every iteration.

    Args:
        students: the N >= 2 student networks (same label space; architectures may differ).
        pivot: the pretrained pivot teacher.
        num_promoted: k, students promoted into the teacher group per iteration (1 <= k < N).
        temperature, ce_weight, kd_weight: KD temperature and loss weights of the student group.
        refine_ce_weight, refine_kd_weight: loss weights of the promoted networks' refinement.
        refine_pivot: refine the pivot online on the student group's error samples (the paper);
            false keeps it frozen (eval mode, no gradient, not checkpointed, may be cached).
        pivot_ce_weight: weight of the pivot's CE on the error samples.
        error_rule: which samples count as student-group errors (``any``/``majority``/``all``).
        eval_student: ``"most_promoted"`` or a student index: the network evaluated/exported.
        promotion_momentum: decay of the promotion-rate average behind ``most_promoted``.
    """

    def __init__(self, students: Sequence[nn.Module], pivot: nn.Module, *, num_promoted: int = 1,
                 temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 refine_ce_weight: float = 0.1, refine_kd_weight: float = 0.9, refine_pivot: bool = True,
                 pivot_ce_weight: float = 1.0, error_rule: str = "any",
                 eval_student: str | int = "most_promoted", promotion_momentum: float = 0.99) -> None:
        students = list(students)
        n = len(students)
        if n < 2:
            raise KdforgeError(f"orc needs at least 2 students (num_students), got {n}")
        if not 1 <= num_promoted < n:
            raise KdforgeError(f"orc: num_promoted must be in [1, {n - 1}] for {n} students, "
                               f"got {num_promoted}")
        if temperature <= 0:
            raise KdforgeError(f"orc: temperature must be > 0, got {temperature}")
        if min(ce_weight, kd_weight, refine_ce_weight, refine_kd_weight, pivot_ce_weight) < 0:
            raise KdforgeError("orc: loss weights must be >= 0")
        if not isinstance(refine_pivot, bool):
            raise KdforgeError(f"orc: refine_pivot must be true or false, got {refine_pivot!r}")
        if error_rule not in _ERROR_RULES:
            raise KdforgeError(f"orc: error_rule must be one of {', '.join(_ERROR_RULES)}, "
                               f"got {error_rule!r}")
        if not (eval_student == "most_promoted" or (isinstance(eval_student, int) and 0 <= eval_student < n)):
            raise KdforgeError(f"orc: eval_student must be 'most_promoted' or an index in [0, {n - 1}], "
                               f"got {eval_student!r}")
        if not 0.0 <= promotion_momentum < 1.0:
            raise KdforgeError(f"orc: promotion_momentum must be in [0, 1), got {promotion_momentum}")
        # A frozen pivot is an ordinary Distiller teacher; a refined one is a trainable member of
        # the teacher group (in the optimizer and in the checkpoints, never in `teachers`).
        super().__init__(students[0], {} if refine_pivot else {"teacher": pivot}, [])
        self.peers = nn.ModuleList(students[1:])      # student 0 is `self.student`
        self.refine_pivot = refine_pivot
        if refine_pivot:     # trained like the students (train mode: batch-norm on the batch)
            self.pivot_net = pivot.requires_grad_(True)
        self.num_promoted = int(num_promoted)
        self.temperature = float(temperature)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.refine_ce_weight, self.refine_kd_weight = float(refine_ce_weight), float(refine_kd_weight)
        self.pivot_ce_weight = float(pivot_ce_weight)
        self.error_rule = error_rule
        self.eval_student = eval_student
        self.promotion_momentum = float(promotion_momentum)
        # Running promotion rate per student (saved in checkpoints, so resume picks the same one).
        self.register_buffer("promotion_rate", torch.zeros(n))

    @property
    def students(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    @property
    def pivot(self) -> nn.Module:
        return self.pivot_net if self.refine_pivot else self.teachers["teacher"]

    @torch.no_grad()
    def setup(self, sample_images: Tensor, num_samples: int) -> None:
        """Check that every student and the pivot predict the same classes."""
        x = sample_images[:2]
        nets = [*self.students, self.pivot]
        modes = [s.training for s in nets]
        for s in nets:         # probe in eval mode: no batch-norm statistics move
            s.eval()
        try:
            pivot_logits = self.pivot(x)
            for i, s in enumerate(self.students):
                z = s(x)
                if z.dim() != 2 or z.shape != pivot_logits.shape:
                    raise KdforgeError(f"orc: student {i} outputs {tuple(z.shape)} but the pivot "
                                       f"teacher outputs {tuple(pivot_logits.shape)}; they must share "
                                       "the label space")
        finally:
            for s, mode in zip(nets, modes):
                s.train(mode)
        self.is_setup = True

    def eval_index(self) -> int:
        """Index of the evaluated student (most promoted; ties to the lower index)."""
        if self.eval_student == "most_promoted":
            return int(promote(-self.promotion_rate, 1).nonzero()[0])
        return int(self.eval_student)

    def eval_model(self) -> nn.Module:
        return self.students[self.eval_index()]

    def _pivot_logits(self, batch: Batch) -> Tensor:
        if self.refine_pivot:     # with the graph: the pivot learns from its error-sample CE
            return self.pivot_net(batch.images)
        cached = (batch.teacher_outputs or {}).get("teacher", {})
        if cached.get(LOGITS) is not None:
            return cached[LOGITS]
        with torch.no_grad():
            return self.pivot(batch.images)

    def forward(self, batch: Batch) -> Step:
        if not self.is_setup:
            raise KdforgeError("ORC.setup(sample_images, num_samples) must run before training")
        if batch.soft_target is not None:
            raise KdforgeError("orc does not support mixup/cutmix: its ranking and error samples need hard "
                               "labels (set data.augment.mixup=0 and cutmix=0)")
        y = batch.target
        logits = [s(batch.images) for s in self.students]
        pivot_out = self._pivot_logits(batch).float()
        pivot_logits = pivot_out.detach()
        with torch.no_grad():
            batch_ce = torch.stack([F.cross_entropy(z.float(), y) for z in logits])
        promoted = promote(batch_ce, self.num_promoted)
        teacher_ids = promoted.nonzero().flatten().tolist()
        student_ids = (~promoted).nonzero().flatten().tolist()
        errors = error_mask([logits[i] for i in student_ids], y, self.error_rule)
        target = ensemble_target(pivot_logits, [logits[i] for i in teacher_ids])

        zero = logits[0].sum() * 0.0
        refine_ce, refine_kd = zero, zero
        for i in teacher_ids:
            ce, kd = refine_loss(logits[i], pivot_logits, y, errors, self.temperature,
                                 self.refine_ce_weight, self.refine_kd_weight)
            refine_ce, refine_kd = refine_ce + ce, refine_kd + kd
        student_ce, student_kd = zero, zero
        for i in student_ids:
            ce, kd = group_teaching_loss(logits[i], target, y, self.temperature, self.ce_weight,
                                         self.kd_weight)
            student_ce, student_kd = student_ce + ce, student_kd + kd

        if self.training:
            with torch.no_grad():
                m = self.promotion_momentum
                self.promotion_rate.mul_(m).add_(promoted.to(self.promotion_rate.dtype), alpha=1.0 - m)
        losses = {"orc_student_ce": student_ce, "orc_student_kd": student_kd,
                  "orc_refine_ce": refine_ce, "orc_refine_kd": refine_kd}
        groups = {"orc_student_ce": "task", "orc_student_kd": "distill",
                  "orc_refine_ce": "task", "orc_refine_kd": "distill"}
        if self.refine_pivot:
            losses["orc_pivot_ce"] = pivot_refine_loss(pivot_out, y, errors, self.pivot_ce_weight)
            groups["orc_pivot_ce"] = "task"
        extras = {"promoted": promoted, "error_fraction": errors.float().mean(),
                  "false_knowledge_rate": false_knowledge_rate(target, y)}
        return Step(outputs=logits[self.eval_index()], losses=losses, groups=groups,
                    teacher_logits=pivot_logits, extras=extras)

    @classmethod
    def build_module(cls, cfg: Any, student: nn.Module, teachers: dict[str, nn.Module], terms: list[Any],
                     data: Any, num_students: int | None = None, peers: list[dict[str, Any]] | None = None,
                     **method_args: Any) -> ORC:
        """From a run config: ``student`` is student 0; the others copy its architecture (fresh
        initialisations; ``num_students``, default 3) or are given by ``method.args.peers:
        [{name, args}, ...]``. The pivot is
        ``teacher`` (with a checkpoint; refined online unless ``refine_pivot: false``, so it cannot come
        from ``teacher.cache``). ORC defines its own losses, so ``terms`` must be empty."""
        from kdforge.config import ModelConfig
        from kdforge.train.build import build_model

        if cfg.terms:
            raise KdforgeError("method orc defines its own losses; remove `terms:` from the config "
                               "(set method.args such as temperature, ce_weight, kd_weight instead)")
        if set(teachers) != {"teacher"}:
            raise KdforgeError("method orc needs exactly one pivot teacher under `teacher:` (with a "
                               f"checkpoint), got teachers: {', '.join(teachers) or 'none'}")
        if method_args.get("refine_pivot", True) and cfg.teacher is not None and cfg.teacher.cache:
            raise KdforgeError("orc refines the pivot online, so cached pivot outputs would be stale: drop "
                               "teacher.cache or set method.args.refine_pivot=false")
        c, _, _ = data.train.image_shape
        k = data.train.num_classes
        if peers is not None:
            if not isinstance(peers, list) or not all(isinstance(p, dict) and "name" in p for p in peers):
                raise KdforgeError("orc: method.args.peers must be a list of {name, args} model specs")
            if num_students is not None and num_students != len(peers) + 1:
                raise KdforgeError(f"orc: num_students={num_students} but peers lists {len(peers)} extra "
                                   "students; give one or the other")
            specs = [ModelConfig(name=p["name"], args=dict(p.get("args", {}))) for p in peers]
        else:
            num_students = 3 if num_students is None else num_students
            if num_students < 2:
                raise KdforgeError(f"orc needs at least 2 students (num_students), got {num_students}")
            specs = [ModelConfig(name=cfg.student.name, args=dict(cfg.student.args))] * (num_students - 1)
        others = [build_model(spec, k, c, f"orc student {i + 1}") for i, spec in enumerate(specs)]
        try:
            return cls([student, *others], teachers["teacher"], **method_args)
        except TypeError as err:
            if "unexpected keyword argument" in str(err):
                raise KdforgeError(f"method orc: {err}") from None
            raise


METHODS.register(
    "orc",
    ORC,
    family="classification",
    paper="ORC: Network Group-based Knowledge Distillation using Online Role Change (Choi et al., ICCV 2023)",
    summary="students ranked per batch; the best join the pivot teacher's group, are refined on the "
    "others' error samples, and the group's mean logits teach the rest",
)
