"""Config loading: YAML + overrides, typed validation, errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdforge.config import RunConfig, dump_config, load_config
from kdforge.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim: {lr: 0.1, weight_decay: 5e-4}\nstudent: {name: resnet8}\n"
                            "terms:\n  - {loss: ce, teacher: null, group: task}\n")
    cfg = load_config(path, ["optim.lr=0.2", "trainer.epochs=3", "terms.0.weight=0.5",
                             "data.args.num_train=100"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 5e-4      # "5e-4" string -> float
    assert cfg.trainer.epochs == 3
    assert cfg.terms[0].weight == 0.5 and cfg.terms[0].teacher is None
    assert cfg.data.args == {"num_train": 100}
    assert cfg.student.name == "resnet8" and cfg.teacher is None


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["teacher.name=resnet20", "teacher.checkpoint=x", "terms=[{loss: kd}]"])
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("optim: {lrr: 0.1}\n", [], r"run\.yaml: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"),
    ("", ["trainer.epoch=3"], r"unknown key 'trainer\.epoch' \(did you mean 'trainer\.epochs'\?\)"),
    ("trainer: {epochs: many}\n", [], r"'trainer\.epochs' must be int"),
    ("trainer: {progress: 1}\n", [], r"'trainer\.progress' must be true or false"),
    ("optim: {name: adam}\n", [], r"optim\.name must be sgd, adamw or dot"),
    ("terms: [{loss: kd}]\n", [], r"reads teacher 'teacher' but the config defines no such teacher"),
    ("", ["optim.lr"], r"override 'optim\.lr' must look like key\.sub=value"),
    ("", ["terms.3.weight=1"], r"'3' is not an index"),
    ("- a\n- b\n", [], r"top level must be a mapping"),
    ("optim: {lr: [\n", [], r"is not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_problem(tmp_path: Path, text: str, overrides: list[str],
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, text), overrides)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
