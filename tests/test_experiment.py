"""kdforge experiment: pairing, resume, one-cell runs, the interval and verdict, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.experiment import run_experiment
from kdforge.experiment.stats import paired_summary, t_interval, verdict
from kdforge.train.checkpoint import load_tensors

RUN = """
data:
  args: {num_train: 64, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 8, cache: false}
  batch_size: 16
  augment: {crop_padding: 1, flip: true}
student: {name: mlp, args: {in_features: 192, hidden: [16]}}
optim: {lr: 0.05}
schedule: {name: cosine}
trainer: {epochs: 1, progress: false, tensorboard: false}
"""
KD = RUN + """teacher: {name: mlp, args: {in_features: 192, hidden: [64]}, checkpoint: none}
terms:
  - {loss: ce, teacher: null, group: task, weight: 0.5}
  - {loss: kd, weight: 0.5}
"""
TEACHER = RUN.replace("hidden: [16]", "hidden: [64]").replace("epochs: 1", "epochs: 2")
EXPERIMENT = """
id: tiny
stages:
  teacher: {recipe: teacher.yaml}
arms:
  scratch: {recipe: run.yaml}
  again: {recipe: run.yaml}
  kd: {recipe: kd.yaml, overrides: ["teacher.checkpoint={stage:teacher}"]}
