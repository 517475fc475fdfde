"""Auto-KD (Li et al., ICCV 2023): search a distiller with Monte Carlo tree search, write it as a recipe.

The space (kdforge.search.autokd_space) is built from the options and from what kdforge
registers: every depth is one decision (input, global / intra-spatial / inter-spatial transform,
distance incl. registered losses, temperature, weight). Each complete path is scored by a short
proxy training on a data subset from cached teacher outputs (kdforge.search.proxy; no teacher
forward during the search) with reward -(val CE + gamma * (1 - CKA)); rewards are backed up the
tree (kdforge.search.mcts) and every evaluation is an Optuna trial (kdforge.search.tree_study),
so an interrupted search resumes without losing finished trials.

Multi-layer and multi-teacher: the input `multi` distils every feature layer at once; with
several teachers in the run config every term is repeated per teacher. Their weights are
training-free: softmax over layers (per teacher) / over teachers of the initial representation
gap 1 - CKA(untrained student, teacher) on the validation split, temperature `weight_tau`.

Output in `out`: ``search.db`` (the study, unless --storage), ``cache/`` (teacher outputs),
``trials/<candidate key>/`` (each proxy training: an ordinary Trainer run directory, resumed when
an interrupted search asks for the same candidate again; the trial's ``run_dir`` attribute names it),
``best.yaml`` (a normal RunConfig: CE + the searched terms with their measured weights, run it
with ``kdforge train out/best.yaml``) and ``best.json`` (the path, reward parts, weights).
Options: kdforge.search.options.AutoKDOptions (``X.search.yaml`` next to the config, or
``search.key=value`` overrides). The official repository (lilujunai/Auto-KD) holds no code;
unpublished details (option lists, c, gamma, sparsity) follow the method card and are options.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import RunConfig, TermConfig, dump_config, load_config, to_dict
from kdforge.distill.terms import LOGITS
from kdforge.errors import KdforgeError
from kdforge.losses import autokd as autokd_loss  # noqa: F401  (registers the autokd_distill loss)
from kdforge.models.taps import FeatureTap
from kdforge.registry import METHODS
from kdforge.search.autokd_space import MULTI, AutoKDSpace, Candidate
from kdforge.search.cka import linear_cka, training_free_weights
from kdforge.search.mcts import Path as DecisionPath
from kdforge.search.options import AutoKDOptions
from kdforge.search.proxy import Proxy, ProxyData, prepare_proxy, student_features
from kdforge.search.storage import open_study, require_optuna, storage_url
from kdforge.search.tree_study import Callback, fresh_count, run_tree_search
from kdforge.train.build import build_model, load_data
from kdforge.train.checkpoint import atomic_write_text


@dataclass
class AutoKDSetup:
    """Everything the search needs besides the study: the space, the proxy, training-free weights."""

    space: AutoKDSpace
    proxy: Proxy
    teacher_weights: dict[str, float]
    layer_weights: dict[str, dict[str, float]]     # teacher id -> feature layer -> weight

    def weights_for(self, path: DecisionPath) -> dict[tuple[str, str], float]:
        out = {}
        for tid, w_t in self.teacher_weights.items():
            for layer in self.space.layers:
                w_l = self.layer_weights[tid].get(layer, 1.0) if path[0] == MULTI else 1.0
                out[(tid, layer)] = w_t * w_l
        return out

    def candidate(self, path: DecisionPath) -> Candidate:
        return self.space.candidate(path, self.weights_for(path))


def _load_teachers(cfg: RunConfig, num_classes: int, in_channels: int) -> dict[str, nn.Module]:
    teachers = {}
    for tid, tcfg in cfg.all_teachers().items():
        if not tcfg.checkpoint:
            raise KdforgeError(f"autokd: teacher '{tid}' ({tcfg.name}) needs a checkpoint (the search caches "
                               "its outputs once from it)")
        teachers[tid] = build_model(tcfg, num_classes, in_channels, f"teacher '{tid}'").eval()
    if not teachers:
        raise KdforgeError("autokd: the run config defines no teacher (set teacher.name and "
                           "teacher.checkpoint)")
    return teachers


def setup_autokd(cfg: RunConfig, opts: AutoKDOptions, out: Path, quiet: bool = False) -> AutoKDSetup:
    """Load data, cache the teachers' outputs (the only teacher passes), probe shapes, build the space."""
    if cfg.data.val_fraction <= 0:
        raise KdforgeError("autokd scores candidates on a validation split; set data.val_fraction (e.g. 0.1)")
    torch.manual_seed(cfg.trainer.seed)
    data = load_data(cfg.data, cfg.trainer.seed)
    c = data.train.image_shape[0]
    teachers = _load_teachers(cfg, data.train.num_classes, c)
    t_taps = sorted({t for t in opts.layers.values()} | {opts.cka_tap})
    pdata = prepare_proxy(cfg, data, teachers, {tid: t_taps for tid in teachers}, opts, out / "cache", quiet)
    proxy = Proxy(cfg, pdata, opts, out / "trials")
    student = proxy.build_student()
    s_taps = sorted({s for s in opts.layers} | ({opts.cka_tap} - {LOGITS}))
    with FeatureTap(student, s_taps) as tap:
        logits, feats = student_features(student, tap, pdata.val.images, pdata.val.mean, pdata.val.std,
                                         s_taps)
    student_shapes = {LOGITS: (2, *logits.shape[1:]), **{k: (2, *v.shape[1:]) for k, v in feats.items()}}
    teacher_shapes = {tid: {k: (2, *v.shape[1:]) for k, v in outs.items()}
                      for tid, outs in pdata.val_teacher.items()}
    space = AutoKDSpace(opts, student_shapes, teacher_shapes, len(pdata.train))
    t_w, l_w = _training_free(space, pdata, opts, logits, feats)
    return AutoKDSetup(space, proxy, t_w, l_w)


