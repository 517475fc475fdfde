"""Every shipped recipe validates: run configs against RunConfig, task recipes name a task method."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdforge.config import load_config, load_yaml
from kdforge.methods.catalog import import_methods
from kdforge.registry import LOSSES, METHODS, MODELS

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if not p.name.endswith(".search.yaml") and p.parent.name != "experiments")
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_recipe_validates_with_every_profile(path: Path) -> None:
    from kdforge.experiment.recipe import load_experiment, profile_names
    from kdforge.experiment.runner import plan
    from kdforge.train.stages import is_task_recipe, recipe_tree

    for profile in [None, *profile_names(load_yaml(path))]:
        cfg = load_experiment(path, profile)
        assert len(cfg.seeds) >= 5, "evidence needs >= 5 paired seeds"
        stages, arms = plan(cfg, Path("/nonexistent"))
        for cell in [*stages, *arms]:       # every cell's recipe + overrides is a valid config
            overrides = [o for o in cell.overrides if "/nonexistent" not in o]
            if is_task_recipe(cell.recipe):
                recipe_tree(cell.recipe, overrides)
            else:
                load_config(cell.recipe, overrides)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "configs")) for p in RECIPES])
def test_recipe_validates(path: Path) -> None:
    import_methods()
    tree = load_yaml(path)
    if isinstance(tree.get("method"), str):             # a task recipe, run by its method's own loop
        assert callable(getattr(METHODS.get(tree["method"]), "run_config", None))
        return
    cfg = load_config(path)
    assert cfg.student.name in MODELS
    for teacher in cfg.all_teachers().values():
        assert teacher.name in MODELS
    assert all(term.loss in LOSSES for term in cfg.terms)
    if cfg.method.name:
        assert cfg.method.name in METHODS


def test_published_pairs_have_kd_and_dkd_recipes() -> None:
    names = {p.stem for p in (ROOT / "configs" / "cifar100").glob("*.yaml")}
    pairs = {n.split("_", 1)[1] for n in names if n.startswith("kd_")}
    assert len(pairs) >= 10
    assert all(f"dkd_{pair}" in names for pair in pairs)
    dkd = load_config(ROOT / "configs" / "cifar100" / "dkd_resnet32x4_resnet8x4.yaml")
    assert dkd.terms[1].args == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0} and dkd.terms[1].warmup_epochs == 20
    assert (dkd.optim.lr, dkd.schedule.milestones, dkd.trainer.epochs, dkd.data.batch_size) == (0.05, [150, 180, 210],
                                                                                                240, 64)