seeds: [0, 1, 2]
metric: test_top1
baseline: scratch
method: kd
claimed_direction: higher
premise: {what: teacher beats the student alone, left: stages.teacher.test_top1, op: ">", right: arms.scratch.test_top1}
"""


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    for name, text in (("run.yaml", RUN), ("kd.yaml", KD), ("teacher.yaml", TEACHER), ("exp.yaml", EXPERIMENT)):
        (tmp_path / name).write_text(text)
    return tmp_path / "exp.yaml"


def test_t_interval_and_verdicts_on_hand_worked_numbers() -> None:
    low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)       # t(0.975, 4) * sd / sqrt(n)
    assert (low, high) == pytest.approx((3 - half, 3 + half))
    assert t_interval([1.0]) is None
    assert verdict((0.5, 2.0), "higher") == "holds" and verdict((-2.0, -0.5), "higher") == "reversed"
    assert verdict((-2.0, -0.5), "lower") == "holds" and verdict((0.5, 2.0), "lower") == "reversed"
    assert verdict((-0.1, 2.0), "higher") == "inconclusive" and verdict(None, "higher") == "inconclusive"
    # deltas [1, 1, 1.5]: mean 7/6, sd sqrt(1/12), t(0.975, 2) = 4.302653 -> CI [0.4496, 1.8837]: holds
    s = paired_summary([0, 1, 2, 3], {0: 50.0, 1: 52.0, 2: 51.0, 3: 49.0}, {0: 51.0, 1: 53.0, 2: 52.5}, "higher")
    assert s["seeds"] == [0, 1, 2] and s["paired_deltas"] == [1.0, 1.0, 1.5]
    half = 4.302652729911275 * math.sqrt(1 / 12) / math.sqrt(3)
    assert s["mean_delta"] == pytest.approx(7 / 6) and s["ci95"] == pytest.approx([7 / 6 - half, 7 / 6 + half])
    assert s["verdict"] == "holds"
    # deltas [1, 2, 1]: CI [-0.10, 2.77] contains 0
    assert paired_summary([0, 1, 2], {0: 0.0, 1: 0.0, 2: 0.0}, {0: 1.0, 1: 2.0, 2: 1.0}, "higher")["verdict"] \
        == "inconclusive"


def test_experiment_pairs_seeds_resumes_and_reports(recipe: Path, tmp_path: Path) -> None:
    root, results = tmp_path / "runs", tmp_path / "out.json"
    status = run_experiment(recipe, only="stage=teacher", out=root, results=results, quiet=True)
    assert status["cells_done"] == 1 and not results.exists()
    first = run_experiment(recipe, only="arm=scratch,seed=1", out=root, results=results, quiet=True)
    assert first["cells_done"] == 2 and (root / "scratch/seed1/result.json").is_file()
    stamp = (root / "scratch/seed1/result.json").stat().st_mtime_ns
    report = run_experiment(recipe, out=root, results=results, quiet=True)
    assert (root / "scratch/seed1/result.json").stat().st_mtime_ns == stamp      # finished cells are skipped
    saved = json.loads(results.read_text())
    assert saved["verdict"] == report["verdict"] and results.with_suffix(".png").is_file()
    for key in ("id", "metric", "baseline", "method", "seeds", "baseline_values", "method_values",
                "paired_deltas", "mean_delta", "ci95", "claimed_direction", "premise", "verdict"):
        assert key in saved, key
    assert saved["seeds"] == [0, 1, 2] and len(saved["paired_deltas"]) == 3
    assert saved["premise"]["holds"] is not None and "seen" in saved["premise"]
    # pairing: a second arm identical to the baseline trains bit-identical weights for every seed
    for seed in (0, 1, 2):
        a = load_tensors(root / f"scratch/seed{seed}/checkpoints/last.safetensors")
        b = load_tensors(root / f"again/seed{seed}/checkpoints/last.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert saved["arms"]["again"]["values"][seed] == saved["arms"]["scratch"]["values"][seed]
    seeds_seen = {json.loads((root / f"kd/seed{s}/result.json").read_text())["steps"] for s in (0, 1, 2)}
    assert seeds_seen == {4}


def test_several_premises_must_all_hold(recipe: Path, tmp_path: Path) -> None:
    extra = "premises:\n  - {what: impossible, left: arms.kd.test_top1, op: '>', right: 1000.0}\n"
    recipe.write_text(EXPERIMENT + extra)
    report = run_experiment(recipe, out=tmp_path / "r", results=tmp_path / "r.json", quiet=True, seeds=[0, 1])
    checks = report["premise"]["checks"]
    assert len(checks) == 2 and checks[1]["holds"] is False and report["premise"]["holds"] is False


def test_an_interrupted_cell_resumes_exactly(recipe: Path, tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_experiment(recipe, out=whole, results=tmp_path / "a.json", quiet=True, seeds=[0])
    run_experiment(recipe, only="stage=teacher", out=cut, quiet=True, seeds=[0])
    from kdforge.experiment.runner import train_run

    cell = ["teacher.checkpoint=" + str(cut / "stages/teacher"), "trainer.seed=0"]
    stopped = train_run(recipe.parent / "kd.yaml", [*cell, "trainer.stop_after_steps=2"], cut / "kd/seed0")
    assert stopped == {"stopped_at_step": 2}
    run_experiment(recipe, out=cut, results=tmp_path / "b.json", quiet=True, seeds=[0])
    a = load_tensors(whole / "kd/seed0/checkpoints/last.safetensors")
    b = load_tensors(cut / "kd/seed0/checkpoints/last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parallel_jobs_run_cells_in_processes(recipe: Path, tmp_path: Path) -> None:
    report = run_experiment(recipe, jobs=2, out=tmp_path / "runs", results=tmp_path / "r.json", quiet=True,
                            seeds=[0, 1])
    assert report["seeds"] == [0, 1] and len(list((tmp_path / "runs").rglob("result.json"))) == 1 + 3 * 2


@pytest.mark.parametrize(("change", "message"), [
    (("metric: test_top1", "metrc: test_top1"), "unknown key 'metrc' (did you mean 'metric'?)"),
    (("baseline: scratch", "baseline: scratchy"), "baseline 'scratchy' is not an arm"),
    (("{recipe: kd.yaml,", "{recipe: kd2.yaml,"), "recipe file not found"),
    (("{stage:teacher}", "{stage:teachr}"), "names no stage"),
    (("claimed_direction: higher", "claimed_direction: up"), "claimed_direction must be 'higher' or 'lower'"),
    (("left: stages.teacher.test_top1", "left: arms.nobody.test_top1"), "premise reference"),
])
def test_bad_recipes_fail_in_one_line(recipe: Path, capsys, change: tuple[str, str], message: str) -> None:
    recipe.write_text(EXPERIMENT.replace(*change))
    assert main(["experiment", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_only_and_missing_stage_fail_in_one_line(recipe: Path, tmp_path: Path, capsys) -> None:
    assert main(["experiment", str(recipe), "--only", "arm=kd,seed=0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage teacher is not finished; run it first" in err and "--only stage=teacher" in err
    assert main(["experiment", str(recipe), "--only", "arms=kd"]) == 2
    assert "expected comma-separated" in capsys.readouterr().err


def test_command_line_overrides_reach_every_arm_and_are_recorded(recipe: Path, tmp_path: Path) -> None:
    report = run_experiment(recipe, out=tmp_path / "r", results=tmp_path / "r.json", quiet=True, seeds=[0, 1],
                            overrides=["trainer.epochs=2"])
    steps = {json.loads(p.read_text())["steps"] for p in (tmp_path / "r").glob("*/seed*/result.json")}
    assert steps == {8} and report["cli_overrides"] == ["trainer.epochs=2"]
    assert json.loads((tmp_path / "r/stages/teacher/result.json").read_text())["epochs"] == 2   # its own recipe


def test_a_search_arm_reports_the_searched_model(recipe: Path, tmp_path: Path) -> None:
    (recipe.parent / "val.yaml").write_text(RUN.replace("batch_size: 16", "batch_size: 16\n  val_fraction: 0.25"))
    recipe.write_text("""
id: search
arms:
  plain: {recipe: val.yaml}
  boss: {recipe: val.yaml, search: boss, trials: 3,
         search_overrides: [search.warmup=2, search.top_k=2, search.epochs=1, "search.batch_size=[16, 16]"]}
seeds: [0, 1]
baseline: plain
method: boss
""")
    report = run_experiment(recipe, out=tmp_path / "r", results=tmp_path / "r.json", quiet=True, seeds=[0, 1])
    cell = json.loads((tmp_path / "r/boss/seed0/result.json").read_text())
    assert cell["search"] == "boss" and cell["search_trials"] == 3 and Path(cell["chosen_run"]).is_dir()
    assert "test_top1_last" in cell       # the selected model is the best-validation checkpoint
    assert report["method_values"][0] == cell["test_top1"]
