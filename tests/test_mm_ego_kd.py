"""mm_ego_kd: the held-out softmin weighting against a hand-worked case, the ensemble schemes and the KD loss
against plain computations, the frozen teachers, and the staged recipe on the one Trainer (CLI run into a run
directory, teacher reuse, exact resume, one-line errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_ddp_matches, assert_resume_exact
from torch import nn

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.methods.mm_ego_kd import (
    MMEgoKDModule,
    TeacherEnsemble,
    ensemble_kd_loss,
    estimate_weights,
    per_teacher_ce,
    softmin_weights,
)
from kdforge.tasks.video import ClipBatch, ClipData, ClipNet

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/mm_ego_kd.yaml"
BASELINE = Path(__file__).resolve().parents[1] / "configs/video/rgb_student.yaml"
TINY = ["data.num_train=40", "data.num_val=16", "data.num_test=16", "data.frames=4", "data.size=8",
        "teacher_model.width=2", "student.width=2", "teacher_train.epochs=1", "train.epochs=1",
        "teacher_train.batch_size=8", "train.batch_size=8", "trainer.threads=1"]


class Table(nn.Module):
    """A fake teacher: clip i (its `rgb` holds i) gets the fixed logits table[i]."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(table))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.table[inputs["rgb"].view(-1).long()]


def _clips(labels: list[int]) -> ClipData:
    n = len(labels)
    return ClipData({"rgb": torch.arange(n, dtype=torch.float32).view(n, 1)}, torch.tensor(labels),
                    torch.tensor(labels), num_classes=2)


def test_softmin_weights_hand_worked_case() -> None:
    # teacher A: clip 0 logits (2, 0) label 0 -> CE log(1 + e^-2); clip 1 (0, 0) label 1 -> log 2
    # teacher B: clip 0 (0, 1) label 0 -> log(1 + e); clip 1 (1, 0) label 1 -> log(1 + e)
    ce_a = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    ce_b = math.log(1 + math.e)
    w_a = math.exp(-ce_a) / (math.exp(-ce_a) + math.exp(-ce_b))          # softmin with tau 1
    assert (ce_a, ce_b, w_a) == pytest.approx((0.41004, 1.31326, 0.71161), abs=1e-5)
    ens = TeacherEnsemble({"a": Table([[2, 0], [0, 0]]), "b": Table([[0, 1], [1, 0]])})
    mean_ce, weights = estimate_weights(ens, _clips([0, 1]), torch.arange(2), torch.device("cpu"), batch_size=1)
    assert mean_ce.tolist() == pytest.approx([ce_a, ce_b], abs=1e-6)
    assert weights.tolist() == pytest.approx([w_a, 1 - w_a], abs=1e-6)
    # tau_w = 0.5 sharpens: softmin(ce / 0.5)
    w_sharp = 1 / (1 + math.exp(-(ce_b - ce_a) / 0.5))
    assert softmin_weights(mean_ce, 0.5)[0].item() == pytest.approx(w_sharp, abs=1e-6)
    # only the held-out positions count: clip 1 alone -> CE (log 2, log(1 + e))
    _, w1 = estimate_weights(ens, _clips([0, 1]), torch.tensor([1]), torch.device("cpu"))
    assert w1[0].item() == pytest.approx(1 / (1 + math.exp(-(math.log(1 + math.e) - math.log(2)))), abs=1e-6)
    with pytest.raises(KdforgeError, match="temperature must be > 0"):
        softmin_weights(mean_ce, 0.0)


def test_ensemble_schemes_against_plain_sums() -> None:
    g = torch.Generator().manual_seed(1)
    tables = [torch.randn(5, 4, generator=g) for _ in range(3)]
    teachers = {n: Table(t.tolist()) for n, t in zip(("rgb", "flow", "audio"), tables)}
    inputs = {"rgb": torch.arange(5, dtype=torch.float32).view(5, 1)}
    labels = torch.tensor([0, 3, 1, 1, 2])
    full = TeacherEnsemble(teachers, "full-dataset")
    full.weights.copy_(torch.tensor([0.5, 0.3, 0.2]))
    assert torch.allclose(full(inputs), 0.5 * tables[0] + 0.3 * tables[1] + 0.2 * tables[2], atol=1e-6)
    assert torch.allclose(TeacherEnsemble(teachers, "uniform")(inputs), sum(tables) / 3, atol=1e-6)
    per = TeacherEnsemble(teachers, "per-sample", tau=2.0)(inputs, labels)
    for i in range(5):                          # softmin over that clip's per-teacher CE, tau 2
        ces = [-torch.log_softmax(t[i], 0)[labels[i]].item() for t in tables]
        e = [math.exp(-c / 2) for c in ces]
        want = sum(ej / sum(e) * t[i] for ej, t in zip(e, tables))
        assert torch.allclose(per[i], want, atol=1e-5)
    logits = torch.stack(tables, 1)
    assert per_teacher_ce(logits, labels)[2, 1].item() == pytest.approx(
        -torch.log_softmax(tables[1][2], 0)[1].item(), abs=1e-6)
    with pytest.raises(KdforgeError, match="need the clips' labels"):
        TeacherEnsemble(teachers, "per-sample")(inputs)


