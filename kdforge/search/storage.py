"""Optuna storage for search trials: lazy import, default SQLite file, one progress line per trial.

Why Optuna storage: finished trials survive an interruption (a resumed search starts from them)
and any database URL (``postgresql://...``, ``mysql://...``) lets several machines add trials to
the same study. The default is a SQLite file in the search's output directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.extras import require


def require_optuna() -> Any:
    """The optuna module, or one line saying how to install it."""
    optuna = require("optuna", "search", "kdforge search needs Optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None, out: str | Path) -> str:
    """`storage` as given (a database URL), else a SQLite file `search.db` in `out`."""
    if storage:
        if "://" not in storage:
            raise KdforgeError(f"--storage must be a database URL such as sqlite:///path/search.db, got "
                               f"'{storage}'")
        return storage
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'search.db'}"


_STORAGES: dict[str, Any] = {}


def open_storage(url: str) -> Any:
    """One storage object per URL and process (connecting to a database takes a fraction of a second)."""
    optuna = require_optuna()
    if url not in _STORAGES:
        try:
            _STORAGES[url] = optuna.storages.get_storage(url)
        except Exception as err:   # bad URL, missing driver, unreachable server
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise KdforgeError(f"cannot open Optuna storage {url}: {first}") from None
    return _STORAGES[url]


def open_study(name: str, storage: str, sampler: Any = None, direction: str = "maximize") -> Any:
    """Create the study or load it with its finished trials (resume / another worker)."""
    optuna = require_optuna()
    return optuna.create_study(study_name=name, storage=open_storage(storage), direction=direction,
                               sampler=sampler, load_if_exists=True)


def complete_trials(study: Any) -> list[Any]:
    """Finished trials in the order they were created."""
    optuna = require_optuna()
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.number)


def fail_trial(study: Any, trial: Any) -> None:
    """Mark an interrupted trial FAIL so it is neither resumed nor counted."""
    optuna = require_optuna()
    try:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except Exception:   # already finished or storage gone: nothing more to record
        pass


class Progress:
    """One line per finished trial: trials done, this trial's value, best so far, time per trial."""

    def __init__(self, kind: str, total: int, quiet: bool = False) -> None:
        self.kind, self.total, self.quiet = kind, total, quiet
        self.start = time.time()
        self.count = 0

    def trial(self, done: int, value: float, best: float, seconds: float, what: str) -> None:
        self.count += 1
        if self.quiet:
            return
        mean = (time.time() - self.start) / self.count
        print(f"[{self.kind}] trial {done}/{self.total}  value {value:.4f}  best {best:.4f}  "
              f"{seconds:.1f}s (mean {mean:.1f}s/trial)  {what}", flush=True)
