"""WAD: class scores, pseudo-labels, margin weights, selection and the weighted loss vs hand computations;
the two stages through the Trainer (exact resume inside a round, 2 gloo processes == 1)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_ddp_matches, assert_resume_exact

from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.wad import (
    WADConfig,
    build_ssl,
    polynomial_decay,
    run_wad,
    select_confident,
    train_teacher,
    wad_knowledge,
    wad_scores,
)
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig, load_task_config
from kdforge.tasks.ssl import RoundsTask, gaussian_blobs, mismatch_split, nt_xent_loss, weighted_pseudo_ce
from kdforge.train.stages import loop_settings, run_stage

RECIPE = "configs/methods/wad.yaml"
# 400 unlabelled, 20 labelled; teacher 1 epoch of 6 steps (batch 64); 3 rounds of 6 steps (batch 32 + 32)
TINY = ["data.per_class=60", "data.per_class_test=20", "data.unlabelled_per_class=40", "iterations=6",
        "teacher.loop.epochs=1", "teacher.loop.batch_size=64", "wad.split=2", "wad.alpha=0.2",
        "trainer.progress=false"]


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_scores_are_the_nearest_exemplar_per_class():
    # class 0 exemplars at 0 and 90 degrees, class 1 at 180 degrees (2-D unit vectors, cos = cos of the angle)
    lab = torch.tensor([_unit(0), _unit(90), _unit(180)])
    y = torch.tensor([0, 0, 1])
    unl = torch.tensor([_unit(45), _unit(150)]) * 3.0  # scale is irrelevant (cosine)
    s = wad_scores(unl, lab, y, 2)
    # 45 deg: class 0 max(cos 45, cos 45) = 0.7071, class 1 cos 135 = -0.7071
    # 150 deg: class 0 max(cos 150, cos 60) = 0.5 (the mean would be -0.183), class 1 cos 30 = 0.8660
    expected = torch.tensor(
        [[math.cos(math.radians(45)), math.cos(math.radians(135))], [0.5, math.cos(math.radians(30))]]
    )
    assert torch.allclose(s, expected, atol=1e-6)
    pseudo, w = wad_knowledge(s)
    assert pseudo.tolist() == [0, 1]
    # weight = s1 * (1 - s2 / s1) = s1 - s2
    assert torch.allclose(
        w, torch.tensor([2 * math.cos(math.radians(45)), math.cos(math.radians(30)) - 0.5]), atol=1e-6
    )


def test_margin_weight_is_small_between_classes():
    lab = torch.tensor([_unit(0), _unit(90)])
    y = torch.tensor([0, 1])
    between, near = torch.tensor([_unit(45)]), torch.tensor([_unit(5)])
    _, w_between = wad_knowledge(wad_scores(between, lab, y, 2))
    _, w_near = wad_knowledge(wad_scores(near, lab, y, 2))
    assert float(w_between) == pytest.approx(0.0, abs=1e-6)
    assert float(w_near) == pytest.approx(math.cos(math.radians(5)) - math.cos(math.radians(85)), abs=1e-6)


def test_scores_errors():
    with pytest.raises(KdforgeError):
        wad_scores(torch.randn(3, 2), torch.randn(2, 2), torch.tensor([0, 0]), 2)  # class 1 has no exemplar
    with pytest.raises(KdforgeError):
        wad_knowledge(torch.randn(3, 1))


def test_polynomial_decay_matches_the_official_schedule():
    # alpha_r = 0.1 * (1 - r / 5)^2, clipped at r = 5
    assert [round(polynomial_decay(r, 0.1, 0.0, 5), 6) for r in (0, 1, 2, 5, 6)] == [
        0.1,
        0.064,
        0.036,
        0.0,
        0.0,
    ]


def test_select_confident_takes_lowest_ce():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0], [0.0, 0.1]])
    pseudo = torch.tensor([0, 1, 1, 0])
    ce = F.cross_entropy(logits, pseudo, reduction="none")  # sample 1 lowest, then 0
    picked = select_confident(logits, pseudo, 0.5)
    assert sorted(picked.tolist()) == sorted(torch.argsort(ce)[:2].tolist()) == [0, 1]
    assert len(select_confident(logits, pseudo, 0.1)) == 0  # int(0.1 * 4) = 0


def test_weighted_pseudo_ce_hand_case():
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    pseudo = torch.tensor([0, 1])
    w = torch.tensor([0.5, 2.0])
    # CE: -ln(3/4) and ln 2; mean of weighted values (weights are not normalised)
    expected = (0.5 * -math.log(0.75) + 2.0 * math.log(2)) / 2
    assert float(weighted_pseudo_ce(logits, pseudo, w)) == pytest.approx(expected, rel=1e-6)


def test_nt_xent_hand_case():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    t = 0.5
    # anchor 0 (z1[0]): positive z2[0] cos 1; negatives z1[1] cos 0, z2[1] cos 0
    a0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    # anchor 1 (z1[1]): positive z2[1] cos -1; negatives z1[0] cos 0, z2[0] cos 0
    a1 = -math.log(math.exp(-2) / (math.exp(-2) + 2))
    # anchors 2 and 3 mirror 0 and 1
    assert float(nt_xent_loss(z1, z2, t)) == pytest.approx((a0 + a1) / 2, rel=1e-6)


def test_mismatch_split_counts():
    x, y, xt, yt = gaussian_blobs(num_classes=6, dim=4, per_class=50, per_class_test=10, seed=0)
    data = mismatch_split(
        x,
        y,
        xt,
        yt,
        known_classes=[1, 3],
        labelled_per_class=5,
        mismatch=0.4,
        seed=0,
        unlabelled_per_class=30,
    )
    assert len(data.labelled) == 10 and sorted(data.labels[data.labelled].unique().tolist()) == [0, 1]
    n_known = 60
    assert int((~data.unknown_mask).sum()) == n_known
    assert int(data.unknown_mask.sum()) == math.ceil(0.4 * n_known / 0.6)  # 40
    assert len(set(data.labelled.tolist()) & set(data.unlabelled.tolist())) == 0
    assert sorted(data.y_test.unique().tolist()) == [0, 1] and len(data.y_test) == 20
    with pytest.raises(KdforgeError):
        mismatch_split(x, y, xt, yt, [1, 3], 5, mismatch=0.9, seed=0)  # not enough unknown samples


class _ZeroWeights(RoundsTask):
    def knowledge(self, labelled, labels, unlabelled):
        return torch.zeros(len(unlabelled), dtype=torch.long), torch.zeros(len(unlabelled))


def test_zero_weights_equal_supervised_training(tmp_path):
    # the labelled stream is the same in both tasks (seed parts (seed, 53, round)); w = 0 adds nothing
    x, y, xt, yt = gaussian_blobs(num_classes=3, dim=4, per_class=40, per_class_test=5, seed=1)
    data = mismatch_split(x, y, xt, yt, [0, 1], 6, 0.3, seed=0, unlabelled_per_class=20)
    settings = loop_settings(LoopConfig(epochs=1, batch_size=8), seed=3)
    states = []
    for name, task in [("sup", RoundsTask(data, [8], 8, 20, seed=3, unlabelled=False)),
                       ("zero", _ZeroWeights(data, [8], 8, 20, seed=3))]:
        states.append(run_stage(tmp_path, name, settings, task, "", quiet=True).module.student.state_dict())
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])


def test_rounds_move_the_scheduled_fraction(tmp_path):
    cfg = load_task_config(WADConfig, None, [t for t in TINY if not t.startswith("trainer.")])
    data = build_ssl(cfg)
    res = run_wad(cfg, tmp_path, data, quiet=True)
    u0 = len(data.unlabelled)
    r1, r2, r3 = res["rounds"]
    assert r1["moved"] == int(0.2 * (1 - 1 / 2) ** 2 * u0)  # alpha_1 = 0.05
    assert r2["labelled"] == len(data.labelled) + r1["moved"] and r2["unlabelled"] == u0 - r1["moved"]
    assert "moved" not in r3 and 0.0 <= res["acc"] <= 100.0  # alpha_{split+1} = 0
    assert res["epochs"] == 3 and res["steps"] == 18      # one Trainer epoch per round


def test_recipe_and_registry():
    assert "wad" in METHODS
    cfg = load_task_config(WADConfig, "configs/methods/wad.yaml", ["wad.mode=pseudo"])
    assert cfg.wad.mode == "pseudo" and cfg.wad.split == 5 and cfg.train.optim.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="wad.splt"):
        load_task_config(WADConfig, {"wad": {"splt": 3}})
    with pytest.raises(ConfigError):
        load_task_config(WADConfig, {"wad": {"mode": "fixmatch"}}).check()


def test_teacher_is_a_function_of_its_seed(tmp_path):
    cfg = load_task_config(
        WADConfig,
        None,
        [
            "data.per_class=40",
            "data.per_class_test=5",
            "data.unlabelled_per_class=20",
            "teacher.loop.epochs=1",
        ],
    )
    data = build_ssl(cfg)
    first = train_teacher(cfg, data, tmp_path / "a", seed=4, quiet=True).state_dict()
    torch.rand(7)  # the global RNG state must not matter
    second = train_teacher(cfg, data, tmp_path / "b", seed=4, quiet=True).state_dict()
    other = train_teacher(cfg, data, tmp_path / "c", seed=5, quiet=True).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_recipe_writes_teacher_stage_and_final_run_directory(tmp_path):
    from kdforge.cli import main

    run = tmp_path / "run"
    assert main(["train", RECIPE, "--out", str(run), *TINY]) == 0
    for d in (run, run / "stages/teacher"):
        for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors"):
            assert (d / name).is_file(), d / name
    result = json.loads((run / "result.json").read_text())
    assert 0 <= result["acc"] <= 100 and len(result["rounds"]) == 3 and result["steps"] == 18
    assert "train_unsup" in (run / "metrics.csv").read_text().splitlines()[0]
    assert main(["train", "--resume", str(run)]) == 0       # a finished run retrains nothing
    supervised = tmp_path / "supervised"      # labelled CE only: no teacher stage, one epoch of all steps
    assert main(["train", RECIPE, "--out", str(supervised), *TINY, "wad.mode=supervised"]) == 0
    result = json.loads((supervised / "result.json").read_text())
    assert not (supervised / "stages").exists() and result["steps"] == 18 and result["rounds"] == []


@pytest.mark.parametrize("stop_after", [3, 9, 12])
def test_stop_and_resume_is_bit_identical(tmp_path, stop_after):
    # 3: inside the teacher stage (6 steps); 9: inside round 2 of the classifier (steps 6-12); 12: at
    # the end of round 2 (samples are moved, the next round starts with a fresh optimizer)
    assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=stop_after)


def test_two_gloo_processes_match_one(tmp_path):
    # teacher: NT-Xent over all-gathered projections; classifier: per-sample means of both streams
    assert_ddp_matches(Path(RECIPE), [*TINY, "trainer.threads=1"], tmp_path)


def test_teacher_only_run_is_shared_through_teacher_run(tmp_path):
    # an experiment trains the seed's teacher once (teacher_only) and hands it to every arm (teacher_run):
    # the arm must train exactly what a full run (teacher stage inside) trains
    from kdforge.train.stages import run_recipe

    full = run_recipe(RECIPE, TINY, out=tmp_path / "full")
    run_recipe(RECIPE, [*TINY, "teacher_only=true"], out=tmp_path / "teacher")
    arm = run_recipe(RECIPE, [*TINY, f"teacher_run={tmp_path / 'teacher'}"], out=tmp_path / "arm")
    assert not (tmp_path / "arm/stages").exists() and not (tmp_path / "teacher/stages").exists()
    assert arm["acc"] == full["acc"] and arm["rounds"] == full["rounds"]
    with pytest.raises(ConfigError, match="data.mismatch"):
        run_recipe(RECIPE, [*TINY, "data.mismatch=0.3", f"teacher_run={tmp_path / 'teacher'}"], out=tmp_path / "o")
    with pytest.raises(ConfigError, match="no finished run"):
        run_recipe(RECIPE, [*TINY, f"teacher_run={tmp_path / 'none'}"], out=tmp_path / "x")
    # the premise of an experiment reads flat keys: the first round's weights of known vs unknown samples
    first = full["rounds"][0]
    assert full["mean_w_known_round1"] == first["mean_w_known"]
    assert full["mean_w_unknown_round1"] == first["mean_w_unknown"]
    assert full["pseudo_acc_known_round1"] == first["pseudo_acc_known"]
    assert full["moved_total"] == sum(r.get("moved", 0) for r in full["rounds"]) > 0
    pseudo = run_recipe(RECIPE, [*TINY, "wad.mode=pseudo", f"teacher_run={tmp_path / 'teacher'}"], out=tmp_path / "p")
    assert pseudo["mean_w_known_round1"] == pseudo["mean_w_unknown_round1"] == 1.0
