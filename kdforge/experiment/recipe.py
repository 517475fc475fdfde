"""Experiment recipes: named arms over paired seeds, shared stages, the metric and the claim.

An experiment is a YAML file (`configs/experiments/<id>.yaml`)::

    id: quickstart_kd
    recipe: ../quickstart/student.yaml      # what every arm starts from (run config or task recipe)
    overrides: [trainer.epochs=4]           # shared by every arm
    stages:                                 # trained once (or once per seed) and reused by the arms
      teacher: {recipe: ../quickstart/teacher.yaml, per_seed: false}
    arms:
      scratch: {}
      kd: {recipe: ../quickstart/kd.yaml, overrides: ["teacher.checkpoint={stage:teacher}"]}
    seeds: [0, 1, 2, 3, 4]
    seed_key: trainer.seed                  # the override that receives the seed (task recipes: seed)
    metric: test_top1                       # read from each run's result.json
    baseline: scratch
    method: kd
    claimed_direction: higher
    premise: {what: "the teacher beats the student alone", left: stages.teacher.test_top1,
              op: ">", right: arms.scratch.test_top1}
    profiles:                               # e.g. the paper's scale, for a GPU and the real data
      paper: {overrides: [...], arms: {kd: [...]}, stages: {teacher: [...]}, seeds: [...]}

An arm with `search: autokd|boss` runs that search first (`search_overrides: [search.key=value]`,
`trials: N`) into `<cell>/search/`; Auto-KD's best distiller (`best.yaml`) is then trained into the
cell, and BOSS's selected trial (best on validation) is the cell's result.

Paths are relative to the experiment file. In overrides, `{seed}` is the cell's seed and
`{stage:NAME}` the run directory of a stage (of the same seed for a per-seed stage). Arms of
one seed differ only by their recipe/overrides, so they share data order, augmentation and
initialisation wherever their recipes allow (the seed sets all three).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.config import from_dict, load_yaml
from kdforge.errors import ConfigError

__all__ = ["ArmSpec", "ExperimentConfig", "PremiseSpec", "ProfileSpec", "StageSpec", "load_experiment"]

_PLACEHOLDER = re.compile(r"\{(seed|stage:[A-Za-z0-9_\-]+)\}")


@dataclass
class ArmSpec:
    recipe: str | None = None            # default: the experiment's `recipe`
    overrides: list[str] = field(default_factory=list)
    search: str | None = None            # autokd | boss: search first (search.key=value in search_overrides),
    search_overrides: list[str] = field(default_factory=list)   # then the arm's result is the searched model's
    trials: int | None = None


@dataclass
class StageSpec:
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    per_seed: bool = False               # one run per seed (else one run shared by all seeds)


@dataclass
class PremiseSpec:
    """A check that the effect the method exploits exists: `left op right` on means over seeds."""

    what: str = ""
    left: str = ""                       # arms.<arm>.<key> | stages.<stage>.<key> (key: result or metrics.<col>)
    op: str = ">"
    right: str | float = 0.0


@dataclass
class ProfileSpec:
    """Another scale of the same experiment (the paper's data, models and schedule)."""

    description: str = ""
    overrides: list[str] = field(default_factory=list)
    arms: dict[str, list[str]] = field(default_factory=dict)
    stages: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] | None = None


@dataclass
class ExperimentConfig:
    id: str = ""
    description: str = ""
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    stages: dict[str, StageSpec] = field(default_factory=dict)
    arms: dict[str, ArmSpec] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    seed_key: str = "trainer.seed"
    metric: str = "test_top1"
    baseline: str = ""
    method: str = ""
    claimed_direction: str = "higher"
    premise: PremiseSpec | None = None
    premises: list[PremiseSpec] = field(default_factory=list)    # several checks; all must hold
    paper_claim: str = ""
    notes: str = ""
    results: str | None = None           # JSON path (default results/methods/<id>.json)
    profiles: dict[str, ProfileSpec] = field(default_factory=dict)
    source: str = ""                     # set by the loader: the experiment file
    base_dir: str = ""                   # set by the loader: recipe paths are relative to it

    def all_premises(self) -> list[PremiseSpec]:
        return ([self.premise] if self.premise is not None else []) + list(self.premises)

    def recipe_path(self, recipe: str | None, where: str) -> Path:
        name = recipe or self.recipe
        if not name:
            raise ConfigError(f"{self.source}: {where} has no recipe and the experiment sets no `recipe:`")
        path = Path(name)
        path = path if path.is_absolute() else Path(self.base_dir) / path
        if not path.is_file():
            raise ConfigError(f"{self.source}: {where}: recipe file not found: {path}")
        return path


