"""DML: deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018), optionally with a pivot.

A baseline, not a seed method: the ORC card (``shared/methods/p27_orc.md``) compares ORC with deep
mutual learning "among the students + pivot with uniform averaging". Every network learns from
its labels and, uniformly, from every other network of the cohort:

    L_i = ce_weight * CE(z_i, y) + kd_weight * mean_{j != i} KD(z_i, z_j.detach(), T)

(DML's loss is the mean of the KLs to the peers; KD is Hinton's T^2-scaled KL). A pretrained
``pivot`` joins the cohort as one more peer: its logits teach the students, and with
``pivot_learns`` (the default: mutual learning among all networks) it learns from them by the same
loss, in train mode like every network of the cohort (as ORC's refined pivot). No network is
singled out: immature networks teach as much as mature ones, which is what ORC's role change avoids.

``eval_model()`` is, as in ORC, the student with the lowest batch CE most often recently (an
exponential moving average over training batches, never the test split), or a fixed index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.errors import KdforgeError
from kdforge.losses.kd import kd_loss
from kdforge.methods.orc import promote
from kdforge.registry import METHODS

__all__ = ["DML", "mutual_loss"]


def mutual_loss(logits: Sequence[Tensor], i: int, target: Tensor, temperature: float, ce_weight: float,
                kd_weight: float) -> tuple[Tensor, Tensor]:
    """(weighted CE, weighted mean KD to the other networks' detached logits) of network ``i``."""
    z = logits[i].float()
    peers = [logits[j].detach().float() for j in range(len(logits)) if j != i]
    kd = torch.stack([kd_loss(z, t, temperature) for t in peers]).mean()
    return ce_weight * F.cross_entropy(z, target), kd_weight * kd


class DML(Distiller):
    """N students (and an optional pivot) that learn from one another, uniformly.

    Args:
        students: the N >= 2 student networks (N >= 1 with a pivot).
        pivot: an optional pretrained network that joins the cohort.
        temperature, ce_weight, kd_weight: KD temperature and loss weights (every network).
        pivot_learns: the pivot learns from the cohort too (else it is a frozen teacher).
        eval_student: ``"lowest_loss"`` or a student index: the network evaluated/exported.
        momentum: decay of the lowest-loss-rate average behind ``lowest_loss``.
    """

    def __init__(self, students: Sequence[nn.Module], pivot: nn.Module | None = None, *,
                 temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 pivot_learns: bool = True, eval_student: str | int = "lowest_loss",
                 momentum: float = 0.99) -> None:
        students = list(students)
        n = len(students)
        if n + (pivot is not None) < 2 or n < 1:
            raise KdforgeError(f"dml needs at least 2 networks (num_students, plus the pivot), got {n} students "
                               f"{'and a pivot' if pivot is not None else 'and no pivot'}")
        if temperature <= 0:
            raise KdforgeError(f"dml: temperature must be > 0, got {temperature}")
        if min(ce_weight, kd_weight) < 0:
            raise KdforgeError("dml: loss weights must be >= 0")
        if not isinstance(pivot_learns, bool):
            raise KdforgeError(f"dml: pivot_learns must be true or false, got {pivot_learns!r}")
        if not (eval_student == "lowest_loss" or (isinstance(eval_student, int) and 0 <= eval_student < n)):
            raise KdforgeError(f"dml: eval_student must be 'lowest_loss' or an index in [0, {n - 1}], "
                               f"got {eval_student!r}")
        if not 0.0 <= momentum < 1.0:
            raise KdforgeError(f"dml: momentum must be in [0, 1), got {momentum}")
        frozen = pivot is not None and not pivot_learns
        super().__init__(students[0], {"teacher": pivot} if frozen else {}, [])
        self.peers = nn.ModuleList(students[1:])
        self.has_pivot = pivot is not None
        self.pivot_learns = bool(pivot_learns) and self.has_pivot
        if self.pivot_learns:
            self.pivot_net = pivot.requires_grad_(True)     # trained like the students (train mode)
        self.temperature = float(temperature)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.eval_student = eval_student
        self.momentum = float(momentum)
        self.register_buffer("lowest_rate", torch.zeros(n))

    @property
    def students(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    @property
    def pivot(self) -> nn.Module | None:
        if not self.has_pivot:
            return None
        return self.pivot_net if self.pivot_learns else self.teachers["teacher"]

    @torch.no_grad()
    def setup(self, sample_images: Tensor, num_samples: int) -> None:
        """Check that every network predicts the same classes."""
        x = sample_images[:2]
        nets = [*self.students, *([self.pivot] if self.has_pivot else [])]
        modes = [s.training for s in nets]
        for s in nets:         # probe in eval mode: no batch-norm statistics move
            s.eval()
        try:
            outs = [s(x) for s in nets]
            shapes = {tuple(z.shape) for z in outs}
            if len(shapes) != 1 or outs[0].dim() != 2:
                raise KdforgeError(f"dml: the networks output {sorted(shapes)}; they must share the label space")
        finally:
            for s, mode in zip(nets, modes):
                s.train(mode)
        self.is_setup = True

    def eval_index(self) -> int:
        if self.eval_student == "lowest_loss":
            return int(promote(-self.lowest_rate, 1).nonzero()[0])
        return int(self.eval_student)

    def eval_model(self) -> nn.Module:
        return self.students[self.eval_index()]

    def forward(self, batch: Batch) -> Step:
        if not self.is_setup:
            raise KdforgeError("DML.setup(sample_images, num_samples) must run before training")
        if batch.soft_target is not None:
            raise KdforgeError("dml does not support mixup/cutmix (set data.augment.mixup=0 and cutmix=0)")
        y = batch.target
        logits = [s(batch.images) for s in self.students]
        n = len(logits)
        if self.has_pivot:
            if self.pivot_learns:
                logits.append(self.pivot_net(batch.images))
            else:
                with torch.no_grad():
                    logits.append(self.teachers["teacher"](batch.images).float())
        zero = logits[0].sum() * 0.0
        ce_s, kd_s = zero, zero
        for i in range(n):
            ce, kd = mutual_loss(logits, i, y, self.temperature, self.ce_weight, self.kd_weight)
            ce_s, kd_s = ce_s + ce, kd_s + kd
        losses = {"dml_ce": ce_s, "dml_kd": kd_s}
        groups = {"dml_ce": "task", "dml_kd": "distill"}
        if self.pivot_learns:
            ce, kd = mutual_loss(logits, n, y, self.temperature, self.ce_weight, self.kd_weight)
            losses.update({"dml_pivot_ce": ce, "dml_pivot_kd": kd})
            groups.update({"dml_pivot_ce": "task", "dml_pivot_kd": "distill"})
        with torch.no_grad():
            batch_ce = torch.stack([F.cross_entropy(z.float(), y) for z in logits[:n]])
            lowest = promote(batch_ce, 1)
            if self.training:
                self.lowest_rate.mul_(self.momentum).add_(lowest.to(self.lowest_rate.dtype), alpha=1.0 - self.momentum)
        return Step(outputs=logits[self.eval_index()], losses=losses, groups=groups,
                    teacher_logits=logits[n].detach() if self.has_pivot else None, extras={"lowest": lowest})

    @classmethod
    def build_module(cls, cfg: Any, student: nn.Module, teachers: dict[str, nn.Module], terms: list[Any],
                     data: Any, num_students: int = 3, **method_args: Any) -> DML:
        """From a run config: ``student`` is student 0 and ``num_students - 1`` more copy its architecture
        (fresh initialisations); ``teacher`` (optional, with a checkpoint) joins as the pivot. DML
        defines its own losses, so ``terms`` must be empty."""
        from kdforge.config import ModelConfig
        from kdforge.train.build import build_model

        if cfg.terms:
            raise KdforgeError("method dml defines its own losses; remove `terms:` from the config "
                               "(set method.args such as temperature, ce_weight, kd_weight instead)")
        if set(teachers) - {"teacher"}:
            raise KdforgeError(f"method dml takes at most one pivot under `teacher:`, got teachers: "
                               f"{', '.join(teachers)}")
        pivot = teachers.get("teacher")
        if pivot is not None and method_args.get("pivot_learns", True) and cfg.teacher.cache:
            raise KdforgeError("dml trains the pivot, so cached pivot outputs would be stale: drop teacher.cache "
                               "or set method.args.pivot_learns=false")
        c, _, _ = data.train.image_shape
        spec = ModelConfig(name=cfg.student.name, args=dict(cfg.student.args))
        others = [build_model(spec, data.train.num_classes, c, f"dml student {i + 1}") for i in range(num_students - 1)]
        try:
            return cls([student, *others], pivot, **method_args)
        except TypeError as err:
            if "unexpected keyword argument" in str(err):
                raise KdforgeError(f"method dml: {err}") from None
            raise


METHODS.register(
    "dml",
    DML,
    family="classification",
    paper="Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018)",
    summary="a cohort of students (and an optional pivot) each learn from the labels and the mean KL to all "
    "the others (a baseline of ORC)",
)