def test_kd_loss_against_a_naive_computation() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temp in (1.0, 2.0):
        total = 0.0
        for i in range(6):
            ps = [math.exp(v) for v in (s[i] / temp).tolist()]
            pt = [math.exp(v) for v in (t[i] / temp).tolist()]
            ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
            total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
        want = total / 6 * temp ** 2
        assert ensemble_kd_loss(s, t, temp).item() == pytest.approx(want, rel=1e-5)
    s2, t2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)      # two heads (verb, noun): mean
    both = ensemble_kd_loss([s, s2], [t, t2])
    assert both.item() == pytest.approx((ensemble_kd_loss(s, t) + ensemble_kd_loss(s2, t2)).item() / 2, rel=1e-6)
    assert ensemble_kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KdforgeError, match="do not match"):
        ensemble_kd_loss(s, t2)


def test_student_learns_from_frozen_teachers_only() -> None:
    shapes = (3, 4, 8, 8)
    teacher = ClipNet("flow", (2, 4, 8, 8), 12, width=2)
    ens = TeacherEnsemble({"flow": teacher})
    module = MMEgoKDModule(ClipNet("rgb", shapes, 12, width=2), ens, a_kd=1.0, a_gt=0.0, temperature=1.0)
    module.train()
    assert not ens.training and not teacher.training
    batch = ClipBatch({"rgb": torch.randn(4, *shapes), "flow": torch.randn(4, 2, 4, 8, 8)},
                      torch.tensor([0, 1, 2, 3]), torch.arange(4))
    step = module(batch)
    assert set(step.losses) == {"kd"} and step.groups == {"kd": "distill"}        # pure distillation: no CE
    want = ensemble_kd_loss(module.student(batch.inputs), teacher(batch.inputs))
    assert step.losses["kd"].item() == pytest.approx(want.item(), rel=1e-5)
    step.total().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())
    assert not any(k.startswith("teachers") for k in module.checkpoint_state())
    both = MMEgoKDModule(ClipNet("rgb", shapes, 12, width=2), ens, a_kd=0.5, a_gt=2.0, temperature=1.0)(batch)
    assert set(both.losses) == {"kd", "ce"} and both.groups["ce"] == "task"


def test_recipe_trains_stages_weights_and_student(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", str(RECIPE), *TINY, "teachers=[rgb, flow]", "--out", str(run)]) == 0
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["teacher_flow", "teacher_rgb"]
    for name in ("rgb", "flow"):
        assert (run / "stages" / f"teacher_{name}" / "result.json").is_file()
        teacher = json.loads((run / "stages" / f"teacher_{name}" / "result.json").read_text())
        assert teacher["train_clips"] == 28                       # 70 % of 40: the held-out 12 stay unseen
    result = json.loads((run / "result.json").read_text())
    assert result["train_clips"] == 40                            # the student trains on every clip
    weights = [result[f"weight_{m}"] for m in ("rgb", "flow")]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5) and "weight_audio" not in result
    want = torch.softmax(-torch.tensor([result[f"holdout_ce_{m}"] for m in ("rgb", "flow")]), 0)
    assert weights == pytest.approx(want.tolist(), abs=1e-5)
    assert [result[f"used_weight_{m}"] for m in ("rgb", "flow")] == pytest.approx(weights)
    assert result["student_flops"] < result["ensemble_flops"] and 0 < result["compute_saved"] < 1
    for key in ("test_top1", "test_ece", "val_top1", "ensemble_val_top1", "teacher_flow_val_top1"):
        assert 0 <= result[key] <= 100
    assert "train_kd" in (run / "metrics.csv").read_text().splitlines()[0]
    assert (run / "predictions.png").is_file()
    # the baseline (labels only) trains no teacher; a run reusing finished teachers trains none either
    assert main(["train", str(BASELINE), *TINY, "--out", str(tmp_path / "base")]) == 0
    assert not (tmp_path / "base" / "stages").exists()
    assert main(["train", str(BASELINE), *TINY, "distill.a_kd=1", "--out", str(tmp_path / "bad")]) == 2
    reuse = [f"teacher_runs.{m}={run}/stages/teacher_{m}" for m in ("rgb", "flow")]
    assert main(["train", str(RECIPE), *TINY, "teachers=[rgb, flow]", *reuse, "distill.weight_split=teacher_train",
                 "--out", str(tmp_path / "reuse")]) == 0
    again = json.loads((tmp_path / "reuse" / "result.json").read_text())
    assert not (tmp_path / "reuse" / "stages").exists()
    assert again["weight_rgb"] == pytest.approx(result["weight_rgb"])          # same teachers, same held-out CE
    assert again["used_weight_rgb"] == pytest.approx(again["teacher_train_weight_rgb"])
    from kdforge.registry import METHODS

    assert "mm_ego_kd" in METHODS


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    assert_resume_exact(RECIPE, [*TINY, "teachers=[rgb]", "train.epochs=2"], tmp_path, stop_after=6)