def _check(cfg: ExperimentConfig) -> None:
    src = cfg.source
    if not cfg.id or not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.id):
        raise ConfigError(f"{src}: 'id' must be a non-empty name of letters, digits, _ . - (got {cfg.id!r})")
    if len(cfg.arms) < 2:
        raise ConfigError(f"{src}: an experiment needs at least two arms (a baseline and a method)")
    for role in ("baseline", "method"):
        name = getattr(cfg, role)
        if name not in cfg.arms:
            raise ConfigError(f"{src}: {role} '{name}' is not an arm (arms: {', '.join(cfg.arms)})")
    if cfg.baseline == cfg.method:
        raise ConfigError(f"{src}: baseline and method must be different arms")
    if cfg.claimed_direction not in ("higher", "lower"):
        raise ConfigError(f"{src}: claimed_direction must be 'higher' or 'lower', not {cfg.claimed_direction!r}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{src}: seeds must be a non-empty list of distinct integers")
    if "=" in cfg.seed_key or not cfg.seed_key:
        raise ConfigError(f"{src}: seed_key must be a config key such as trainer.seed or seed")
    stage_names = set(cfg.stages)
    lists = [("overrides", cfg.overrides)] + [(f"arms.{a}.overrides", s.overrides) for a, s in cfg.arms.items()]
    lists += [(f"stages.{n}.overrides", s.overrides) for n, s in cfg.stages.items()]
    for where, items in lists:
        for text in items:
            if "=" not in text:
                raise ConfigError(f"{src}: {where}: '{text}' must look like key.sub=value")
            for ref in _PLACEHOLDER.findall(text):
                if ref.startswith("stage:") and ref[6:] not in stage_names:
                    raise ConfigError(f"{src}: {where}: '{{{ref}}}' names no stage (stages: "
                                      f"{', '.join(sorted(stage_names)) or 'none'})")
                if where.startswith("stages.") and ref.startswith("stage:"):
                    raise ConfigError(f"{src}: {where}: a stage cannot read another stage ({{{ref}}})")
    for premise in cfg.all_premises():
        if premise.op not in (">", "<", ">=", "<="):
            raise ConfigError(f"{src}: premise.op must be one of > < >= <=, not {premise.op!r}")
        for side in (premise.left, premise.right):
            if isinstance(side, str):
                parts = side.split(".", 2)
                if len(parts) != 3 or parts[0] not in ("arms", "stages") or \
                        parts[1] not in (cfg.arms if parts[0] == "arms" else cfg.stages):
                    raise ConfigError(f"{src}: premise reference '{side}' must be arms.<arm>.<key> or "
                                      "stages.<stage>.<key> naming an existing arm or stage")
    for name, prof in cfg.profiles.items():
        for arm in prof.arms:
            if arm not in cfg.arms:
                raise ConfigError(f"{src}: profiles.{name}.arms.{arm} is not an arm")
        for stage in prof.stages:
            if stage not in cfg.stages:
                raise ConfigError(f"{src}: profiles.{name}.stages.{stage} is not a stage")
    for arm, spec in cfg.arms.items():
        cfg.recipe_path(spec.recipe, f"arms.{arm}")
        if spec.search not in (None, "autokd", "boss"):
            raise ConfigError(f"{src}: arms.{arm}.search must be autokd or boss, not {spec.search!r}")
        if any(not o.startswith("search.") or "=" not in o for o in spec.search_overrides):
            raise ConfigError(f"{src}: arms.{arm}.search_overrides must look like search.key=value")
    for stage, spec in cfg.stages.items():
        cfg.recipe_path(spec.recipe, f"stages.{stage}")


def apply_profile(cfg: ExperimentConfig, name: str | None) -> ExperimentConfig:
    """The experiment at another scale: the profile's overrides appended, its seeds if it sets them."""
    if not name:
        return cfg
    if name not in cfg.profiles:
        raise ConfigError(f"{cfg.source}: no profile '{name}' (profiles: {', '.join(cfg.profiles) or 'none'})")
    prof = cfg.profiles[name]
    cfg.overrides = [*cfg.overrides, *prof.overrides]
    for arm, extra in prof.arms.items():
        cfg.arms[arm].overrides = [*cfg.arms[arm].overrides, *extra]
    for stage, extra in prof.stages.items():
        cfg.stages[stage].overrides = [*cfg.stages[stage].overrides, *extra]
    if prof.seeds:
        cfg.seeds = list(prof.seeds)
    return cfg


def load_experiment(path: str | Path, profile: str | None = None,
                    seeds: list[int] | None = None) -> ExperimentConfig:
    """Read and validate an experiment recipe; unknown keys and bad references fail in one line."""
    path = Path(path)
    tree = load_yaml(path)
    cfg = from_dict(ExperimentConfig, {**tree, "source": str(path), "base_dir": str(path.parent)}, str(path))
    cfg = apply_profile(cfg, profile)
    if seeds:
        cfg.seeds = list(seeds)
    _check(cfg)
    return cfg


def fill(text: str, seed: int | None, stage_dirs: dict[str, Path]) -> str:
    """Replace `{seed}` and `{stage:NAME}` in one override."""
    def sub(match: re.Match) -> str:
        ref = match.group(1)
        if ref == "seed":
            if seed is None:
                raise ConfigError(f"override '{text}' uses {{seed}} in a stage shared by all seeds")
            return str(seed)
        return str(stage_dirs[ref[6:]])
    return _PLACEHOLDER.sub(sub, text)


def profile_names(tree: dict[str, Any]) -> list[str]:
    return list((tree.get("profiles") or {}).keys())
