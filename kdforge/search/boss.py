"""BOSS (Bayesian Optimization meets Self-Distillation, ICCV 2023): BO trials that distil from earlier trials.

Plain Bayesian optimisation keeps only (configuration, score) pairs. BOSS also keeps every
trial's best checkpoint in a pool and lets later trials learn from it:

* warm-up: the first `warmup` trials are plain BO trials (TPE proposes lr, weight decay,
  1 - momentum on log scales and the batch size), trained from scratch with CE;
* BOSS trials: TPE also proposes alpha; two distinct checkpoints are drawn (seeded by the trial's
  position) from the `top_k` finished trials by validation score: one initialises the student,
  the other is the frozen teacher (same architecture), and the loss is
  alpha * CE + (1 - alpha) * MSE(student logits, teacher logits) (raw logits, as the official code);
  with ``pretrained: false`` the student starts from scratch and only the teacher is drawn;
* each finished trial's best checkpoint joins the pool, so knowledge accumulates over trials.

As in the official code (sooperset/boss), the two phases are separate Optuna studies
(``<name>_warmup``, ``<name>_boss``): the BOSS-phase TPE does not see warm-up scores, only their
checkpoints (``merge_studies: true`` uses one study). Unlike it, trials are scored on a
validation split (``data.val_fraction`` > 0), never on the test split. ``mode: bo`` is the
plain-BO baseline: every trial CE from scratch, one study ``<name>_bo``, same proposals as
BOSS's warm-up for the same seed. Each trial is a normal kdforge run (SGD, one cosine cycle)
in ``out/trials/<phase>_<number>``; ``out/best.yaml`` is the best trial's config.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdforge.config import RunConfig, load_config, to_dict
from kdforge.errors import KdforgeError
from kdforge.registry import METHODS
from kdforge.search.options import BOSSOptions
from kdforge.search.storage import (
    Progress,
    complete_trials,
    fail_trial,
    open_study,
    require_optuna,
    storage_url,
)
from kdforge.search.tree_study import Callback
from kdforge.train.build import RunData, load_data
from kdforge.train.checkpoint import atomic_write_text
from kdforge.train.trainer import Trainer

WARMUP, BOSS, BO = "warmup", "boss", "bo"


def study_names(opts: BOSSOptions) -> dict[str, str]:
    """Phase -> study name for this mode."""
    if opts.mode == BO:
        return {BO: f"{opts.study_name}_bo"}
    if opts.merge_studies:
        return {WARMUP: opts.study_name, BOSS: opts.study_name}
    return {WARMUP: f"{opts.study_name}_warmup", BOSS: f"{opts.study_name}_boss"}


def sampler_seed(seed: int, phase: str, count: int) -> int:
    """TPE seed for the next trial of a phase: fresh after a resume, equal for BO and BOSS warm-up."""
    key = 1 if phase == BOSS else 0
    return (int(seed) * 1_000_003 + key * 10_007 + int(count)) % (2**31 - 1)


def pool(studies: dict[str, Any]) -> list[Any]:
    """Finished trials with a checkpoint, best validation score first (ties: earlier phase, number).

    `studies` maps phase -> study; a study serving both phases (merged) is read once.
    """
    out, seen = [], set()
    for study in studies.values():
        if study.study_name in seen:
            continue
        seen.add(study.study_name)
        for t in complete_trials(study):
            ckpt = t.user_attrs.get("checkpoint_path")
            if ckpt and Path(ckpt).is_file():
                out.append(t)
    order = {WARMUP: 0, BO: 0, BOSS: 1}
    out.sort(key=lambda t: (-float(t.user_attrs["score"]), order.get(t.user_attrs.get("phase"), 0), t.number))
    return out


def ranked_all(studies: dict[str, Any]) -> list[Any]:
    """Every finished trial of the distinct studies."""
    seen: dict[str, Any] = {s.study_name: s for s in studies.values()}
    return [t for s in seen.values() for t in complete_trials(s)]


def open_studies(names: dict[str, str], url: str) -> dict[str, Any]:
    """Phase -> study, opening each distinct study once."""
    opened = {name: open_study(name, url) for name in dict.fromkeys(names.values())}
    return {phase: opened[name] for phase, name in names.items()}


def draw(top: list[Any], position: int, seed: int, pretrained: bool) -> tuple[Any | None, Any]:
    """(student-initialisation trial or None, teacher trial) from the top-k, seeded by trial position."""
    rng = random.Random(int(seed) * 1_000_003 + int(position))
    if pretrained:
        if len(top) < 2:
            raise KdforgeError("boss: a BOSS trial needs at least 2 finished trials with checkpoints in the "
                               "pool")
        init, teacher = rng.sample(top, 2)
        return init, teacher
    if not top:
        raise KdforgeError("boss: a BOSS trial needs a finished trial with a checkpoint in the pool")
    return None, rng.choice(top)


def suggest(trial: Any, opts: BOSSOptions, with_alpha: bool) -> dict[str, float]:
    """The card's search space (alpha only in BOSS trials)."""
    hp = {"lr": trial.suggest_float("lr", opts.lr[0], opts.lr[1], log=True),
          "weight_decay": trial.suggest_float("weight_decay", opts.weight_decay[0], opts.weight_decay[1],
                                              log=True),
          "one_minus_momentum": trial.suggest_float("one_minus_momentum", opts.one_minus_momentum[0],
                                                    opts.one_minus_momentum[1], log=True),
          "batch_size": trial.suggest_int("batch_size", int(opts.batch_size[0]), int(opts.batch_size[1]))}
    if with_alpha:
        hp["alpha"] = trial.suggest_float("alpha", opts.alpha[0], opts.alpha[1])
    return hp


