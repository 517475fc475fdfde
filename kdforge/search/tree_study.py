"""An MCTS whose whole state lives in an Optuna study, so a search resumes (or spreads) losslessly.

Each evaluated path is one COMPLETE trial: value = reward, user attributes ``path`` (the
decisions), ``depth`` (the expanded node's depth) and ``cached`` (a repeat of an already
evaluated path: recorded, since it is part of the tree's history, but costs no evaluation and
does not count against the budget). Before every iteration the tree is rebuilt by replaying the
finished trials in trial order; because `MCTS.ask` depends only on the tree and the number of
tells, an interrupted and resumed search continues exactly as an uninterrupted one, and several
workers sharing one storage all see each other's results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.search.mcts import MCTS, Path
from kdforge.search.storage import Progress, complete_trials, fail_trial

Evaluate = Callable[[Path], tuple[float, dict[str, Any]]]
Callback = Callable[[Any, Any], None]


def rebuild_tree(study: Any, space: Callable[[Path], Sequence[Hashable]], c: float, seed: int,
                 strategy: str = "uct") -> MCTS:
    """Replay the study's finished trials (in trial order) into a fresh tree."""
    tree = MCTS(space, c=c, seed=seed, strategy=strategy)
    for trial in complete_trials(study):
        attrs = trial.user_attrs
        if "path" not in attrs or trial.value is None:
            continue
        tree.tell(tuple(attrs["path"]), float(trial.value), int(attrs.get("depth", len(attrs["path"]))))
    return tree


def fresh_count(study: Any) -> int:
    return sum(1 for t in complete_trials(study) if not t.user_attrs.get("cached", False))


def run_tree_search(study: Any, space: Callable[[Path], Sequence[Hashable]], evaluate: Evaluate, *,
                    trials: int, c: float = 1.4, seed: int = 0, kind: str = "mcts",
                    describe: Callable[[Path], str] = str, callbacks: Sequence[Callback] = (),
                    quiet: bool = False, max_repeats: int | None = None, strategy: str = "uct") -> MCTS:
    """Evaluate new paths until the study holds `trials` fresh finished trials (or the space is exhausted).

    `evaluate(path) -> (reward, user_attrs)`. `callbacks(study, frozen_trial)` run after each
    finished trial (Optuna's convention). Ctrl-C (or a callback raising KeyboardInterrupt) marks a
    running trial FAIL and ends with one line saying how to resume; finished trials are kept.
    """
    progress = Progress(kind, trials, quiet)
    repeats_left = max_repeats if max_repeats is not None else 10 * trials + 100
    running = None
    try:
        while True:
            tree = rebuild_tree(study, space, c, seed, strategy)
            done = fresh_count(study)
            if done >= trials:
                return tree
            asked = tree.ask()
            if asked is None:
                return tree
            path, depth = asked
            running = study.ask()
            running.set_user_attr("path", list(path))
            running.set_user_attr("depth", depth)
            t0 = time.time()
            if path in tree.leaves:       # a deterministic reward already measured: record, don't re-run
                repeats_left -= 1
                if repeats_left < 0:
                    fail_trial(study, running)
                    return tree
                reward, attrs = sum(tree.leaves[path]) / len(tree.leaves[path]), {"cached": True}
            else:
                reward, attrs = evaluate(path)
            reward = float(reward)
            if not math.isfinite(reward):
                raise KdforgeError(f"{kind}: evaluation of {list(path)} returned a non-finite reward")
            for key, value in attrs.items():
                running.set_user_attr(key, value)
            frozen = study.tell(running, reward)
            running = None
            if not attrs.get("cached"):
                best = max(reward, max((sum(v) / len(v) for v in tree.leaves.values()), default=-math.inf))
                progress.trial(done + 1, reward, best, time.time() - t0, describe(path))
            for callback in callbacks:
                callback(study, frozen)
    except KeyboardInterrupt:
        if running is not None:
            fail_trial(study, running)
        raise KdforgeError(f"{kind} search interrupted after {fresh_count(study)} finished trials; run the "
                           "same command again to resume") from None
    except BaseException:
        if running is not None:
            fail_trial(study, running)
        raise
