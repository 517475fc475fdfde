"""`kdforge search autokd|boss CONFIG [a.b=value | search.key=value ...] [--storage URL] [--trials N]
[--out DIR]`.

CONFIG is a normal run config (data, student, teacher, optim, trainer). Search options come from
``CONFIG`` with ``.search.yaml`` in place of ``.yaml`` when that file exists, and from
``search.key=value`` overrides (kdforge.search.options). Trials live in Optuna storage: a SQLite
file ``DIR/search.db`` by default, or any database URL (``--storage``) shared by several machines
running the same command. Running the command again resumes: finished trials are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.config import load_config
from kdforge.errors import KdforgeError
from kdforge.search.options import AutoKDOptions, BOSSOptions, load_options, split_overrides
from kdforge.search.storage import require_optuna

KINDS = ("autokd", "boss")


def search_command(kind: str, config: str, overrides: list[str], storage: str | None, trials: int | None,
                   out: str) -> dict[str, Any]:
    """Run (or resume) one search; returns its summary (best value, best trial, recipe path ...).

    `trials` <= 0 or None takes the budget from the search options.
    """
    if kind not in KINDS:
        raise KdforgeError(f"unknown search '{kind}'; choose one of: {', '.join(KINDS)}")
    require_optuna()
    if not Path(config).is_file():
        raise KdforgeError(f"config file not found: {config}")
    run_overrides, search_overrides = split_overrides(list(overrides))
    cfg = load_config(config, run_overrides)
    budget = trials if trials and trials > 0 else None
    if kind == "autokd":
        from kdforge.search.autokd import run_autokd

        return run_autokd(cfg, load_options(AutoKDOptions, config, search_overrides), out, storage, budget)
    from kdforge.search.boss import run_boss

    return run_boss(cfg, load_options(BOSSOptions, config, search_overrides), out, storage, budget)
