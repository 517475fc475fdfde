"""A newcomer's first hour (issue 12): no silent defaults, clear one-line errors, clean CLI, valid files."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge.cli import main

TINY = ("data:\n  args: {num_train: 64, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 8,"
        " cache: false}\n  batch_size: 16\nstudent: {name: mlp, args: {in_features: 192, hidden: [16]}}\n"
        "trainer: {epochs: 2, progress: false, tensorboard: false}\n")


def _cfg(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_empty_config_fails_instead_of_launching_the_default_recipe(tmp_path: Path, capsys) -> None:
    err = _one_line_error(capsys, ["train", str(_cfg(tmp_path, "")), "--out", str(tmp_path / "run")])
    assert "must name its data and student" in err and not (tmp_path / "run").exists()
    err = _one_line_error(capsys, ["train", str(_cfg(tmp_path, "student: {name: mlp}\n"))])
    assert "must name its data" in err and "student" not in err.split("must name its")[1].split("(")[0]


@pytest.mark.parametrize("command", ["train", "cache", "demo"])
def test_unwritable_out_is_one_line_before_any_work(tmp_path: Path, capsys, command: str) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    out = str(blocked / "run")
    argv = {"train": ["train", str(_cfg(tmp_path)), "--out", out],
            "cache": ["cache", str(_cfg(tmp_path)), "teacher.name=mlp", "teacher.checkpoint=x", "--out", out],
            "demo": ["demo", "--quick", "--out", out]}[command]
    err = _one_line_error(capsys, argv)
    assert "cannot write the" in err and str(blocked) in err


def test_eval_refuses_a_validation_split_that_does_not_exist_and_best_chosen_on_test(tmp_path: Path,
                                                                                       capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", str(_cfg(tmp_path)), "--out", str(run)]) == 0
    capsys.readouterr()
    result = json.loads((run / "result.json").read_text())
    assert not any(k.startswith("best_") for k in result)              # no selection on the test split
    assert not (run / "checkpoints/best.safetensors").exists()
    assert "no validation split" in _one_line_error(capsys, ["eval", str(run), "--split", "val"])
    assert "no 'best' checkpoint" in _one_line_error(capsys, ["eval", str(run), "--checkpoint", "best"])
    with_val = tmp_path / "val"
    assert main(["train", str(_cfg(tmp_path)), "data.val_fraction=0.25", "--out", str(with_val)]) == 0
    assert "best_val_top1" in json.loads((with_val / "result.json").read_text())
    assert main(["eval", str(with_val), "--split", "val", "--checkpoint", "best"]) == 0


def test_diverging_run_stops_naming_step_and_term_and_every_json_stays_valid(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    err = _one_line_error(capsys, ["train", str(_cfg(tmp_path)), "optim.lr=1e12", "--out", str(run)])
    assert "became non-finite at step" in err and "'ce'" in err
    for path in run.rglob("*.json"):
        text = path.read_text()
        json.loads(text, parse_constant=lambda c, where=str(path): pytest.fail(f"{where} holds {c}"))


def test_overrides_mix_with_options_in_any_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", str(_cfg(tmp_path)), "--out", str(run), "trainer.epochs=1", "optim.lr=0.01"]) == 0
    assert json.loads((run / "result.json").read_text())["epochs"] == 1


def test_mid_epoch_resume_keeps_every_buffer_and_the_metrics_rows_exact(tmp_path: Path) -> None:
    conv = TINY.replace("{name: mlp, args: {in_features: 192, hidden: [16]}}", "{name: convnet, args: {width: 4}}")
    cfg = _cfg(tmp_path, conv)
    assert main(["train", str(cfg), "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", str(cfg), "trainer.stop_after_steps=6", "--out", str(tmp_path / "cut")]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    from kdforge.train.checkpoint import load_tensors

    a = load_tensors(tmp_path / "whole/checkpoints/last.safetensors")
    b = load_tensors(tmp_path / "cut/checkpoints/last.safetensors")
    assert any("num_batches_tracked" in k for k in a)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    rows = [[{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader((d / "metrics.csv").open())]
            for d in (tmp_path / "whole", tmp_path / "cut")]
    assert rows[0] == rows[1] and rows[0][1]["train_samples"] == "64"


def test_bare_kdforge_prints_help_and_version_exists() -> None:
    bare = subprocess.run([sys.executable, "-m", "kdforge.cli"], capture_output=True, text=True)
    assert bare.returncode == 0 and "COMMAND" in bare.stdout and "train" in bare.stdout
    version = subprocess.run([sys.executable, "-m", "kdforge.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("kdforge ")
    for argv, words in ((["eval", "-h"], ["--checkpoint", "validation split", "run directory"]),
                        (["methods", "-h"], ["machine-readable"]), (["cache", "-h"], ["replace an existing"]),
                        (["data", "prepare", "-h"], ["data set name", "directory to hold"])):
        text = subprocess.run([sys.executable, "-m", "kdforge.cli", *argv], capture_output=True, text=True).stdout
        assert all(w in text for w in words), (argv, text)


def test_output_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(["train", str(_cfg(tmp_path)), "trainer.epochs=1", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    for name in ("result.json", "metrics.csv", "config.yaml", "checkpoints/last.safetensors"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


def test_data_set_without_options_says_so(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path, "data: {name: cifar10, root: nowhere, args: {size: 3}}\nstudent: {name: mlp}\n")
    err = _one_line_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "run")])
    assert not err.rstrip().endswith(":") and "has no option 'size'; it takes no options" in err


def test_overrides_mix_with_options_for_search_cache_and_experiment(tmp_path: Path, capsys) -> None:
    from kdforge.cli import build_parser

    parser = build_parser()
    for argv in (["search", "boss", "cfg.yaml", "--trials", "2", "a.b=1", "--out", "o", "c.d=2"],
                 ["cache", "cfg.yaml", "--out", "o", "a.b=1", "--epochs", "2", "c.d=2"],
                 ["experiment", "exp.yaml", "--jobs", "2", "a.b=1", "--only", "arm=x", "c.d=2"],
                 ["train", "cfg.yaml", "--out", "o", "a.b=1", "c.d=2"]):
        args, unknown = parser.parse_known_args(argv)
        assert [*args.overrides, *unknown] == ["a.b=1", "c.d=2"], argv
    with pytest.raises(SystemExit):          # an unknown option is still a usage error
        main(["train", str(_cfg(tmp_path)), "--out", str(tmp_path / "r"), "--bogus"])
