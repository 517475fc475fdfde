"""`parse_recipe`: the one place a task recipe's `method:` is checked against its method's id."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kdforge.errors import ConfigError
from kdforge.train.stages import parse_recipe


@dataclass
class _Recipe:
    method: str = "mine"
    seed: int = 0


@dataclass
class _NoMethod:
    seed: int = 0


def test_parse_recipe_checks_the_method_in_one_line_naming_both() -> None:
    tree = {"method": "theirs", "seed": 3, "trainer": {"threads": 1}}
    with pytest.raises(ConfigError) as err:
        parse_recipe(tree, "r.yaml", _Recipe, method="mine")
    assert str(err.value) == "r.yaml: method must be 'mine', got 'theirs'"
    assert "\n" not in str(err.value)
    # the parsed value is checked, not the mapping: a recipe without `method:` gets the schema's default
    with pytest.raises(ConfigError, match="method must be 'other', got 'mine'"):
        parse_recipe({"seed": 3}, "r.yaml", _Recipe, method="other")

    cfg, trainer, text = parse_recipe({**tree, "method": "mine"}, "r.yaml", _Recipe, method="mine")
    assert (cfg.method, cfg.seed, trainer.threads) == ("mine", 3, 1) and "method: mine" in text
    assert parse_recipe(tree, "r.yaml", _Recipe)[0].method == "theirs"     # no `method=`: no check

    with pytest.raises(TypeError, match="no 'method' field"):      # a schema without the field is a coding error
        parse_recipe({"seed": 1}, "r.yaml", _NoMethod, method="mine")
