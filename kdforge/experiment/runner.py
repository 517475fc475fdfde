"""Run an experiment: every (arm, seed) and every stage is an ordinary, resumable run directory.

Layout under the experiment's run root (default `runs/experiments/<id>`)::

    stages/<stage>/            a stage shared by all seeds      (stages/<stage>/seed<k>/ when per_seed)
    <arm>/seed<k>/             one cell: config.yaml, metrics.csv, checkpoints/, result.json

A cell whose `result.json` exists is finished and skipped; an interrupted one resumes from its
checkpoint; so re-running the same command continues an interrupted experiment. `jobs > 1` runs
cells in parallel processes; `only` selects cells (e.g. one per job of a cluster array).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.experiment.recipe import ExperimentConfig, fill

__all__ = ["Cell", "parse_only", "plan", "run_cells", "train_run"]


@dataclass
class Cell:
    """One run of the experiment: a stage or an (arm, seed) pair."""

    kind: str                 # "stage" | "arm"
    name: str
    seed: int | None
    recipe: Path
    overrides: list[str]
    out: Path
    search: str | None = None
    search_overrides: list[str] = field(default_factory=list)
    trials: int | None = None

    @property
    def label(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{'stage ' if self.kind == 'stage' else ''}{self.name}{seed}"

    @property
    def done(self) -> bool:
        return (self.out / "result.json").is_file()

    def result(self) -> dict[str, Any]:
        return json.loads((self.out / "result.json").read_text())


def stage_dir(root: Path, name: str, seed: int | None) -> Path:
    base = root / "stages" / name
    return base if seed is None else base / f"seed{seed}"


def plan(cfg: ExperimentConfig, root: Path) -> tuple[list[Cell], list[Cell]]:
    """The stage cells and the arm cells of the experiment, seeds paired across arms."""
    stages: list[Cell] = []
    for name, spec in cfg.stages.items():
        recipe = cfg.recipe_path(spec.recipe, f"stages.{name}")
        for seed in (cfg.seeds if spec.per_seed else [None]):
            over = [fill(o, seed, {}) for o in spec.overrides]
            if seed is not None:
                over.append(f"{cfg.seed_key}={seed}")
            stages.append(Cell("stage", name, seed, recipe, over, stage_dir(root, name, seed)))
    arms: list[Cell] = []
    for seed in cfg.seeds:
        dirs = {n: stage_dir(root, n, seed if s.per_seed else None) for n, s in cfg.stages.items()}
        for name, spec in cfg.arms.items():
            recipe = cfg.recipe_path(spec.recipe, f"arms.{name}")
            over = [fill(o, seed, dirs) for o in [*cfg.overrides, *spec.overrides]] + [f"{cfg.seed_key}={seed}"]
            arms.append(Cell("arm", name, seed, recipe, over, root / name / f"seed{seed}", spec.search,
                             [fill(o, seed, dirs) for o in spec.search_overrides], spec.trials))
    return stages, arms


def parse_only(text: str | None) -> dict[str, str]:
    """`arm=kd,seed=3` / `stage=teacher` -> {"arm": "kd", "seed": "3"}; one line on bad input."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("arm", "seed", "stage") or not value.strip():
            raise KdforgeError(f"--only '{text}': expected comma-separated arm=NAME, seed=N or stage=NAME")
        out[key.strip()] = value.strip()
    if "arm" in out and "stage" in out:
        raise KdforgeError(f"--only '{text}': select arms or a stage, not both")
    return out


def select(cells: list[Cell], only: dict[str, str]) -> list[Cell]:
    """The cells `only` names: stages (`stage=`) or arms (`arm=`, `seed=`, or both)."""
    kind = "stage" if "stage" in only else "arm"
    name, seed = only.get(kind), only.get("seed")
    return [c for c in cells if c.kind == kind and (name is None or c.name == name)
            and (seed is None or c.seed is None or str(c.seed) == seed)]


# ------------------------------------------------------------------------------------- running


