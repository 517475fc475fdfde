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

Every trial is an ordinary run of the one Trainer (`kdforge.search.proxy_task.ProxyTask`) in its
own directory ``<trials>/<candidate key>/`` (config.yaml, metrics.csv, checkpoints/, result.json):
a trial stopped half-way resumes from its checkpoint when the search asks for the same
candidate again, a finished one is read from its result.json instead of retrained, and a lock
file keeps two processes sharing the directory from training the same candidate at once (the
second waits and reads the first's result). The key is the decision path plus a digest of
everything that determines the outcome (terms, options, student, optimizer, data, teacher
caches), so a directory is never reused for another setting. The optimizer and a per-step
cosine schedule over `proxy_steps` come from the run config (DOT, which needs loss groups the
search does not tune, becomes SGD with DOT's momentum); a non-finite loss (the Trainer's
`NonFiniteLoss`) ends the trial with the best evaluation so far, or reward -1e6 before the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from kdforge.config import RunConfig, ScheduleConfig, TrainerConfig, to_dict
from kdforge.data.base import ImageTensors
from kdforge.data.cache import TeacherCache, build_teacher_cache, cache_expectation
from kdforge.distill.terms import LOGITS
from kdforge.errors import KdforgeError
from kdforge.search.autokd_space import Candidate
from kdforge.search.options import AutoKDOptions
from kdforge.search.proxy_task import (  # noqa: F401  (re-exported: the proxy's public helpers)
    ProxyData,
    ProxyTask,
    apply_masks,
    sparsity_masks,
    student_features,
)
from kdforge.train.build import RunData, build_model
from kdforge.train.checkpoint import atomic_write_text
from kdforge.train.log import json_safe
from kdforge.train.stages import LoopConfig, loop_settings, run_stage

__all__ = ["Proxy", "ProxyData", "ProxyResult", "apply_masks", "prepare_proxy", "sparsity_masks",
           "student_features", "subset_rows"]

# options that steer the search, not a proxy run: they stay out of a trial's directory key
_SEARCH_ONLY = ("trials", "exploration", "study_name")


@dataclass
class ProxyResult:
    reward: float
    val_ce: float
    cka: float
    val_top1: float
    steps: int                     # the step of the best evaluation
    ce_weight: float
    weights: dict[str, float] = field(default_factory=dict)    # term name -> normalised weight
    seconds: float = 0.0
    run_dir: str = ""              # the trial's run directory (kept unless the proxy has no trials dir)

    def attrs(self) -> dict[str, Any]:
        return {"reward": self.reward, "val_ce": self.val_ce, "cka": self.cka, "val_top1": self.val_top1,
                "steps": self.steps, "ce_weight": self.ce_weight, "weights": self.weights,
                "seconds": round(self.seconds, 3), "run_dir": self.run_dir}


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


@contextlib.contextmanager
def _trial_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a trial directory across processes (released when its holder exits or dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:        # no advisory locks on this platform: one process per trials directory
        yield
        return
    with open(run_dir / "trial.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)     # result.json stores NaN/inf as null


class Proxy:
    """Runs candidates: `run(candidate) -> ProxyResult`, all under identical conditions.

    Each run is a Trainer run of `ProxyTask` in `trials_dir / trial_key(candidate)` (a temporary
    directory, deleted afterwards, when `trials_dir` is None).
    """

    def __init__(self, cfg: RunConfig, pdata: ProxyData, opts: AutoKDOptions,
                 trials_dir: str | Path | None = None) -> None:
        self.cfg, self.pdata, self.opts = cfg, pdata, opts
        self.trials_dir = Path(trials_dir) if trials_dir is not None else None
        self.num_classes = pdata.train.num_classes
        self.in_channels = pdata.train.image_shape[0]
        self.settings = self._settings()
        self._fingerprint = self._setting_digest()

    def build_student(self) -> nn.Module:
        torch.manual_seed(self.opts.seed)
        return build_model(self.cfg.student, self.num_classes, self.in_channels, "student")

    def _settings(self) -> RunConfig:
        """The Trainer's settings of every trial: optimizer of the run config, cosine over `proxy_steps`."""
        opts, cfg = self.opts, self.cfg
        optim = cfg.optim
        if optim.name == "dot":       # the proxy has no loss groups: plain SGD with DOT's base momentum
            optim = dataclasses.replace(optim, name="sgd")
        loop = LoopConfig(epochs=math.ceil(opts.proxy_steps / opts.eval_every), batch_size=cfg.data.batch_size,
                          optim=optim, schedule=ScheduleConfig(name="cosine"), grad_clip=None, progress=False)
        base = dataclasses.replace(cfg.trainer, eval_every=1, progress=False, tensorboard=False,
                                   stop_after_steps=None, amp="none", compile=False, channels_last=False,
                                   sync_bn=False)
        return loop_settings(loop, opts.seed, base)

    def _setting_digest(self) -> dict[str, Any]:
        opts = {k: v for k, v in to_dict(self.opts).items() if k not in _SEARCH_ONLY}
        trainer: TrainerConfig = self.settings.trainer
        caches = {tid: {k: c.manifest.get(k) for k in ("teacher_hash", "data_hash", "transform", "epochs_k")}
                  for tid, c in sorted(self.pdata.caches.items())}
        return {"options": opts, "student": to_dict(self.cfg.student), "data": to_dict(self.cfg.data),
                "data_seed": self.cfg.trainer.seed, "optim": to_dict(self.settings.optim),
                "schedule": to_dict(self.settings.schedule), "epochs": trainer.epochs, "caches": caches}

    def _candidate_digest(self, candidate: Candidate) -> dict[str, Any]:
        return {"path": list(candidate.path), "alpha": candidate.alpha,
                "terms": [to_dict(t) for t in candidate.terms]}

    def trial_key(self, candidate: Candidate) -> str:
        """`<decisions>-<digest>`: readable, and different whenever anything that shapes the run differs."""
        blob = json.dumps({"setting": self._fingerprint, "candidate": self._candidate_digest(candidate)},
                          sort_keys=True, default=str)
        slug = re.sub(r"[^A-Za-z0-9._]+", "_", "-".join(str(v) for v in candidate.path)).strip("_")
        return f"{slug[:80]}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def task(self, candidate: Candidate) -> ProxyTask:
        return ProxyTask(self.pdata, self.opts, candidate, self.build_student, self.cfg.data.batch_size)

    def config_text(self, candidate: Candidate) -> str:
        """config.yaml of a trial: what it trains and how (the Trainer's settings)."""
        tree = {"kind": "autokd proxy trial", "candidate": candidate.describe(),
                **self._candidate_digest(candidate), "setting": self._fingerprint,
                "trainer": to_dict(self.settings.trainer)}
        return yaml.safe_dump(json.loads(json.dumps(tree, default=str)), sort_keys=False)

    def run(self, candidate: Candidate) -> ProxyResult:
        start = time.time()
        if self.trials_dir is None:
            with tempfile.TemporaryDirectory(prefix="autokd-trial-") as tmp:
                result = self._run_in(Path(tmp) / self.trial_key(candidate), candidate, start)
                result.run_dir = ""
                return result
        return self._run_in(self.trials_dir / self.trial_key(candidate), candidate, start)

    def _run_in(self, run_dir: Path, candidate: Candidate, start: float) -> ProxyResult:
        from kdforge.train.trainer import Interrupted, NonFiniteLoss

        done = run_dir / "result.json"
        with _trial_lock(run_dir):
            if done.is_file():        # finished earlier (this search, a resumed one or another worker)
                return self._result(json.loads(done.read_text()), run_dir, start)
            task = self.task(candidate)
            try:
                stage = run_stage(run_dir, None, self.settings, task, self.config_text(candidate), quiet=True)
                scores = stage.result
            except NonFiniteLoss as err:     # diverged: the best evaluation so far, or -1e6 before the first
                scores = {**task.scores(), "diverged": str(err)}
                atomic_write_text(done, json.dumps(json_safe(scores), indent=2))
            except Interrupted:       # Ctrl-C / SIGTERM: the trial saved a checkpoint; the search reports it
                raise KeyboardInterrupt from None
            finally:
                task.close()
        return self._result(scores, run_dir, start)

    @staticmethod
    def _result(scores: dict[str, Any], run_dir: Path, start: float) -> ProxyResult:
        return ProxyResult(reward=float(scores["reward"]), val_ce=_number(scores["val_ce"]),
                           cka=_number(scores["cka"]), val_top1=_number(scores["top1"]),
                           steps=int(scores["best_step"]), ce_weight=float(scores["ce_weight"]),
                           weights={k: float(v) for k, v in scores["weights"].items()},
                           seconds=time.time() - start, run_dir=str(run_dir))
