"""MCTS: UCT selection, expansion and backup on hand-built trees; finding a known optimum in budget."""

from __future__ import annotations

import math
import random

import pytest

from kdforge.errors import KdforgeError
from kdforge.search.mcts import MCTS, uct_score


def _two_armed(c: float, normalize: bool) -> MCTS:
    """Root with children a (6 visits, rewards 0.8 each: W = 4.8) and b (1 visit, reward 0.5)."""
    tree = MCTS([["a", "b"], list(range(10))], c=c, seed=0, normalize=normalize)
    for i in range(6):
        tree.tell(("a", i), 0.8, depth=1)
    tree.tell(("b", 0), 0.5, depth=1)
    return tree


def test_uct_score_matches_formula() -> None:
    # mean + c * sqrt(ln N_parent / N_child), worked by hand for the tree of _two_armed:
    # a: 0.8 + sqrt(ln 7 / 6) = 0.8 + 0.56949 ; b: 0.5 + sqrt(ln 7 / 1) = 0.5 + 1.39495
    assert uct_score(0.8, 6, 7, 1.0) == pytest.approx(1.36949, abs=1e-5)
    assert uct_score(0.5, 1, 7, 1.0) == pytest.approx(1.89495, abs=1e-5)
    assert uct_score(0.3, 0, 7, 1.0) == math.inf          # unvisited children come first


def test_uct_selects_the_hand_computed_child() -> None:
    tree = _two_armed(c=1.0, normalize=False)
    assert tree.root.visits == 7 and tree.root.total == pytest.approx(5.3)
    assert tree.select().prefix == ("b",)                 # 1.895 > 1.369: exploration wins
    tree = _two_armed(c=0.2, normalize=False)
    # a: 0.8 + 0.2 * 0.56949 = 0.9139 ; b: 0.5 + 0.2 * 1.39495 = 0.7790
    assert tree.select().prefix == ("a",)
    tree = _two_armed(c=1.0, normalize=True)
    # normalised to [0.5, 0.8] -> means a = 1, b = 0: a: 1 + 0.569 = 1.569 ; b: 0 + 1.395 = 1.395
    assert tree.normalized(0.8) == 1.0 and tree.normalized(0.5) == 0.0
    assert tree.select().prefix == ("a",)


def test_expansion_adds_one_untried_child_per_tell() -> None:
    tree = MCTS([["x", "y", "z"], [0, 1]], seed=3)
    path, depth = tree.ask()
    assert depth == 1 and path[0] in ("x", "y", "z") and path[1] in (0, 1)
    assert tree.root.children == {} and tree.root.visits == 0     # ask does not change the tree
    tree.tell(path, 0.4, depth)
    assert list(tree.root.children) == [path[0]]
    assert sorted(tree.root.untried) == sorted({"x", "y", "z"} - {path[0]})
    assert tree.select() is tree.root                             # not fully expanded: stop at root
    seen = {path[0]}
    for _ in range(2):
        nxt, d = tree.ask()
        assert d == 1 and nxt[0] not in seen                      # expansion picks an untried option
        seen.add(nxt[0])
        tree.tell(nxt, 0.1, d)
    assert tree.root.fully_expanded
    nxt, d = tree.ask()                                           # now UCT descends, expands at depth 2
    assert d == 2 and nxt[:1] in {(k,) for k in "xyz"}


def test_backup_updates_visits_and_values_along_the_path_only() -> None:
    tree = MCTS([["x", "y"], [0, 1], ["p", "q"]], seed=0)
    tree.tell(("x", 1, "p"), 0.3, depth=2)
    tree.tell(("x", 0, "q"), 0.5, depth=1)
    tree.tell(("y", 0, "p"), 0.9, depth=3)
    root = tree.root
    assert (root.visits, root.total) == (3, pytest.approx(1.7))
    x = root.children["x"]
    assert (x.visits, x.total) == (2, pytest.approx(0.8))
    assert list(x.children) == [1]                                # depth 1 created no node below x
    assert (x.children[1].visits, x.children[1].total) == (1, pytest.approx(0.3))
    assert x.children[1].children == {}
    y = root.children["y"]
    leaf = y.children[0].children["p"]
    assert leaf.is_leaf and (leaf.visits, leaf.total) == (1, pytest.approx(0.9))
    assert tree.leaves == {("x", 1, "p"): [0.3], ("x", 0, "q"): [0.5], ("y", 0, "p"): [0.9]}
    assert tree.best_path() == (("y", 0, "p"), 0.9)


