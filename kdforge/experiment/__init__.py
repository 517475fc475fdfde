"""`kdforge experiment RECIPE`: a method against its baseline over paired seeds, as a recipe.

See `kdforge.experiment.recipe` for the recipe format, `runner` for the run directories and
`report` for the results JSON (`results/methods/<id>.json`), its plot and results/methods.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.experiment.recipe import ExperimentConfig, load_experiment
from kdforge.experiment.report import build_report, write_report
from kdforge.experiment.runner import _subprocess, parse_only, plan, run_cells, select

__all__ = ["ExperimentConfig", "load_experiment", "run_experiment"]


def run_experiment(path: str | Path, jobs: int = 1, only: str | None = None, out: str | Path | None = None,
                   results: str | Path | None = None, profile: str | None = None, seeds: list[int] | None = None,
                   report: bool = True, quiet: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the unfinished cells of the experiment (all, or those `only` selects) and write its report.

    Returns the report (also written to `results`, default results/methods/<id>.json, once every
    cell has finished), or a status dict when cells are still missing.
    """
    if jobs < 1:
        raise KdforgeError(f"--jobs must be >= 1, got {jobs}")
    cfg = load_experiment(path, profile, seeds)
    extra = list(overrides or [])
    if any("=" not in o for o in extra):
        raise KdforgeError(f"experiment overrides must look like key.sub=value, got {extra}")
    cfg.overrides = [*cfg.overrides, *extra]       # every arm (not the stages); recorded in the report
    tag = cfg.id + (f"-{profile}" if profile else "")
    if extra:       # other overrides, other runs: never reuse the cells of the plain experiment
        import hashlib

        tag += "-" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8]
    default_root = Path("runs") / "experiments" / tag
    root = Path(out) if out is not None else default_root
    stages, arms = plan(cfg, root)
    selection = parse_only(only)
    log = (lambda _msg: None) if quiet else (lambda msg: print(msg, flush=True))
    spawn = (lambda c: _subprocess(c, Path(path), root, profile, cfg.seeds, extra)) if jobs > 1 else None
    if selection:
        wanted = select([*stages, *arms], selection)
        if not wanted:
            raise KdforgeError(f"--only {only} selects no cell of {cfg.source}")
        if "stage" not in selection:
            seed = selection.get("seed")
            missing = [s for s in stages if not s.done and (s.seed is None or seed is None or str(s.seed) == seed)]
            if missing:
                raise KdforgeError(f"stage {missing[0].label} is not finished; run it first: kdforge experiment "
                                   f"{path} --only stage={missing[0].name}" +
                                   (f",seed={missing[0].seed}" if missing[0].seed is not None else ""))
        run_cells(wanted, jobs, log, spawn)
    else:
        run_cells(stages, jobs, log, spawn)
        run_cells(arms, jobs, log, spawn)
    done = [c for c in [*stages, *arms] if c.done]
    status = {"id": cfg.id, "run_root": str(root), "cells_done": len(done), "cells": len(stages) + len(arms)}
    if len(done) < len(stages) + len(arms) or not report:
        return status
    result = build_report(cfg, stages, arms, profile)
    result["cli_overrides"] = extra
    target = Path(results) if results else Path(cfg.results or f"results/methods/{cfg.id}.json")
    write_report(result, target)
    log(f"{cfg.method} - {cfg.baseline} on {cfg.metric}: mean {result['mean_delta']:+.3f}, 95% CI "
        f"{'n/a' if not result['ci95'] else '[{:+.3f}, {:+.3f}]'.format(*result['ci95'])} over "
        f"{len(result['seeds'])} paired seeds -> {result['verdict']} (premise: {result['premise']['holds']}); "
        f"wrote {target}")
    return result