@pytest.mark.parametrize(("teachers", "extra"), [
    (["rgb", "flow"], []),
    (["rgb", "fusion"], ["fusion=[rgb, flow]", "distill.weighting=per-sample"]),
], ids=["unimodal", "fusion-per-sample"])
def test_torchrun_two_processes_match_one(tmp_path: Path, teachers: list[str], extra: list[str]) -> None:
    """`torchrun --nproc_per_node=2` (gloo) gives the 1-process weights and metrics rows of every teacher stage and
    the student, and the same result (held-out weights, ensemble and student scores).

    Why 2 processes can equal 1 here: each rank takes a contiguous half of the same global batch (batch 8 -> 4 + 4)
    and the same per-clip shift, and DDP averages the gradients, so every loss that is a per-clip mean (the teachers'
    CE; the student's batchmean KL and CE) gives the 1-process gradient. The one per-rank piece is batch norm's batch
    statistics (no synchronised batch norm on CPU): teacher_model.norm and student.norm are `group` (per-clip
    statistics) here; with `batch` the runs differ by design. The frozen teachers are in eval mode (running
    statistics), and the weight estimation and ensemble report are full passes every rank computes alike.
    The fusion teacher is one more such model (a group-norm ClipNet trunk per modality, features concatenated, one
    linear head: per clip, trained on the same CE), and per-sample weighting is a softmin over each clip's own
    per-teacher CE with its own label, so the ensemble target of a clip is the same whichever rank holds it."""
    overrides = [*TINY, f"teachers=[{', '.join(teachers)}]", *extra, "teacher_model.norm=group", "student.norm=group",
                 "train.epochs=2", "distill.a_gt=0.5", "trainer.progress=false"]
    assert_ddp_matches(RECIPE, overrides, tmp_path)
    one, two = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two"))
    keys = [f"weight_{t}" for t in teachers] + [f"holdout_ce_{t}" for t in teachers] + [
        f"teacher_{t}_val_top1" for t in teachers] + ["ensemble_val_top1", "test_top1", "val_nll"]
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    assert one["train_clips"] == two["train_clips"] == 40
    assert sorted(p.name for p in (tmp_path / "two/stages").iterdir()) == sorted(f"teacher_{t}" for t in teachers)
    assert "train_kd" in (tmp_path / "two/metrics.csv").read_text().splitlines()[0]
    if "fusion" in teachers:                      # it is the fusion model, trained on rgb + flow
        from kdforge.train.checkpoint import load_tensors

        weights = load_tensors(tmp_path / "two/stages/teacher_fusion/checkpoints/last.safetensors")
        assert any("trunks.flow" in k for k in weights) and not any("trunks.audio" in k for k in weights)


def test_bad_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    first = tmp_path / "first"
    assert main(["train", str(RECIPE), *TINY, "teacher_only=rgb", "--out", str(first)]) == 0
    capsys.readouterr()
    for override, message in (("distill.weighting=softmax", "distill.weighting must be one of"),
                              ("distill.a_kd=0", "not both 0"),
                              ("teachers=[rgb, depth]", "unknown teacher 'depth'"),
                              ("student.modality=depth", "student.modality must be one of"),
                              ("distill.tau_w=0", "tau_w and distill.temperature must be > 0"),
                              ("student.norm=layer", "norm must be batch or group"),
                              ("data.holdout_fraction=0", "holdout_fraction"),
                              ("distill.wieghting=uniform", "wieghting"),
                              (f"teacher_runs.rgb={tmp_path}/nothing", "holds no finished run"),
                              (f"teacher_runs.rgb={first}\nteacher_model.width=3", "other settings")):
        args = override.split("\n")
        assert main(["train", str(RECIPE), *TINY, "distill.a_gt=0", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