def _training_free(space: AutoKDSpace, pdata: ProxyData, opts: AutoKDOptions, logits: torch.Tensor,
                   feats: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Teacher and per-teacher layer weights from the untrained student's CKA gaps (no training)."""
    s_all = {LOGITS: logits, **feats}
    tids = list(pdata.val_teacher)
    gaps_t = [1.0 - float(linear_cka(s_all[opts.cka_tap], pdata.val_teacher[tid][opts.cka_tap]))
              for tid in tids]
    teacher_w = dict(zip(tids, training_free_weights(gaps_t, opts.weight_tau)))
    layer_w: dict[str, dict[str, float]] = {}
    for tid in tids:
        names = space.feature_layers
        if not names:
            layer_w[tid] = {}
            continue
        gaps = [1.0 - float(linear_cka(s_all[space.layers[n][0]], pdata.val_teacher[tid][space.layers[n][1]]))
                for n in names]
        layer_w[tid] = dict(zip(names, training_free_weights(gaps, opts.weight_tau)))
    return teacher_w, layer_w


def recipe(cfg: RunConfig, candidate: Candidate, ce_weight: float, weights: dict[str, float]) -> RunConfig:
    """The run config with terms = CE (1 - alpha) + the candidate's terms at their measured weights."""
    terms = [TermConfig(loss="ce", teacher=None, group="task", weight=float(ce_weight))]
    terms += [replace(t, weight=float(weights.get(t.name, t.weight))) for t in candidate.terms]
    tree = to_dict(cfg)
    tree["terms"] = [to_dict(t) for t in terms]
    tree["method"] = {"name": None, "args": {}}
    return load_config(None, [], base=tree)


def run_autokd(cfg: RunConfig, opts: AutoKDOptions, out: str | Path, storage: str | None = None,
               trials: int | None = None, callbacks: Sequence[Callback] = (),
               quiet: bool = False) -> dict[str, Any]:
    """Search (or resume) and write ``best.yaml`` / ``best.json``; returns the summary dict."""
    require_optuna()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    budget = int(trials or opts.trials)
    url = storage_url(storage, out)
    setup = setup_autokd(cfg, opts, out, quiet)
    study = open_study(opts.study_name, url)
    signature = setup.space.signature()
    stored = study.user_attrs.get("space_signature")
    if stored is None:
        study.set_user_attr("space_signature", signature)
        study.set_user_attr("options", to_dict(opts))
    elif stored != signature:
        raise KdforgeError(f"study '{opts.study_name}' in {url} was made for another search space (options "
                           "or models changed); use another --out, --storage or search.study_name")

    def evaluate(path: DecisionPath) -> tuple[float, dict[str, Any]]:
        cand = setup.candidate(path)
        result = setup.proxy.run(cand)
        return result.reward, {**result.attrs(), "distiller": cand.describe()}

    tree = run_tree_search(study, setup.space.options, evaluate, trials=budget, c=opts.exploration,
                           seed=opts.seed, kind="autokd", describe=lambda p: setup.candidate(p).describe(),
                           callbacks=callbacks, quiet=quiet,
                           strategy="random" if opts.strategy == "random" else "uct")
    found = tree.best_path()
    if found is None:
        raise KdforgeError("autokd: no finished trial to pick a distiller from")
    path, reward = found
    best_trial = _trial_of(study, path)
    attrs = best_trial.user_attrs
    cand = setup.candidate(path)
    best_cfg = recipe(cfg, cand, attrs["ce_weight"], attrs["weights"])
    header = (f"# Auto-KD searched distiller: {cand.describe()}\n# proxy reward {reward:.4f} (val CE "
              f"{attrs['val_ce']:.4f}, CKA {attrs['cka']:.4f}); trial {best_trial.number} of study "
              f"'{opts.study_name}'\n")
    atomic_write_text(out / "best.yaml", header + dump_config(best_cfg))
    summary = {"kind": "autokd", "study": opts.study_name, "storage": url,
               "trials_done": fresh_count(study), "best_value": reward, "best_path": list(path),
               "best_distiller": cand.describe(), "best_trial": best_trial.number,
               "recipe": str(out / "best.yaml"),
               "val_ce": attrs["val_ce"], "cka": attrs["cka"], "ce_weight": attrs["ce_weight"],
               "weights": attrs["weights"], "teacher_weights": setup.teacher_weights,
               "layer_weights": setup.layer_weights}
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2))
    return summary


def _trial_of(study: Any, path: DecisionPath) -> Any:
    from kdforge.search.storage import complete_trials

    for trial in complete_trials(study):
        if tuple(trial.user_attrs.get("path", ())) == tuple(path) and not trial.user_attrs.get("cached"):
            return trial
    raise KdforgeError(f"autokd: no evaluated trial holds path {list(path)}")


METHODS.register("autokd", run_autokd, family="search",
                 paper="Li et al., Auto-KD: Automated Knowledge Distillation via Monte Carlo Tree Search "
                       "(ICCV 2023)",
                 summary="MCTS over transform x distance x weight distillers scored by cached-teacher proxy "
                         "runs; kdforge search autokd CONFIG")