def trial_config(cfg: RunConfig, opts: BOSSOptions, hp: dict[str, float], position: int,
                 init_ckpt: str | None = None, teacher_ckpt: str | None = None) -> RunConfig:
    """One trial as a normal run config: SGD + one cosine cycle; CE, or CE + logit MSE to a pool teacher."""
    tree = to_dict(cfg)
    tree["optim"].update(name="sgd", lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]),
                         momentum=1.0 - float(hp["one_minus_momentum"]), nesterov=False)
    tree["data"]["batch_size"] = int(hp["batch_size"])
    tree["schedule"].update(name="cosine", warmup_epochs=0.0)
    tree["trainer"].update(epochs=int(opts.epochs or cfg.trainer.epochs),
                           seed=cfg.trainer.seed + 1 + position, progress=False, tensorboard=False,
                           stop_after_steps=None)
    tree["method"] = {"name": None, "args": {}}
    tree["teachers"] = {}
    if teacher_ckpt is None:
        tree["teacher"] = None
        tree["terms"] = [{"loss": "ce", "teacher": None, "group": "task"}]
    else:
        alpha = float(hp["alpha"])
        tree["teacher"] = {"name": cfg.student.name, "args": dict(cfg.student.args),
                           "checkpoint": teacher_ckpt}
        tree["terms"] = [{"loss": "ce", "teacher": None, "group": "task", "weight": alpha},
                         {"loss": "fitnet", "name": "sd_mse", "student": "logits", "teacher": "logits",
                          "weight": 1.0 - alpha}]
    tree["student"]["checkpoint"] = init_ckpt
    return load_config(None, [], base=tree)


def _label(trial: Any) -> str:
    return f"{trial.user_attrs.get('phase', '?')}/{trial.number}"