def train_run(recipe: Path, overrides: list[str], out: Path, quiet: bool = True) -> dict[str, Any]:
    """`kdforge train RECIPE overrides --out OUT`, resuming OUT when it holds a checkpoint."""
    from kdforge.config import load_config
    from kdforge.train.stages import is_task_recipe, run_recipe
    from kdforge.train.trainer import Trainer

    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    if is_task_recipe(recipe):
        return run_recipe(recipe, overrides, out=out, resume=(out / "config.yaml").is_file())
    if (out / "checkpoints" / "last.json").is_file():
        cfg = load_config(out / "config.yaml", ["trainer.stop_after_steps=null"])
        return Trainer(cfg, out, resume=True, quiet=quiet).fit()
    if out.exists():          # started but never checkpointed: start again
        shutil.rmtree(out)
    return Trainer(load_config(recipe, overrides), out, quiet=quiet).fit()


def search_run(cell: Cell) -> dict[str, Any]:
    """A search arm: search (resumable) into <cell>/search, then the searched model's result in the cell."""
    from kdforge.search.cli import search_command

    if cell.done:
        return cell.result()
    summary = search_command(cell.search, str(cell.recipe), [*cell.overrides, *cell.search_overrides], None,
                             cell.trials, str(cell.out / "search"))
    if cell.search == "autokd":          # train the searched distiller with the full budget
        train_run(Path(summary["recipe"]), [], cell.out / "final", quiet=True)
        return _adopt(cell, cell.out / "final", summary)
    return _adopt(cell, Path(summary["run_dir"]), summary)


def _adopt(cell: Cell, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The cell's result.json: the chosen run's result plus what the search chose."""
    from kdforge.train.checkpoint import atomic_write_text

    result = json.loads((run_dir / "result.json").read_text())
    if cell.search == "boss":     # the selected model is the chosen trial's best-validation checkpoint
        from kdforge.train.evaluate_run import evaluate_run

        best = evaluate_run(run_dir, "best")
        result.update({"test_top1_last": result.get("test_top1"), "test_top1": best["top1"],
                       "test_top5": best["top5"], "test_loss": best["loss"]})
    result.update({"search": cell.search, "search_best_value": summary.get("best_value"),
                   "search_trials": summary.get("trials_done", summary.get("trials")),
                   "chosen_run": str(run_dir)})
    atomic_write_text(cell.out / "result.json", json.dumps(result, indent=2))
    return result


def _in_process(cell: Cell) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        if cell.search:
            search_run(cell)
        else:
            train_run(cell.recipe, cell.overrides, cell.out)


def _subprocess(cell: Cell, experiment: Path, root: Path, profile: str | None, seeds: list[int],
                overrides: list[str]) -> None:
    only = f"stage={cell.name}" if cell.kind == "stage" else f"arm={cell.name}"
    if cell.seed is not None:
        only += f",seed={cell.seed}"
    argv = [sys.executable, "-m", "kdforge.cli", "experiment", str(experiment), "--only", only, "--out", str(root),
            "--no-report", "--quiet", "--seeds", *[str(s) for s in seeds], *overrides]
    if profile:
        argv += ["--profile", profile]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise KdforgeError(f"{cell.label} failed: {last}")


def run_cells(cells: list[Cell], jobs: int = 1, log: Callable[[str], None] = print,
              spawn: Callable[[Cell], None] | None = None) -> None:
    """Run the unfinished cells (in `jobs` parallel processes when jobs > 1), one progress line each."""
    todo = [c for c in cells if not c.done]
    total = len(todo)
    if not total:
        return
    start = time.time()
    counter = {"done": 0}

    def one(cell: Cell) -> None:
        t0 = time.time()
        (spawn or _in_process)(cell)
        counter["done"] += 1
        metric = ""
        if cell.done:
            res = cell.result()
            shown = [f"{k} {v:.2f}" for k, v in res.items() if k.startswith("test_") and isinstance(v, float)][:2]
            metric = ("  " + ", ".join(shown)) if shown else ""
        log(f"[{counter['done']}/{total}] {cell.label}: done in {time.time() - t0:.0f}s{metric} "
            f"(elapsed {time.time() - start:.0f}s)")

    if jobs <= 1 or spawn is None:
        for cell in todo:
            one(cell)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, c) for c in todo]:
            future.result()
