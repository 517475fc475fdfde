"""Auto-KD's cheap proxy: short student training on a data subset from cached teacher outputs.

Why each piece (the card's accelerations): the teacher runs once, before the search, over K fixed
augmented views of the subset (`kdforge.data.cache`) and over the un-augmented validation split,
so no trial runs a teacher forward pass; the proxy trains on `subset` of the training split
for at most `proxy_steps` steps, stops early when the reward stops improving, and can train a
student with a fixed random weight mask (`sparsity`). Every candidate sees the same subset,
views, batch order and student initialisation, so rewards are comparable across trials.

The candidate's distillation terms are normalised before training: on the first batch, with the
untrained student, each term's value D_0 is measured next to the cross-entropy CE_0 and the term
gets weight alpha * w * CE_0 / D_0 (w: training-free layer / teacher weight), CE gets 1 - alpha.
So alpha, not a loss's raw scale, sets the balance (the card's "normalise the loss weight per
option"); the measured weights are what the written recipe uses.

Reward = -(validation CE + gamma * (1 - linear CKA(student, teacher features on validation))),
the best value over the proxy's evaluations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import RunConfig
from kdforge.data.base import ImageTensors
from kdforge.data.cache import TeacherCache, build_teacher_cache, cache_expectation
from kdforge.data.transforms import apply_crop_flip, to_normalized
from kdforge.distill.terms import LOGITS, Term, term_from_config
from kdforge.errors import KdforgeError
from kdforge.losses.base import LossContext
from kdforge.models.taps import FeatureTap
from kdforge.search.autokd_space import Candidate
from kdforge.search.cka import linear_cka
from kdforge.search.options import AutoKDOptions
from kdforge.train.build import RunData, build_model
from kdforge.train.optim import build_optimizer
from kdforge.train.trainer import epoch_order

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
class ProxyResult:
    reward: float
    val_ce: float
    cka: float
    val_top1: float
    steps: int
    ce_weight: float
    weights: dict[str, float] = field(default_factory=dict)    # term name -> normalised weight
    seconds: float = 0.0

    def attrs(self) -> dict[str, Any]:
        return {"reward": self.reward, "val_ce": self.val_ce, "cka": self.cka, "val_top1": self.val_top1,
                "steps": self.steps, "ce_weight": self.ce_weight, "weights": self.weights,
                "seconds": round(self.seconds, 3)}


def subset_rows(n: int, fraction: float, seed: int, minimum: int) -> Tensor:
    """Sorted positions of a seeded random `fraction` of n samples (at least `minimum`)."""
    m = min(n, max(minimum, int(round(n * fraction))))
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 104729)
    return torch.randperm(n, generator=gen)[:m].sort().values


def _open_or_build(teacher: nn.Module, data: ImageTensors, path: Path, *, epochs_k: int, seed: int,
                   crop_padding: int, flip: bool, taps: list[str], quiet: bool) -> TeacherCache:
    expect = cache_expectation(teacher, data, seed=seed, crop_padding=crop_padding, flip=flip, mean=data.mean,
                               std=data.std, taps=taps)
    expect["epochs_k"] = epochs_k
    if path.exists():
        try:
            return TeacherCache.open(path, expect=expect, taps=taps)
        except KdforgeError:
            pass   # stale or damaged: rebuild below
    build_teacher_cache(teacher, data, path, epochs_k=epochs_k, seed=seed, crop_padding=crop_padding,
                        flip=flip, mean=data.mean, std=data.std, taps=taps, overwrite=True,
                        progress=not quiet)
    return TeacherCache.open(path, expect=expect, taps=taps)


def prepare_proxy(cfg: RunConfig, data: RunData, teachers: dict[str, nn.Module], taps: dict[str, list[str]],
                  opts: AutoKDOptions, cache_root: Path, quiet: bool = True) -> ProxyData:
    """Carve the subset and cache every teacher's outputs on it (K views) and on validation (raw)."""
    aug = cfg.data.augment
    rows = subset_rows(len(data.train), opts.subset, opts.seed, min(len(data.train), cfg.data.batch_size))
    train = data.train.subset(rows)
    caches, val_teacher = {}, {}
    for tid, teacher in teachers.items():
        feat_taps = sorted({t for t in taps[tid] if t != LOGITS})
        caches[tid] = _open_or_build(teacher, train, cache_root / f"{tid}-train", epochs_k=opts.cache_epochs,
                                     seed=opts.seed, crop_padding=aug.crop_padding, flip=aug.flip,
                                     taps=feat_taps, quiet=quiet)
        val_cache = _open_or_build(teacher, data.eval, cache_root / f"{tid}-val", epochs_k=1, seed=opts.seed,
                                   crop_padding=0, flip=False, taps=feat_taps, quiet=quiet)
        val_teacher[tid] = val_cache.lookup(0, torch.arange(len(data.eval)))
    return ProxyData(train, data.eval, caches, val_teacher, aug.crop_padding, aug.flip)