def run_boss(cfg: RunConfig, opts: BOSSOptions, out: str | Path, storage: str | None = None,
             trials: int | None = None, callbacks: Sequence[Callback] = (), quiet: bool = False,
             data: RunData | None = None) -> dict[str, Any]:
    """Run (or resume) the BOSS / plain-BO search until `trials` trials are finished; summary dict."""
    optuna = require_optuna()
    if cfg.data.val_fraction <= 0:
        raise KdforgeError("boss scores trials on a validation split; set data.val_fraction (e.g. 0.1)")
    total = int(trials or opts.trials)
    if opts.mode == BOSS and opts.warmup >= total:
        raise KdforgeError(f"boss: warmup ({opts.warmup}) must be smaller than the number of trials "
                           f"({total})")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage, out)
    names = study_names(opts)
    data = data or load_data(cfg.data, cfg.trainer.seed)
    progress = Progress(opts.mode, total, quiet)
    running: tuple[Any, Any] | None = None
    try:
        while True:
            studies = open_studies(names, url)
            done = {phase: sum(1 for t in complete_trials(s) if t.user_attrs.get("phase") == phase)
                    for phase, s in studies.items()}
            position = sum(done.values())
            if position >= total:
                break
            phase = BO if opts.mode == BO else (WARMUP if done[WARMUP] < opts.warmup else BOSS)
            sampler = optuna.samplers.TPESampler(n_startup_trials=opts.tpe_startup,
                                                 seed=sampler_seed(opts.seed, phase, done[phase]))
            study = open_study(names[phase], url, sampler=sampler)
            trial = study.ask()
            running = (study, trial)
            hp = suggest(trial, opts, with_alpha=phase == BOSS)
            init = teacher = None
            if phase == BOSS:
                init, teacher = draw(pool(studies)[: opts.top_k], position, opts.seed, opts.pretrained)
            run_dir = out / "trials" / f"{phase}_{trial.number:04d}"
            if run_dir.exists():          # left by a killed attempt of this trial number
                shutil.rmtree(run_dir)
            tcfg = trial_config(cfg, opts, hp, position,
                                init.user_attrs["checkpoint_path"] if init is not None else None,
                                teacher.user_attrs["checkpoint_path"] if teacher is not None else None)
            t0 = time.time()
            result = Trainer(tcfg, run_dir, data=data, quiet=True).fit()
            score = float(result[f"best_{data.eval_name}_top1"])
            attrs = {"phase": phase, "score": score, "position": position, "run_dir": str(run_dir.resolve()),
                     "checkpoint_path": str((run_dir / "checkpoints" / "best.safetensors").resolve()),
                     "teacher_trial": _label(teacher) if teacher is not None else None,
                     "init_trial": _label(init) if init is not None else None,
                     "seconds": round(time.time() - t0, 2)}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            frozen = study.tell(trial, score)
            running = None
            best = max([score] + [float(t.user_attrs["score"]) for t in pool(studies)])
            what = " ".join(f"{k}={v:.3g}" for k, v in hp.items())
            if teacher is not None:
                what += f" teacher={_label(teacher)}" + (f" init={_label(init)}" if init is not None else "")
            progress.trial(position + 1, score, best, time.time() - t0, f"{phase} {what}")
            for callback in callbacks:
                callback(study, frozen)
    except KeyboardInterrupt:
        if running is not None:
            fail_trial(*running)
        raise KdforgeError(f"{opts.mode} search interrupted; finished trials are kept in {url}; run the same "
                           "command again to resume") from None
    except BaseException:
        if running is not None:
            fail_trial(*running)
        raise
    return _summary(cfg, opts, out, url, names)


def _summary(cfg: RunConfig, opts: BOSSOptions, out: Path, url: str, names: dict[str, str]) -> dict[str, Any]:
    studies = open_studies(names, url)
    ranked = pool(studies)
    if not ranked:
        raise KdforgeError(f"{opts.mode}: no finished trial with a checkpoint")
    best = ranked[0]
    every = sorted((t for t in ranked_all(studies) if "position" in t.user_attrs),
                   key=lambda t: t.user_attrs["position"])
    curve, running_best = [], float("-inf")
    for t in every:
        running_best = max(running_best, float(t.user_attrs["score"]))
        curve.append(running_best)
    saved = Path(best.user_attrs["run_dir"]) / "config.yaml"
    if saved.is_file():
        atomic_write_text(out / "best.yaml", f"# best {opts.mode} trial {_label(best)}: validation top-1 "
                                             f"{best.user_attrs['score']:.2f}\n" + saved.read_text())
    summary = {"kind": opts.mode, "studies": list(dict.fromkeys(names.values())), "storage": url,
               "trials_done": len(every), "best_value": float(best.user_attrs["score"]),
               "best_trial": _label(best), "best_params": dict(best.params),
               "checkpoint": best.user_attrs["checkpoint_path"], "run_dir": best.user_attrs["run_dir"],
               "recipe": str(out / "best.yaml"),
               "best_so_far": curve}
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2))
    return summary


METHODS.register("boss", run_boss, family="search",
                 paper="Lee et al., BOSS: Bayesian Optimization Meets Self-Distillation (ICCV 2023)",
                 summary="TPE over lr/wd/momentum/batch where later trials self-distil (logit MSE) from and "
                         "start from top-k earlier checkpoints; kdforge search boss CONFIG")