def test_small_space_is_enumerated_without_repeats_then_exhausted() -> None:
    tree = MCTS([["a", "b"], [0, 1]], seed=1)
    evaluated = []
    for _ in range(4):
        path, depth = tree.ask()
        evaluated.append(path)
        tree.tell(path, random.Random(str(path)).random(), depth)
    assert sorted(evaluated) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert tree.ask() is None


def test_prefix_dependent_options() -> None:
    def space(prefix: tuple) -> list:
        if not prefix:
            return ["short", "long"]
        if prefix[0] == "short":
            return [] if len(prefix) == 2 else [1, 2]
        return [] if len(prefix) == 3 else [1, 2]

    tree = MCTS(space, seed=0)
    tree.tell(("short", 2), 1.0)
    tree.tell(("long", 1, 2), 0.0)
    with pytest.raises(KdforgeError, match="incomplete"):
        tree.tell(("long", 1), 0.0)
    with pytest.raises(KdforgeError, match="not in the search space"):
        tree.tell(("short", 3), 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_finds_known_optimum_within_budget(seed: int) -> None:
    target = (2, 0, 3, 1)
    calls = []

    def reward(path: tuple) -> float:       # fraction of decisions that match the target: optimum 1.0
        calls.append(path)
        return sum(a == b for a, b in zip(path, target)) / len(target)

    tree = MCTS([list(range(4))] * 4, c=1.4, seed=seed)
    best, value = tree.search(reward, budget=80)      # 256 leaves; random search finds it ~27% of the time
    assert best == target and value == 1.0
    assert len(calls) <= 80 and len(set(calls)) == len(calls)


def test_rebuilt_tree_asks_the_same_as_the_live_one() -> None:
    live = MCTS([list(range(3))] * 3, seed=7)
    history = []
    for _ in range(6):
        path, depth = live.ask()
        r = sum(path) / 6
        live.tell(path, r, depth)
        history.append((path, r, depth))
    replay = MCTS([list(range(3))] * 3, seed=7)
    for path, r, depth in history:
        replay.tell(path, r, depth)
    assert replay.ask() == live.ask()


def test_bad_input() -> None:
    with pytest.raises(KdforgeError):
        MCTS([["a"]], c=-1.0)
    with pytest.raises(KdforgeError):
        MCTS([[]])
    tree = MCTS([["a", "b"]])
    with pytest.raises(KdforgeError):
        tree.tell(("a",), float("nan"))
    with pytest.raises(KdforgeError):
        tree.tell(("a",), 1.0, depth=2)


def test_random_strategy_draws_uniform_new_paths_without_a_tree_policy() -> None:
    from collections import Counter

    levels = [["a", "b", "c"], [0, 1]]
    tree = MCTS(levels, seed=3, strategy="random")
    seen = []
    for _ in range(6):                         # 6 distinct paths exist: each is drawn once
        path, depth = tree.ask()
        assert depth == 0 and path not in tree.leaves
        tree.tell(path, 1.0 if path == ("a", 0) else 0.0, depth)
        seen.append(path)
    assert len(set(seen)) == 6 and tree.ask() is None
    firsts = Counter()
    for seed in range(300):                    # the first draw is uniform over the 3 first options
        firsts[MCTS(levels, seed=seed, strategy="random").ask()[0][0]] += 1
    assert all(70 < firsts[o] < 130 for o in "abc"), firsts
    with pytest.raises(KdforgeError, match="strategy"):
        MCTS(levels, strategy="greedy")
