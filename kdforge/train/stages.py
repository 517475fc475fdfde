"""Task recipes and their stages: every stage is an ordinary, resumable run directory.

A method that trains several things in sequence (a teacher, then the student; a supervised
stage, then discovery) runs each as a `run_stage` of the one Trainer. The recipe's run
directory holds the final stage; earlier stages live in `<run>/stages/<name>/`. Re-running the
recipe with `resume=True` skips finished stages (their `result.json` exists), resumes the
interrupted one from its checkpoint and starts the rest.

Task recipes are YAML files whose top-level `method:` names a registered method with
`run_config(tree, source, run_dir)`; an optional top-level `trainer:` mapping (any
`TrainerConfig` field: device, amp, threads, progress, tensorboard, stop_after_steps, ...)
applies to every stage.
"""

from __future__ import annotations

import contextvars
import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from kdforge.config import RunConfig, TrainerConfig, apply_override, from_dict, load_yaml, parse_override
from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.base import Task
from kdforge.tasks.common import LoopConfig
from kdforge.train.checkpoint import atomic_write_text, ensure_writable_dir, load_checkpoint

__all__ = ["LoopConfig", "StageRun", "evaluate_recipe_run", "loop_settings", "parse_recipe", "recipe_tree",
           "reuse_stage", "run_recipe", "run_stage", "shared_recipe", "stage_dir"]


def loop_settings(loop: LoopConfig, seed: int, trainer: TrainerConfig | None = None) -> RunConfig:
    """A RunConfig carrying a task loop's optimisation (epochs, batch, optimizer, schedule, clip).

    `trainer` holds the recipe-wide trainer options; the loop's own fields win where they overlap.
    """
    base = trainer or TrainerConfig(tensorboard=False, device="cpu")
    cfg = RunConfig()
    cfg.optim = loop.optim
    cfg.schedule = loop.schedule
    cfg.data.batch_size = loop.batch_size
    cfg.trainer = replace(base, epochs=max(1, loop.epochs), seed=seed, grad_clip=loop.grad_clip,
                          progress=loop.progress or base.progress)
    return cfg


def stage_dir(root: str | Path, name: str | None) -> Path:
    """Where a stage's run lives: the recipe's run directory for the final stage, else stages/<name>."""
    return Path(root) if name is None else Path(root) / "stages" / name


class StageRun:
    """The outcome of one stage: its trained module, its result dict and its run directory."""

    def __init__(self, module: nn.Module, result: dict[str, Any], run_dir: Path, stopped: bool) -> None:
        self.module, self.result, self.run_dir, self.stopped = module, result, run_dir, stopped


def run_stage(root: str | Path, name: str | None, settings: RunConfig, task: Task, config_text: str,
              quiet: bool = False) -> StageRun:
    """Train `task` into its stage directory, or resume it, or (finished) load its trained weights.

    `settings.trainer.stop_after_steps` stops the stage early (tests, interruption drills); the
    caller must then stop the whole recipe (`StageRun.stopped`).
    """
    from kdforge.train.distributed import dist_env_from_environment
    from kdforge.train.trainer import Trainer, resolve_device

    dist_env_from_environment().barrier()     # every rank sees the same files before deciding
    run_dir = stage_dir(root, name)
    result_file = run_dir / "result.json"
    evaluating = _EVALUATING.get()
    if evaluating is not None and not result_file.is_file():
        raise KdforgeError(f"{run_dir} is not finished (no result.json); finish it first: "
                           f"kdforge train --resume {root}")
    if result_file.is_file():       # finished earlier: rebuild the module and load its weights
        import torch

        from kdforge.train.distributed import DistEnv

        torch.manual_seed(settings.trainer.seed)
        module = task.build(resolve_device(settings.trainer.device), DistEnv())
        weights, _, _, task_state = load_checkpoint(run_dir / "checkpoints", "last", with_task=True)
        module.load_checkpoint_state(weights)
        task.load_state_dict(task_state)
        result = json.loads(result_file.read_text())
        if evaluating is not None and run_dir.resolve() == evaluating:      # `kdforge eval`: measure again
            result = task.result(module, DistEnv())
        return StageRun(module, result, run_dir, stopped=False)
    resume = (run_dir / "checkpoints" / "last.json").is_file()
    if not quiet and name is not None:
        print(f"== stage {name} -> {run_dir}" + (" (resumed)" if resume else ""), flush=True)
    trainer = Trainer(settings, run_dir, resume=resume, quiet=quiet, task=task, config_text=config_text)
    result = trainer.fit()
    return StageRun(trainer.module, result, run_dir, stopped="stopped_at_step" in result)


