"""One Auto-KD proxy trial as a Task of the one Trainer (kdforge.train.trainer).

A trial trains the proxy student with a candidate's distillation terms on the cached subset
(`kdforge.search.proxy.ProxyData`): no teacher runs, the teachers' outputs of every batch come
from the caches. The Trainer owns the loop (optimizer, cosine lr per step, the non-finite guard,
checkpoints, exact resume, metrics.csv, result.json); this module owns what a trial trains:

* `ProxyModule` (the training module): the student, the candidate's `Term`s and the fixed
  sparsity masks; `forward(batch)` returns a `Step` with `ce` (weighted 1 - alpha) and one loss
  per term; the masks are re-applied after every optimizer step;
* `ProxyTask`: one Trainer epoch is one evaluation interval (`eval_every` steps; the last one is
  cut at `proxy_steps`), the split `val` is evaluated after each and picks the `best`
  checkpoint by `reward` = -(val CE + gamma (1 - linear CKA to the teachers)); `should_stop`
  ends training after `patience` evaluations without a better reward. The data epoch and batch
  position come from the global step (`epoch_order` of the subset, the cached view of that data
  epoch), so batch k is a pure function of the step and a resumed trial is exact.

The first-batch loss-weight normalisation (each term gets alpha * w * CE_0 / D_0, measured with
the untrained student; CE gets 1 - alpha) runs in `build`, before the optimizer exists.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.base import ImageTensors
from kdforge.data.cache import TeacherCache
from kdforge.data.transforms import apply_crop_flip, to_normalized
from kdforge.distill.distiller import Step
from kdforge.distill.terms import LOGITS, Term, term_from_config
from kdforge.errors import KdforgeError
from kdforge.losses.base import LossContext
from kdforge.models.taps import FeatureTap
from kdforge.search.autokd_space import Candidate
from kdforge.search.cka import linear_cka
from kdforge.search.options import AutoKDOptions
from kdforge.tasks.base import Task, TaskModule
from kdforge.tasks.classification import epoch_order
from kdforge.train.distributed import DistEnv

__all__ = ["ProxyBatch", "ProxyData", "ProxyModule", "ProxyTask", "apply_masks", "sparsity_masks",
           "student_features"]

_WEIGHT_RANGE = (1e-4, 1e4)


@dataclass
class ProxyData:
    """What every proxy run shares: the subset, its teacher caches, validation teacher features."""

    train: ImageTensors
    val: ImageTensors
    caches: dict[str, TeacherCache]
    val_teacher: dict[str, dict[str, Tensor]]
    crop_padding: int
    flip: bool


@dataclass
class ProxyBatch:
    """One training batch: normalised views, labels, subset positions, cached teacher outputs."""

    x: Tensor
    y: Tensor
    index: Tensor
    teachers: dict[str, dict[str, Tensor]]
    step: int


def sparsity_masks(model: nn.Module, sparsity: float, seed: int) -> dict[str, Tensor]:
    """Fixed random masks keeping 1 - sparsity of every conv / linear weight (the card's sparse proxy)."""
    if sparsity <= 0:
        return {}
    gen = torch.Generator().manual_seed(int(seed) + 31337)
    return {name: (torch.rand(m.weight.shape, generator=gen) >= sparsity).to(m.weight.dtype)
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask)


@torch.no_grad()
def student_features(student: nn.Module, tap: FeatureTap, images: Tensor, mean: Any, std: Any,
                     names: list[str], batch: int = 256) -> tuple[Tensor, dict[str, Tensor]]:
    """Student logits and tapped features on un-augmented images (eval mode; returned on the CPU)."""
    was = student.training
    student.eval()
    device = next(student.parameters()).device
    logits, feats = [], {n: [] for n in names}
    for i in range(0, images.shape[0], batch):
        tap.clear()
        logits.append(student(to_normalized(images[i:i + batch], mean, std).to(device)).float().cpu())
        for n in names:
            feats[n].append(tap.features[n].float().cpu())
    student.train(was)
    return torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}


def _teacher_shape(cache: TeacherCache, tap: str, n: int = 2) -> tuple[int, ...]:
    key = LOGITS if tap == LOGITS else f"tap.{tap}"
    return (n, *cache.manifest["shapes"][key])


