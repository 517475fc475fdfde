"""CLI: user errors are one line on stderr with a non-zero exit; methods listing; train/eval/resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge.cli import main
from kdforge.methods.catalog import SEED_METHODS

CARD_IDS = ["ssd_det", "iod_wcbc", "autokd", "zeroseg", "otd", "tinyclip", "rdd", "sdd", "sam_audio", "crkd",
            "upvl", "kd3", "mtl_cskd", "adasim", "ferkd", "mdcs", "giftnet", "memkd", "bckd", "mm_ego_kd",
            "wad", "dot", "boss", "unikd", "l2d", "distillbev", "orc", "pointdc"]

TINY = ("data:\n  args: {num_train: 64, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 16,"
        " cache: false}\n  batch_size: 16\nstudent: {name: convnet, args: {width: 8}}\n"
        "trainer: {epochs: 2, progress: false, tensorboard: false}\n")


def _json_tail(out: str) -> dict:
    """The JSON document a command prints after its progress lines."""
    start = out.index("{") if out.startswith("{") else out.index("\n{") + 1
    return json.loads(out[start:])


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "missing.yaml"], "kdforge: error: config file not found: missing.yaml"),
    (["train", "{cfg}", "student.name=resnet9"], "kdforge: error: unknown model 'resnet9'; close matches:"),
    (["train", "{cfg}", "terms=[{loss: kdd, teacher: null}]"], "kdforge: error: unknown loss 'kdd'; close matches: kd"),
    (["train", "{cfg}", "optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["train", "{cfg}", "terms=[{loss: ce, student: feat9, teacher: null, group: task}]"],
     "unknown tap 'feat9' on ConvNet"),
    (["train", "--resume", "{tmp}/nothing"], "cannot resume: "),
    (["eval", "{tmp}/nothing"], "config file not found"),
])
def test_user_errors_are_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    argv = [a.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = _run(capsys, *argv, *([] if "--resume" in argv or argv[0] == "eval" else
                                         ["--out", str(tmp_path / "run")]))
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_methods_lists_every_card_id(capsys) -> None:
    code, out, _ = _run(capsys, "methods", "--json")
    rows = json.loads(out)
    ids = [r["id"] for r in rows]
    assert code == 0 and list(SEED_METHODS) == CARD_IDS and sorted(ids[:28]) == sorted(CARD_IDS)
    keys = [(r["kind"] != "seed", r["family"], r["id"]) for r in rows]
    assert keys == sorted(keys)          # seed methods first, then baselines; by family, then id
    assert {"kd", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "crd"} <= set(ids)
    assert all(set(r) >= {"id", "family", "paper", "status"} for r in rows)
    assert all(r["status"] in ("implemented", "planned") for r in rows)
    assert {r["id"]: r["status"] for r in rows}["kd"] == "implemented"
    recipes = {r["id"]: r for r in rows if r["kind"] == "baseline" and r["family"].startswith("baseline-")}
    assert recipes["rd"]["family"] == "baseline-anomaly" and recipes["clip"]["family"] == "baseline-vision-language"
    assert not {"rd", "clip", "dml", "detector"} & set(SEED_METHODS)   # registered baseline recipes are listed too
    code, out, _ = _run(capsys, "methods")
    assert code == 0 and "ssd_det" in out and "ICCV 2023 seed methods (" in out and "Baselines" in out
    assert out.index("[detection]") < out.index("ssd_det") < out.index("Baselines") < out.index("crd")


def test_train_interrupt_resume_and_eval(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    code, out, _ = _run(capsys, "train", str(cfg), "trainer.stop_after_steps=5", "--out", str(run))
    assert code == 0 and _json_tail(out) == {"stopped_at_step": 5}
    code, out, _ = _run(capsys, "train", "--resume", str(run))
    assert code == 0 and _json_tail(out)["steps"] == 8
    code, out, _ = _run(capsys, "eval", str(run))
    result = json.loads((run / "result.json").read_text())
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(result["test_top1"])


def test_console_script_exit_status(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kdforge.cli", "train", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kdforge: error: config file not found: {tmp_path / 'x.yaml'}"


@pytest.mark.parametrize("name", ["rd", "crkd", "rdd", "dense"])
def test_a_task_method_in_a_run_config_is_one_line_naming_the_recipe_form(tmp_path: Path, capsys, name: str) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    code, _, err = _run(capsys, "train", str(cfg), f"method.name={name}", "--out", str(tmp_path / "run"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert f"method '{name}' is a task recipe" in lines[0] and f"`method: {name}`" in lines[0]
