"""docs/extending.md's worked example (a task and a method on it) runs as written, resumes exactly."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from recipe_checks import assert_resume_exact

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks(kind: str) -> list[str]:
    text = DOC.read_text()
    section = text[text.index("### Worked example"):]
    return re.findall(rf"```{kind}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def recipe() -> dict:
    from kdforge.registry import METHODS

    if "regression_kd" not in METHODS:
        module = types.ModuleType("docs_extending_example")        # dataclasses need a real module
        sys.modules[module.__name__] = module
        for block in _blocks("python"):
            exec(compile(block, str(DOC), "exec"), module.__dict__)      # noqa: S102  (the doc's own code)
    (block,) = _blocks("yaml")
    return yaml.safe_load(block)


def test_worked_example_trains_both_stages_and_distillation_helps(recipe: dict, tmp_path: Path) -> None:
    from kdforge.train.stages import run_recipe

    kd = run_recipe(recipe, out=tmp_path / "kd")
    plain = run_recipe(recipe, ["kd_weight=0.0"], out=tmp_path / "plain")
    teacher = json.loads((tmp_path / "kd/stages/teacher/result.json").read_text())
    assert math.isfinite(kd["test_mse"]) and teacher["test_mse"] < plain["test_mse"]
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors"):
        assert (tmp_path / "kd" / name).is_file() and (tmp_path / "kd/stages/teacher" / name).is_file()
    # the tiny student learns more from the teacher's smooth outputs than from the targets alone
    assert kd["test_mse"] < plain["test_mse"]


def test_worked_example_resumes_exactly(recipe: dict, tmp_path: Path) -> None:
    # stop_after_steps counts each stage's own steps: the teacher has 16, the student 32
    small = ["teacher_train.epochs=1", "train.epochs=2"]
    assert_resume_exact(recipe, small, tmp_path / "a", stop_after=10)    # inside the teacher stage
    assert_resume_exact(recipe, small, tmp_path / "b", stop_after=20)    # inside the student stage