def _cka_feature(name: str, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
    return logits if name == LOGITS else feats[name]


class ProxyModule(TaskModule):
    """The proxy student, the candidate's terms and the sparsity masks (re-applied after each step)."""

    frozen = ()

    def __init__(self, student: nn.Module, terms: list[Term], tap_names: list[str]) -> None:
        super().__init__()
        names = [t.name for t in terms]
        if len(set(names)) != len(names) or "ce" in names:
            raise KdforgeError(f"autokd proxy: term names must be unique and not 'ce', got {names}")
        self.student = student
        self.terms = nn.ModuleList(terms)
        self.tap = FeatureTap(student, tap_names)
        self.masks: dict[str, Tensor] = {}
        self.ce_weight = 1.0

    def eval_model(self) -> nn.Module:
        return self.student

    def losses(self, x: Tensor, y: Tensor, index: Tensor, teachers: dict[str, dict[str, Tensor]],
               step: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(logits, unweighted CE, the terms' weighted values) of one batch."""
        self.tap.clear()
        logits = self.student(x)
        ctx = LossContext(target=y, index=index, student_logits=logits, step=step)
        values = []
        for term in self.terms:
            s_in = [logits if n == LOGITS else self.tap.features[n] for n in term.student_taps]
            t_all = teachers[term.teacher_id]
            ctx.teacher_logits = t_all[LOGITS]
            values.append(term(s_in, [t_all[n] for n in term.teacher_taps], ctx))
        return logits, F.cross_entropy(logits, y), values

    def forward(self, batch: ProxyBatch) -> Step:
        logits, ce, values = self.losses(batch.x, batch.y, batch.index, batch.teachers, batch.step)
        losses = {"ce": ce * self.ce_weight, **{t.name: v for t, v in zip(self.terms, values)}}
        groups = {"ce": "task", **{t.name: t.group for t in self.terms}}
        return Step(outputs=logits, losses=losses, groups=groups)

    def after_optimizer_step(self, step: int) -> None:
        apply_masks(self.student, self.masks)


class ProxyTask(Task):
    """A candidate's proxy training: `proxy_steps` steps, evaluated every `eval_every`, patience stop.

    Trainer epochs are evaluation intervals: `steps_per_epoch() == eval_every` and the run has
    ceil(proxy_steps / eval_every) epochs; `result()` is the best evaluation (its reward, val CE,
    CKA, top-1 and the step it was taken at, `best_step`) plus the normalised weights.
    """

    name = "autokd_proxy"
    eval_split = "val"
    selection_metric = "reward"
    higher_is_better = True
    ddp_note = ("a proxy trial is a short single-process run; spread a search over processes by sharing "
                "its Optuna storage (--storage) instead")

    def __init__(self, pdata: ProxyData, opts: AutoKDOptions, candidate: Candidate,
                 make_student: Callable[[], nn.Module], batch_size: int) -> None:
        self.pdata, self.opts, self.candidate = pdata, opts, candidate
        self.make_student = make_student
        self.batch_size = min(batch_size, len(pdata.train))
        self.per_data_epoch = max(1, len(pdata.train) // self.batch_size)
        self.epochs = math.ceil(opts.proxy_steps / opts.eval_every)
        self.ce_weight = 1.0
        self.weights: dict[str, float] = {}
        self.best: dict[str, float] | None = None     # the best evaluation so far (with its step)
        self.stale = 0                                 # evaluations since the best one
        self._order: tuple[int, Tensor] | None = None
        self.device = torch.device("cpu")
        self.module: ProxyModule | None = None

    # -- set-up -------------------------------------------------------------------------------------

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        """Student (seeded), terms set up on probed shapes, masks applied, first-batch weights measured."""
        opts, p = self.opts, self.pdata
        self.device = device
        student = self.make_student()
        terms = [term_from_config(tc) for tc in self.candidate.terms]
        s_taps = sorted({n for t in terms for n in t.student_taps if n != LOGITS}
                        | ({opts.cka_tap} if opts.cka_tap != LOGITS else set()))
        module = ProxyModule(student, terms, s_taps)
        logits, feats = student_features(student, module.tap, p.train.images[:2], p.train.mean,
                                         p.train.std, module.tap.names)
        for term in terms:
            s_shapes = [tuple((logits if n == LOGITS else feats[n]).shape) for n in term.student_taps]
            t_shapes = [_teacher_shape(p.caches[term.teacher_id], n) for n in term.teacher_taps]
            term.setup(s_shapes, t_shapes, len(p.train))
        module.to(device)
        module.masks = {k: v.to(device) for k, v in sparsity_masks(student, opts.sparsity, opts.seed).items()}
        apply_masks(student, module.masks)
        self._normalise(module, terms)
        module.ce_weight = self.ce_weight
        self.module = module
        return module

    def close(self) -> None:
        """Remove the student's feature hooks (after the trial)."""
        if self.module is not None:
            self.module.tap.remove()

    def _normalise(self, module: ProxyModule, terms: list[Term]) -> None:
        """Weights from the first batch: alpha * w * CE_0 / D_0 per term; BN statistics left untouched."""
        snapshot = copy.deepcopy([module.student.state_dict(), [t.state_dict() for t in terms]])
        module.student.train()
        with torch.no_grad():
            b = self.batch(0, 0, DistEnv())
            _, ce, values = module.losses(b.x, b.y, b.index, b.teachers, 0)
        module.student.load_state_dict(snapshot[0])
        for t, s in zip(terms, snapshot[1]):
            t.load_state_dict(s)
        alpha = self.candidate.alpha
        for term, value in zip(terms, values):
            d0 = float(value) / term.weight if term.weight else float(value)
            scale = float(ce) / d0 if d0 > 0 and math.isfinite(d0) else 1.0
            term.weight = min(_WEIGHT_RANGE[1], max(_WEIGHT_RANGE[0], alpha * term.weight * scale))
            self.weights[term.name] = term.weight
        self.ce_weight = 1.0 - alpha

    def steps_per_epoch(self) -> int:
        return self.opts.eval_every

    # -- training -----------------------------------------------------------------------------------

    def batches(self, epoch: int, start_step: int, env: DistEnv) -> Iterator[ProxyBatch]:
        """The interval's batches; the last interval stops at `proxy_steps`."""
        last = min(self.opts.eval_every, self.opts.proxy_steps - epoch * self.opts.eval_every)
        for step in range(start_step, last):
            yield self.batch(epoch, step, env)

    def _epoch_order(self, data_epoch: int) -> Tensor:
        if self._order is None or self._order[0] != data_epoch:
            self._order = (data_epoch, epoch_order(len(self.pdata.train), self.opts.seed, data_epoch))
        return self._order[1]

    def batch(self, epoch: int, step: int, env: DistEnv) -> ProxyBatch:
        """Global step g = epoch * eval_every + step: data epoch g // per_data_epoch, its batch g % that."""
        p, bs = self.pdata, self.batch_size
        g = epoch * self.opts.eval_every + step
        data_epoch, k = divmod(g, self.per_data_epoch)
        index = self._epoch_order(data_epoch)[k * bs:(k + 1) * bs]
        images = p.train.images[index]
        if p.crop_padding > 0 or p.flip:
            v = next(iter(p.caches.values())).view_params(data_epoch, index)
            images = apply_crop_flip(images, v["dx"], v["dy"], v["flip"], p.crop_padding)
        dev = self.device
        x = to_normalized(images, p.train.mean, p.train.std).to(dev)
        teachers = {tid: cache.lookup(data_epoch, index, device=dev) for tid, cache in p.caches.items()}
        return ProxyBatch(x, p.train.labels[index].to(dev), index.to(dev), teachers, g)

    def should_stop(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Patience: stop after `patience` evaluations in a row without a better reward."""
        if self.best is None or metrics["reward"] > self.best["reward"]:
            self.best = {**metrics, "step": min((epoch + 1) * self.opts.eval_every, self.opts.proxy_steps)}
            self.stale = 0
        else:
            self.stale += 1
        return self.stale >= self.opts.patience and epoch + 1 < self.epochs

    # -- evaluation and results ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        """Validation CE, top-1, CKA to each teacher on `cka_tap` (mean over teachers), reward."""
        if split != "val":
            raise KdforgeError(f"autokd proxy: only the validation split is evaluated, not '{split}'")
        p, opts = self.pdata, self.opts
        names = [opts.cka_tap] if opts.cka_tap != LOGITS else []
        logits, feats = student_features(module.student, module.tap, p.val.images, p.val.mean, p.val.std, names)
        ce = float(F.cross_entropy(logits, p.val.labels))
        top1 = 100.0 * float((logits.argmax(1) == p.val.labels).float().mean())
        s_feat = _cka_feature(opts.cka_tap, logits, feats)
        ckas = [float(linear_cka(s_feat, _cka_feature(opts.cka_tap, t[LOGITS], t))) for t in p.val_teacher.values()]
        cka = sum(ckas) / len(ckas)
        if not math.isfinite(ce) or not math.isfinite(cka):
            return {"reward": -1e6, "ce": ce, "cka": cka, "top1": top1}
        return {"reward": -(ce + opts.gamma * (1.0 - cka)), "ce": ce, "cka": cka, "top1": top1}

    def scores(self) -> dict[str, Any]:
        """The best evaluation so far (reward -1e6 when none finished) and the normalised weights."""
        best = self.best or {"reward": -1e6, "ce": math.inf, "cka": 0.0, "top1": 0.0, "step": 0}
        return {"reward": best["reward"], "val_ce": best["ce"], "cka": best["cka"], "top1": best["top1"],
                "best_step": int(best["step"]), "ce_weight": self.ce_weight, "weights": dict(self.weights)}

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        return self.scores()

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "candidate": self.candidate.describe(), "path": list(self.candidate.path),
                "terms": list(self.weights)}

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best) if self.best is not None else None, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = {k: (math.nan if v is None else v) for k, v in best.items()} if best else None
        self.stale = int(state.get("stale", 0))