def shared_recipe(run_dir: str | Path, schema: type, mine: Any, identity: Callable[[Any], dict[str, Any]],
                  method: str, what: str = "teacher_run") -> Any:
    """The validated recipe of another run whose trained stage this run reuses (a shared teacher).

    `identity(recipe)` maps a recipe to the settings that define the shared stage (data, teacher
    architecture, its loop ...); they must be equal to `mine`'s, else one line names the fields.
    A directory without a recipe, or with another method's, also fails in one line.
    """
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{method} recipe: {what} {run_dir} is not a run directory (no config.yaml)")
    try:
        body, _ = split_trainer(load_yaml(saved), str(saved))
        from kdforge.tasks.common import load_task_config

        theirs = load_task_config(schema, body, name=str(saved))
    except KdforgeError as exc:
        raise ConfigError(f"{method} recipe: {what} {run_dir} is not a {method} run: {exc}") from None
    a, b = _flat(identity(mine)), _flat(identity(theirs))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        raise ConfigError(f"{method} recipe: {what} {run_dir} was trained with other settings "
                          f"({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}) than this recipe")
    return theirs


def reuse_stage(run_dir: str | Path, schema: type, mine: Any, identity: Callable[[Any], dict[str, Any]],
                method: str, what: str, settings: RunConfig, task: Task, hint: str) -> StageRun:
    """A finished run another recipe reuses (a shared teacher or old model), loaded, never trained.

    One line when it is unfinished (`hint` says how to train it) or was trained with other
    settings than `mine` (see `shared_recipe`). Returns the loaded stage and its result."""
    if not (Path(run_dir) / "result.json").is_file():
        raise ConfigError(f"{method} recipe: {what} {run_dir} holds no finished run (no result.json); train it "
                          f"first ({hint})")
    shared_recipe(run_dir, schema, mine, identity, method, what)
    return run_stage(run_dir, None, settings, task, "", quiet=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------- recipes


def recipe_tree(path: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """A task recipe as a mapping (YAML file or mapping, plus `a.b=value` overrides) and its source name."""
    if isinstance(path, dict):
        tree, source = copy.deepcopy(path), "<recipe>"     # overrides must not change the caller's mapping
    else:
        tree, source = load_yaml(path), str(path)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    if overrides:
        source += " + overrides"
    return tree, source


def split_trainer(tree: dict[str, Any], source: str) -> tuple[dict[str, Any], TrainerConfig]:
    """Pop the recipe-wide `trainer:` section (validated as TrainerConfig; CPU and no TensorBoard by default)."""
    tree = dict(tree)
    section = tree.pop("trainer", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: 'trainer' must be a mapping of trainer options")
    defaults = {"device": "cpu", "tensorboard": False}
    return tree, from_dict(TrainerConfig, {**defaults, **section}, source, prefix="trainer.")


def parse_recipe(tree: dict[str, Any], source: str, schema: type,
                 method: str | None = None) -> tuple[Any, TrainerConfig, str]:
    """A method's `run_config` input -> (recipe validated into `schema`, recipe-wide trainer options,
    the recipe's text for each stage's config.yaml).

    With `method`, the recipe's `method:` must name it (`run_config` is public: a recipe can reach
    it without `run_recipe`'s dispatch on `method:`), else one line naming both."""
    from kdforge.tasks.common import load_task_config

    if method is not None and "method" not in {f.name for f in fields(schema)}:
        raise TypeError(f"parse_recipe: {schema.__name__} has no 'method' field to check against {method!r}")
    body, trainer = split_trainer(tree, source)
    cfg = load_task_config(schema, body, name=source)
    if method is not None and cfg.method != method:
        raise ConfigError(f"{source}: method must be {method!r}, got {cfg.method!r}")
    return cfg, trainer, yaml.safe_dump(tree, sort_keys=False)


def _recipe_runner(tree: dict[str, Any], source: str) -> Callable[[dict[str, Any], str, Path], dict[str, Any]]:
    """The registered method's `run_config` for a task recipe (one line for an unknown or non-task method)."""
    import importlib.util

    from kdforge.methods.catalog import list_methods
    from kdforge.registry import METHODS

    name = tree.get("method")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: a task recipe needs a top-level 'method: <id>' string")
    if isinstance(name, str) and name.isidentifier() and importlib.util.find_spec(f"kdforge.methods.{name}"):
        importlib.import_module(f"kdforge.methods.{name}")     # registers the method
    else:
        list_methods()  # imports every method module, so the unknown name gets its close matches
    runner = getattr(METHODS.get(name), "run_config", None)
    if runner is None:
        raise ConfigError(f"{source}: method '{name}' is not a task recipe method; its recipes are run configs")
    return runner


def run_recipe(path: str | Path | dict[str, Any], overrides: Sequence[str] = (), out: str | Path | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Run a task recipe into the run directory `out` (resuming it when `resume`)."""
    tree, source = recipe_tree(path, overrides)
    runner = _recipe_runner(tree, source)
    name = tree["method"]
    root = Path(out) if out is not None else Path("runs") / (Path(path).stem if not isinstance(path, dict) else name)
    from kdforge.train.distributed import dist_env_from_environment

    env = dist_env_from_environment()
    if not resume and (root / "config.yaml").is_file():
        raise KdforgeError(f"{root} already holds a run; pass --resume {root} to continue it or choose another --out")
    if resume and not (root / "config.yaml").is_file():
        raise KdforgeError(f"cannot resume: {root / 'config.yaml'} not found (is {root} a kdforge run directory?)")
    env.barrier()                  # all ranks checked before rank 0 writes
    existed = root.exists()
    if env.is_main:
        ensure_writable_dir(root, "run directory")
        atomic_write_text(root / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
    try:
        return runner(tree, source, root)
    except KdforgeError:
        # a recipe refused before anything trained leaves no run behind (else the next try would
        # meet "already holds a run"); an interrupted run keeps its checkpoints and stays resumable
        if not resume and env.is_main and [p.name for p in root.iterdir()] == ["config.yaml"]:
            (root / "config.yaml").unlink()
            if not existed:
                root.rmdir()
        raise


# the run directory `kdforge eval` re-measures; its stages are loaded, never trained
_EVALUATING: contextvars.ContextVar[Path | None] = contextvars.ContextVar("kdforge_evaluating", default=None)


def evaluate_recipe_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Re-measure a finished task recipe run: rebuild it from its config.yaml, load every stage's
    final weights (nothing trains) and compute the task's result on the test split again."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        raise KdforgeError(f"{run_dir} holds no finished run (no result.json); finish it first: "
                           f"kdforge train --resume {run_dir}")
    tree, source = recipe_tree(run_dir / "config.yaml", overrides)
    runner = _recipe_runner(tree, source)
    token = _EVALUATING.set(run_dir.resolve())
    try:
        return runner(tree, source, run_dir)
    finally:
        _EVALUATING.reset(token)


def is_task_recipe(path: str | Path) -> bool:
    """Task recipes (multi-label, NCD, SSL, ...) name their method as a top-level string."""
    return Path(path).is_file() and isinstance(load_yaml(path).get("method"), str)
