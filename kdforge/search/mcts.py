"""Monte Carlo tree search over a sequence of discrete decisions (UCT).

Why: a distiller (or any design) built from a chain of choices shares prefixes with many others;
MCTS backs each evaluated design's reward up its path so a good prefix ("attention transform")
gains statistics from every design below it, and UCT balances exploiting good prefixes with
visiting rarely tried ones.

The space is a function ``options(prefix) -> sequence`` giving the options of the next decision
after ``prefix`` (an empty sequence marks a complete path, a leaf), or a fixed list of option
lists (one per depth). Options must be hashable and JSON-friendly (str, int, float, None).

One iteration, split into ask/tell so rewards can come from anywhere (a proxy training, a
storage of finished trials, another machine)::

    path, depth = tree.ask()          # selection (UCT) + expansion + simulation (random completion)
    tree.tell(path, reward, depth)    # backup: the root and path[:1] .. path[:depth] gain N += 1, W += r

`ask` never changes the tree: the expanded node (depth ``depth``) is created by `tell`, so a
tree rebuilt by replaying the stored ``(path, reward, depth)`` triples in order equals the live
tree, and ask's random choices come from a generator seeded by ``(seed, number of tells)``.
UCT uses rewards min-max normalised over all rewards told so far (``normalize=True``), so the
exploration constant means the same whatever the reward's scale.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from kdforge.errors import KdforgeError

Path = tuple[Hashable, ...]
Space = Callable[[Path], Sequence[Hashable]] | Sequence[Sequence[Hashable]]


@dataclass
class Node:
    """One prefix of the decision sequence: visit count N, summed reward W, expanded children."""

    prefix: Path
    options: list[Hashable]
    children: dict[Hashable, Node] = field(default_factory=dict)
    visits: int = 0
    total: float = 0.0

    @property
    def is_leaf(self) -> bool:
        return not self.options

    @property
    def untried(self) -> list[Hashable]:
        return [o for o in self.options if o not in self.children]

    @property
    def fully_expanded(self) -> bool:
        return all(o in self.children for o in self.options)

    @property
    def mean(self) -> float:
        return self.total / self.visits if self.visits else 0.0


def uct_score(mean: float, visits: int, parent_visits: int, c: float) -> float:
    """UCB1 applied to trees: mean + c * sqrt(ln N_parent / N_child); an unvisited child is +inf."""
    if visits == 0:
        return math.inf
    return mean + c * math.sqrt(math.log(max(parent_visits, 1)) / visits)


class MCTS:
    """UCT search tree over `space`; see the module docstring for the ask/tell protocol."""

    def __init__(self, space: Space, c: float = 1.4, seed: int = 0, normalize: bool = True,
                 max_rollout_tries: int = 32, strategy: str = "uct") -> None:
        if c < 0:
            raise KdforgeError(f"mcts: the exploration constant c must be >= 0, got {c}")
        if strategy not in ("uct", "random"):
            raise KdforgeError(f"mcts: strategy must be uct or random, got {strategy!r}")
        self.strategy = strategy      # random: uniform complete paths (the equal-budget random-search baseline)
        self._options = space if callable(space) else _fixed_space(space)
        self.c = float(c)
        self.seed = int(seed)
        self.normalize = normalize
        self.max_rollout_tries = int(max_rollout_tries)
        self.root = self._node(())
        self.tells = 0
        self.rmin = math.inf
        self.rmax = -math.inf
        self.leaves: dict[Path, list[float]] = {}   # every complete path told, with its rewards

    # -- structure -------------------------------------------------------------------------

    def options(self, prefix: Path) -> list[Hashable]:
        opts = list(self._options(tuple(prefix)))
        if len(set(opts)) != len(opts):
            raise KdforgeError(f"mcts: the options after {prefix} repeat a value: {opts}")
        return opts

    def _node(self, prefix: Path) -> Node:
        return Node(tuple(prefix), self.options(prefix))

    def check_path(self, path: Sequence[Hashable]) -> Path:
        """`path` as a tuple, or one clear line if it is not a complete path of this space."""
        path = tuple(path)
        for i, choice in enumerate(path):
            opts = self.options(path[:i])
            if choice not in opts:
                raise KdforgeError(f"mcts: path {list(path)} is not in the search space (decision {i}: "
                                   f"{choice!r} not among {opts})")
        if self.options(path):
            raise KdforgeError(f"mcts: path {list(path)} is incomplete (more decisions follow)")
        return path

    def normalized(self, mean: float) -> float:
        """A mean reward on the [0, 1] scale of all rewards seen (0.5 while they are all equal)."""
        if not self.normalize:
            return mean
        if not self.rmax > self.rmin:
            return 0.5
        return (mean - self.rmin) / (self.rmax - self.rmin)

    def child_score(self, parent: Node, child: Node) -> float:
        return uct_score(self.normalized(child.mean), child.visits, parent.visits, self.c)

    def best_child(self, node: Node) -> Node:
        """The expanded, not exhausted child with the highest UCT score (ties: first option)."""
        best, best_score = None, -math.inf
        for option in node.options:
            child = node.children.get(option)
            if child is None or self.exhausted(child):
                continue
            score = self.child_score(node, child)
            if score > best_score:
                best, best_score = child, score
        if best is None:
            raise KdforgeError(f"mcts: no child of {node.prefix} left to select")
        return best

    def exhausted(self, node: Node) -> bool:
        """Every complete path below `node` has been told (nothing new to find there).

        An unexpanded option counts as exhausted only when it completes a told path (a deeper
        subtree reached only by random completions is not tracked).
        """
        if node.is_leaf:
            return node.prefix in self.leaves
        for option in node.options:
            child = node.children.get(option)
            if child is not None:
                if not self.exhausted(child):
                    return False
                continue
            prefix = (*node.prefix, option)
            if prefix not in self.leaves or self.options(prefix):
                return False
        return True

    # -- one iteration ---------------------------------------------------------------------

    def rng(self) -> random.Random:
        return random.Random(self.seed * 1_000_003 + self.tells)

    def select(self) -> Node:
        """Descend by UCT while the node is fully expanded and not a leaf."""
        node = self.root
        while not node.is_leaf and node.fully_expanded:
            node = self.best_child(node)
        return node

    def ask(self) -> tuple[Path, int] | None:
        """(complete path to evaluate, depth of its expanded node); None once the space is exhausted.

        Selection stops at the first node with an untried option; one untried option (preferring
        one that does not complete an already told path) is the expansion, and the rest of the
        path is a uniform random completion (retried a few times to avoid told paths).
        """
        if self.exhausted(self.root):
            return None
        rng = self.rng()
        if self.strategy == "random":         # no tree policy: a uniform path, avoiding told ones
            for _ in range(max(self.max_rollout_tries, 256)):
                path = self.rollout((), rng)
                if path not in self.leaves:
                    return path, 0
            return None                       # no new path in 256 uniform draws: treated as exhausted
        node = self.select()
        if node.is_leaf:                       # a told leaf is exhausted, so this one is new
            return node.prefix, len(node.prefix)
        untried = node.untried
        fresh = [o for o in untried if (*node.prefix, o) not in self.leaves]
        prefix = (*node.prefix, rng.choice(fresh or untried))
        depth = len(prefix)
        path = self.rollout(prefix, rng)
        for _ in range(self.max_rollout_tries):
            if path not in self.leaves:
                break
            path = self.rollout(prefix, rng)
        return path, depth

    def rollout(self, prefix: Path, rng: random.Random) -> Path:
        """Complete `prefix` with uniformly random options (the simulation policy)."""
        path = tuple(prefix)
        while True:
            opts = self.options(path)
            if not opts:
                return path
            path = (*path, rng.choice(opts))

    def tell(self, path: Sequence[Hashable], reward: float, depth: int | None = None) -> None:
        """Backup: create the nodes of path[:depth] (default: all) and add the reward along them."""
        path = self.check_path(path)
        depth = len(path) if depth is None else int(depth)
        if not 0 <= depth <= len(path):
            raise KdforgeError(f"mcts: depth {depth} outside 0..{len(path)} for path {list(path)}")
        reward = float(reward)
        if not math.isfinite(reward):
            raise KdforgeError(f"mcts: reward must be finite, got {reward}")
        node = self.root
        nodes = [node]
        for i in range(depth):
            child = node.children.get(path[i])
            if child is None:
                child = node.children[path[i]] = self._node(path[: i + 1])
            node = child
            nodes.append(node)
        for n in nodes:
            n.visits += 1
            n.total += reward
        self.leaves.setdefault(path, []).append(reward)
        self.rmin, self.rmax = min(self.rmin, reward), max(self.rmax, reward)
        self.tells += 1

    # -- results ---------------------------------------------------------------------------

    def best_path(self) -> tuple[Path, float] | None:
        """The told complete path with the highest mean reward (ties: the first told)."""
        if not self.leaves:
            return None
        path = max(self.leaves, key=lambda p: sum(self.leaves[p]) / len(self.leaves[p]))
        values = self.leaves[path]
        return path, sum(values) / len(values)

    def search(self, evaluate: Callable[[Path], float], budget: int) -> tuple[Path, float] | None:
        """Run `budget` ask/evaluate/tell iterations (fewer if the space runs out); best path."""
        for _ in range(budget):
            asked = self.ask()
            if asked is None:
                break
            path, depth = asked
            self.tell(path, evaluate(path), depth)
        return self.best_path()


def _fixed_space(levels: Sequence[Sequence[Hashable]]) -> Callable[[Path], Sequence[Hashable]]:
    levels = [list(level) for level in levels]
    if any(not level for level in levels):
        raise KdforgeError("mcts: every decision level needs at least one option")

    def options(prefix: Path) -> Sequence[Hashable]:
        return levels[len(prefix)] if len(prefix) < len(levels) else []

    return options