def _teacher_shape(cache: TeacherCache, tap: str, n: int = 2) -> tuple[int, ...]:
    key = LOGITS if tap == LOGITS else f"tap.{tap}"
    return (n, *cache.manifest["shapes"][key])


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
    """Student logits and tapped features on un-augmented images (eval mode)."""
    was = student.training
    student.eval()
    logits, feats = [], {n: [] for n in names}
    for i in range(0, images.shape[0], batch):
        tap.clear()
        logits.append(student(to_normalized(images[i:i + batch], mean, std)).float())
        for n in names:
            feats[n].append(tap.features[n].float())
    student.train(was)
    return torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}


def _cka_feature(name: str, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
    return logits if name == LOGITS else feats[name]


class Proxy:
    """Runs candidates: `run(candidate) -> ProxyResult`, all under identical conditions."""

    def __init__(self, cfg: RunConfig, pdata: ProxyData, opts: AutoKDOptions) -> None:
        self.cfg, self.pdata, self.opts = cfg, pdata, opts
        self.num_classes = pdata.train.num_classes
        self.in_channels = pdata.train.image_shape[0]

    def build_student(self) -> nn.Module:
        torch.manual_seed(self.opts.seed)
        return build_model(self.cfg.student, self.num_classes, self.in_channels, "student")

    def _batch(self, order: Tensor, k: int, bs: int, epoch: int) -> tuple[Tensor, Tensor, Tensor,
                                                                          dict[str, dict[str, Tensor]]]:
        p = self.pdata
        index = order[k * bs:(k + 1) * bs]
        first = next(iter(p.caches.values()))
        images = p.train.images[index]
        if p.crop_padding > 0 or p.flip:
            v = first.view_params(epoch, index)
            images = apply_crop_flip(images, v["dx"], v["dy"], v["flip"], p.crop_padding)
        x = to_normalized(images, p.train.mean, p.train.std)
        outs = {tid: cache.lookup(epoch, index) for tid, cache in p.caches.items()}
        return index, x, p.train.labels[index], outs

    def _losses(self, student: nn.Module, tap: FeatureTap, terms: list[Term], x: Tensor, y: Tensor,
                index: Tensor, outs: dict[str, dict[str, Tensor]], step: int) -> tuple[Tensor, list[Tensor]]:
        tap.clear()
        logits = student(x)
        ctx = LossContext(target=y, index=index, student_logits=logits, step=step)
        values = []
        for term in terms:
            s_in = [logits if n == LOGITS else tap.features[n] for n in term.student_taps]
            t_all = outs[term.teacher_id]
            ctx.teacher_logits = t_all[LOGITS]
            values.append(term(s_in, [t_all[n] for n in term.teacher_taps], ctx))
        return F.cross_entropy(logits, y), values

    def run(self, candidate: Candidate) -> ProxyResult:
        start = time.time()
        opts = self.opts
        student = self.build_student()
        terms = [term_from_config(tc) for tc in candidate.terms]
        s_taps = sorted({n for t in terms for n in t.student_taps if n != LOGITS}
                        | ({opts.cka_tap} if opts.cka_tap != LOGITS else set()))
        tap = FeatureTap(student, s_taps)
        try:
            return self._run(student, tap, terms, candidate, start)
        finally:
            tap.remove()

    def _run(self, student: nn.Module, tap: FeatureTap, terms: list[Term], cand: Candidate,
             start: float) -> ProxyResult:
        opts, p = self.opts, self.pdata
        logits, feats = student_features(student, tap, p.train.images[:2], p.train.mean, p.train.std,
                                         tap.names)
        for term in terms:
            s_shapes = [tuple((logits if n == LOGITS else feats[n]).shape) for n in term.student_taps]
            t_shapes = [_teacher_shape(p.caches[term.teacher_id], n) for n in term.teacher_taps]
            term.setup(s_shapes, t_shapes, len(p.train))
        masks = sparsity_masks(student, opts.sparsity, opts.seed)
        apply_masks(student, masks)
        bs = min(self.cfg.data.batch_size, len(p.train))
        per_epoch = max(1, len(p.train) // bs)
        order = epoch_order(len(p.train), opts.seed, 0)
        ce_weight, weights = self._normalise(student, tap, terms, cand, order, bs)
        optim_cfg = self.cfg.optim
        if optim_cfg.name == "dot":       # the proxy has no loss groups: plain SGD with DOT's base momentum
            optim_cfg = dataclasses.replace(optim_cfg, name="sgd")
        params = list(student.parameters()) + [q for t in terms for q in t.parameters()]
        optimizer = build_optimizer(optim_cfg, params)
        base = [g["lr"] for g in optimizer.param_groups]
        best: dict[str, float] | None = None
        stale = 0
        student.train()
        for step in range(opts.proxy_steps):
            epoch, k = divmod(step, per_epoch)
            if k == 0:
                order = epoch_order(len(p.train), opts.seed, epoch)
            factor = 0.5 * (1 + math.cos(math.pi * step / opts.proxy_steps))
            for g, b in zip(optimizer.param_groups, base):
                g["lr"] = b * factor
            index, x, y, outs = self._batch(order, k, bs, epoch)
            ce, values = self._losses(student, tap, terms, x, y, index, outs, step)
            loss = ce * ce_weight + sum(values, torch.zeros(()))
            if not torch.isfinite(loss):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            apply_masks(student, masks)
            if (step + 1) % opts.eval_every == 0 or step + 1 == opts.proxy_steps:
                ev = self.evaluate(student, tap)
                ev["steps"] = step + 1
                if best is None or ev["reward"] > best["reward"]:
                    best, stale = ev, 0
                else:
                    stale += 1
                    if stale >= opts.patience:
                        break
        if best is None:      # diverged before the first evaluation
            best = self.evaluate(student, tap)
            best["steps"] = 0
            if not math.isfinite(best["reward"]):
                best = {"reward": -1e6, "val_ce": math.inf, "cka": 0.0, "top1": 0.0, "steps": 0}
        return ProxyResult(reward=best["reward"], val_ce=best["val_ce"], cka=best["cka"],
                           val_top1=best["top1"], steps=int(best["steps"]), ce_weight=ce_weight,
                           weights=weights, seconds=time.time() - start)

    def _normalise(self, student: nn.Module, tap: FeatureTap, terms: list[Term], cand: Candidate,
                   order: Tensor, bs: int) -> tuple[float, dict[str, float]]:
        """Weights from the first batch: alpha * w * CE_0 / D_0 per term; BN statistics left untouched."""
        snapshot = copy.deepcopy([student.state_dict(), [t.state_dict() for t in terms]])
        student.train()
        with torch.no_grad():
            index, x, y, outs = self._batch(order, 0, bs, 0)
            ce, values = self._losses(student, tap, terms, x, y, index, outs, 0)
        student.load_state_dict(snapshot[0])
        for t, s in zip(terms, snapshot[1]):
            t.load_state_dict(s)
        weights = {}
        for term, value in zip(terms, values):
            d0 = float(value) / term.weight if term.weight else float(value)
            scale = float(ce) / d0 if d0 > 0 and math.isfinite(d0) else 1.0
            term.weight = min(_WEIGHT_RANGE[1], max(_WEIGHT_RANGE[0], cand.alpha * term.weight * scale))
            weights[term.name] = term.weight
        return 1.0 - cand.alpha, weights

    @torch.no_grad()
    def evaluate(self, student: nn.Module, tap: FeatureTap) -> dict[str, float]:
        """Validation CE, top-1, CKA to each teacher on `cka_tap` (mean over teachers), reward."""
        p, opts = self.pdata, self.opts
        names = [opts.cka_tap] if opts.cka_tap != LOGITS else []
        logits, feats = student_features(student, tap, p.val.images, p.val.mean, p.val.std, names)
        ce = float(F.cross_entropy(logits, p.val.labels))
        top1 = 100.0 * float((logits.argmax(1) == p.val.labels).float().mean())
        s_feat = _cka_feature(opts.cka_tap, logits, feats)
        ckas = [float(linear_cka(s_feat, _cka_feature(opts.cka_tap, t[LOGITS], t)))
                for t in p.val_teacher.values()]
        cka = sum(ckas) / len(ckas)
        if not math.isfinite(ce) or not math.isfinite(cka):
            return {"reward": -1e6, "val_ce": ce, "cka": cka, "top1": top1}
        return {"reward": -(ce + opts.gamma * (1.0 - cka)), "val_ce": ce, "cka": cka, "top1": top1}
