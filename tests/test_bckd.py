"""BCKD: its two losses against hand computations, and the recipe on the one Trainer (stages, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.losses import bckd_cls_loss, bckd_loc_loss, bckd_location_weights

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/bckd.yaml"
TINY = ["data.num_train=48", "data.num_test=16", "data.size=32", "train.epochs=2", "train.batch_size=8",
        "teacher.loop.epochs=1", "teacher.loop.batch_size=8", "model.backbone_args={width: 4}", "model.width=8",
        "teacher.model.backbone_args={width: 8}", "teacher.model.width=8", "trainer.threads=1"]


def _bce(s: float, p: float) -> float:
    q = 1 / (1 + math.exp(-s))
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


def test_cls_loss_is_binary_kd_weighted_by_the_gap() -> None:
    s = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    t = torch.tensor([[math.log(3), 2.0], [1.0, -0.5]])              # sigmoid(ln 3) = 0.75
    sig = lambda v: 1 / (1 + math.exp(-v))                           # noqa: E731
    expected = sum(_bce(sv, sig(tv)) * abs(sig(tv) - sig(sv)) ** 1.5
                   for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist())) / 2.0
    assert bckd_cls_loss(s, t, beta=1.5, avg_factor=2.0).item() == pytest.approx(expected, rel=1e-6)
    # an identical teacher gives 0 even where softmax KD would not say "all classes low"
    low = torch.full((1, 3), -6.0)
    assert bckd_cls_loss(low, low).item() == pytest.approx(0.0, abs=1e-12)
    s.requires_grad_(True)
    bckd_cls_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_loc_loss_and_location_weights_hand_case() -> None:
    s_cls = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t_cls = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    w = bckd_location_weights(s_cls, t_cls)
    assert w.tolist() == pytest.approx([0.25, 0.0])
    sb = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    tb = torch.tensor([[1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0]])   # IoU 1/3, enclosing = union -> GIoU 1/3
    assert bckd_loc_loss(sb, tb, w, avg_factor=1.0).item() == pytest.approx(0.25 * (1 - 1 / 3))
    with pytest.raises(Exception, match="weights must be"):
        bckd_loc_loss(sb, tb, torch.ones(3))


def test_recipe_trains_teacher_then_student_with_bckd_terms(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert "test_AP" in result and "teacher_test_AP" in result
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    assert "train_bckd_cls" in header and "train_bckd_loc" in header
    assert (tmp_path / "run/stages/teacher/result.json").is_file()
    # a second student reusing the finished teacher run
    teacher = tmp_path / "run/stages/teacher"
    assert main(["train", str(RECIPE), *TINY, f"teacher.run={teacher}", "bckd.w_cls=0", "bckd.w_loc=0",
                 "--out", str(tmp_path / "nokd")]) == 0
    header = (tmp_path / "nokd/metrics.csv").read_text().splitlines()[0]
    assert "bckd" not in header and not (tmp_path / "nokd/stages").exists()


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=8)


def test_bad_bckd_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("bckd.w_loc=-1", "bckd weights must be >= 0"),
                              (f"teacher.run={tmp_path / 'none'}", "holds no finished run"),
                              ("teacher.model.taps=[feat3]", "use the same backbone taps")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()    # a refused recipe leaves no run behind
