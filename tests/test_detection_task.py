"""The detection Task on the one Trainer: a `method: detector` recipe trains, evaluates (COCO AP), draws, resumes."""

from __future__ import annotations

import json
from pathlib import Path

from recipe_checks import assert_resume_exact, train_cli

from kdforge.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs/detection/fcos.yaml"
TINY = ["data.num_train=48", "data.num_test=16", "data.size=32", "train.epochs=2", "train.batch_size=8",
        "model.backbone_args={width: 4}", "model.width=8", "trainer.progress=false", "trainer.threads=1"]


def test_detector_recipe_writes_a_run_directory_with_coco_metrics_and_a_picture(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    for key in ("test_AP", "test_AP50", "test_AP75", "test_AP_small"):
        assert key in result and (result[key] is None or 0.0 <= result[key] <= 100.0)
    assert result["steps"] == 12 and (tmp_path / "run/predictions.png").stat().st_size > 1000
    rows = (tmp_path / "run/metrics.csv").read_text().splitlines()
    assert "train_cls" in rows[0] and "train_box" in rows[0] and "train_ctr" in rows[0] and len(rows) == 3


def test_kdforge_eval_measures_a_finished_detection_run_again_and_refuses_an_unfinished_one(tmp_path: Path,
                                                                                          capsys) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    trained = json.loads((tmp_path / "run/result.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["split"] == "test" and measured["test_AP"] == trained["test_AP"]
    assert {k: measured[k] for k in trained if k.startswith("test_")} == {k: v for k, v in trained.items()
                                                                            if k.startswith("test_")}
    assert main(["eval", str(tmp_path / "run"), "--checkpoint", "best"]) == 2
    assert "measures its last weights on the test split" in capsys.readouterr().err
    assert main(["train", str(RECIPE), *TINY, "trainer.stop_after_steps=3", "--out", str(tmp_path / "half")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no result.json" in err and "--resume" in err, err


def test_detector_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=8)


def test_bad_detector_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    for override, message in (("augment.scale_range=[0.5]", "augment.scale_range must be [low, high]"),
                              ("model.widht=8", "unknown key 'model.widht'"),
                              ("data.num_classes=40", "num_classes <= 20")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(tmp_path / override)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_detector_trains_under_torchrun_with_the_global_batch_split(tmp_path: Path) -> None:
    """Two gloo ranks: each takes half of every global batch (same step count as one process), the
    result is written once. Not bit-equal to one process: FCOS normalises by each rank's positives."""
    one = train_cli(RECIPE, tmp_path / "one", 1, TINY)
    assert one.returncode == 0, one.stderr[-2000:]
    two = train_cli(RECIPE, tmp_path / "two", 2, TINY)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"test_AP"') == 1
    r1, r2 = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert r1["steps"] == r2["steps"] == 12 and 0.0 <= r2["test_AP"] <= 100.0
