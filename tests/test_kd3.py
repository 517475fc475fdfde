"""KD³ mechanism against hand-worked values and direct formulas; its recipe through the one Trainer.

Issue 11's audit (seed 0) found the selection collapsing classes: a global confidence threshold
kept 7 to 217 images per class, the student-mixing + agreement gate fed the student's misses back
into the selection, and the KL term was masked to the selected samples. The tests marked
"(issue 11)" fail on that code.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_ddp_matches, assert_resume_exact

from kdforge.cli import main as cli_main
from kdforge.errors import ConfigError, KdforgeError
from kdforge.experiment.recipe import load_experiment
from kdforge.experiment.runner import plan
from kdforge.methods.kd3 import (
    KD3Args,
    KD3Config,
    KD3Task,
    combined_prediction,
    info_nce,
    kd3_losses,
    mix_distribution,
    mix_lambdas,
    select_instances,
    teacher_weight,
)
from kdforge.tasks.common import load_task_config
from kdforge.tasks.datafree import build_datafree, shuffle_tiles, tiny_cnn
from kdforge.train.checkpoint import load_tensors
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import recipe_tree, run_recipe, split_trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "methods" / "kd3.yaml"
EXPERIMENT = ROOT / "configs" / "experiments" / "kd3.yaml"
# teacher: 4 steps/epoch x 1; student: 4 steps/epoch x 2. keep_fraction 0.3 selects about a third of
# each pseudo-class, so batch shares select different counts (the global Σm matters under DDP)
TINY = [
    "data.num_orig=128", "data.num_web=128", "data.num_test=64", "data.num_val=32", "data.image_size=8",
    "teacher_width=4", "student_width=4",
    "teacher_loop.epochs=1", "teacher_loop.batch_size=32", "student_loop.epochs=2", "student_loop.batch_size=32",
    "kd3.keep_fraction=0.3", "trainer.progress=false", "trainer.threads=1",
]


def _cfg(recipe, overrides) -> KD3Config:
    """A kd3 recipe (+ overrides) validated into its schema, as `kdforge train` reads it."""
    cfg = load_task_config(KD3Config, split_trainer(*recipe_tree(recipe, overrides))[0])
    cfg.check()
    return cfg


def test_teacher_weight_schedule_is_linear():
    assert teacher_weight(0, 11) == 1.0
    assert teacher_weight(10, 11) == 0.5
    assert teacher_weight(5, 11) == pytest.approx(0.75)


def test_combined_prediction_hand_worked():
    zt = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]))
    zs = torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.1, 0.9]]))
    p = combined_prediction(zt, zs, 0.5)
    assert torch.allclose(p, torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.15, 0.85]]), atol=1e-6)
    with pytest.raises(KdforgeError):
        combined_prediction(zt, zs, 1.5)


def test_selection_keeps_a_quantile_of_every_pseudo_class():
    # (issue 11) class 0 is confidently predicted, class 1 only weakly: a global threshold (0.7)
    # would keep nothing of class 1; the per-class quantile keeps the top half of each class
    conf = torch.tensor([0.95, 0.55, 0.90, 0.85, 0.45, 0.80, 0.50])
    cls = torch.tensor([0, 1, 0, 0, 1, 0, 1])
    p = torch.zeros(7, 3)
    p[torch.arange(7), cls] = conf
    p[torch.arange(7), 2] = (1 - conf) / 2          # never the argmax
    p[torch.arange(7), 1 - cls] = 1 - conf - (1 - conf) / 2
    mask, w, pseudo = select_instances(p, keep_fraction=0.5)
    assert pseudo.tolist() == cls.tolist() and torch.allclose(w, conf)
    assert mask.tolist() == [1, 1, 1, 0, 0, 0, 1]     # class 0: 0.95, 0.90 (2 of 4); class 1: 0.55, 0.50 (2 of 3)
    assert select_instances(p, keep_fraction=1.0)[0].tolist() == [1.0] * 7
    # the optional agreement gate only removes instances; it is off by default (it feeds the
    # student's misses back into the selection: a class the student does not predict is never kept)
    agree = torch.tensor([True, False, True, True, True, True, True])
    assert select_instances(p, 0.5, agree)[0].tolist() == [1, 0, 1, 0, 0, 0, 1]
    assert KD3Args().agreement_warmup is None
    with pytest.raises(KdforgeError):
        select_instances(p, 0.0)


def test_kl_on_every_sample_ce_and_feature_on_the_selected():
    # (issue 11) the old loss masked the KL to the selected samples: with nothing selected it was 0
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 3), torch.randn(4, 3)
    hs, ht = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    w = torch.tensor([0.9, 0.5, 0.7, 0.8])
    y = torch.tensor([0, 1, 2, 0])
    kl, ce, feat = kd3_losses(zs, zt, hs, ht, mask, w, y, temperature=2.0)
    exp_kl = 0.0
    for i in range(4):
        pt, ps = F.softmax(zt[i] / 2, 0), F.softmax(zs[i] / 2, 0)
        exp_kl += float((pt * (pt.log() - ps.log())).sum()) * 4 / 4
    exp_ce = sum(-math.log(float(F.softmax(zs[i], 0)[y[i]])) for i in (0, 2, 3))
    exp_feat = sum(float(w[i]) * float(((hs[i] - ht[i]) ** 2).sum()) / 5 for i in (0, 2, 3))
    assert float(kl) == pytest.approx(exp_kl, rel=1e-5)
    assert float(ce) == pytest.approx(exp_ce / 3, rel=1e-5)
    assert float(feat) == pytest.approx(exp_feat / 3, rel=1e-5)
    kl0, ce0, feat0 = kd3_losses(zs.requires_grad_(), zt, hs, ht, torch.zeros(4), w, y, temperature=2.0)
    assert float(kl0.detach()) == pytest.approx(exp_kl, rel=1e-5)                 # the KL does not depend on the mask
    assert float(ce0.detach()) == 0.0 and float(feat0.detach()) == 0.0 and ce0.requires_grad
    # one rank's share of a global batch: the gated terms are divided by the global Σm instead of its own
    _, half_ce, half_feat = kd3_losses(zs, zt, hs, ht, mask, w, y, temperature=2.0, denom=torch.tensor(6.0))
    assert float(half_ce.detach()) == pytest.approx(exp_ce / 6, rel=1e-5)
    assert float(half_feat.detach()) == pytest.approx(exp_feat / 6, rel=1e-5)


def test_epoch_selection_is_class_balanced_over_the_pool():
    # (issue 11) the selection is re-estimated over the whole pool at each epoch start: every
    # pseudo-class keeps ceil(keep · n_c) instances, whatever the teacher's calibration per class
    cfg = _cfg(RECIPE, TINY)
    data = cfg.data.build()
    torch.manual_seed(0)
    task = KD3Task(cfg, data, tiny_cnn(10, 4), epochs=2)
    module = task.build(torch.device("cpu"), DistEnv())
    n = len(data.web_images)
    # the pool's teacher logits: class i % 10, confident on classes 0-4 (margin 6), hesitant on 5-9 (margin
    # 1.5 + noise); a global threshold would keep (nearly) nothing of classes 5-9
    margin = torch.where(torch.arange(n) % 10 < 5, 6.0, 1.5) + 0.1 * torch.randn(n)
    task._teacher_logits = F.one_hot(torch.arange(n) % 10, 10).float() * margin[:, None]
    task.on_epoch_start(module, 1)                                 # λ = 0.5: teacher and student both vote
    counts = torch.bincount(task.sel_pseudo, minlength=10)
    kept = torch.bincount(task.sel_pseudo[task.sel_mask > 0], minlength=10)
    assert (counts > 0).sum() >= 8 and (kept > 0).sum() == (counts > 0).sum()
    assert kept.tolist() == [math.ceil(0.3 * int(c) - 1e-9) for c in counts]
    state = task.state_dict()
    before = task.sel_mask.clone()
    task.on_epoch_start(module, 1)                                 # a resumed epoch keeps its selection
    assert torch.equal(task.sel_mask, before) and float(task.totals[2]) == len(data.web_images)
    other = KD3Task(cfg, data, task.teacher, epochs=2)
    other.load_state_dict(state)
    assert torch.equal(other.sel_mask, before) and other.sel_epoch == 1


def test_validation_split_is_held_out_original_data():
    kw = {"num_orig": 64, "num_web": 60, "num_test": 32, "image_size": 8}
    a, b = build_datafree(**kw), build_datafree(**kw, num_val=16)
    assert len(a.val_images) == 0 and len(b.val_images) == 16 and len(b.test_images) == 32
    assert torch.equal(a.web_images, b.web_images) and torch.equal(a.orig_images, b.orig_images)
    flat_val, flat_test = b.val_images.flatten(1), b.test_images.flatten(1)
    assert not (flat_val[:, None] == flat_test[None]).all(-1).any()      # no validation image is a test image


def test_mix_distribution_moves_channel_statistics():
    torch.manual_seed(1)
    u = torch.randn(3, 2, 4, 4) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1) + 2.0 * torch.arange(3.0).view(
        3, 1, 1, 1
    )
    perm = torch.tensor([2, 0, 1])
    lam = torch.tensor([1.0, 0.0, 0.25])
    out = mix_distribution(u, perm, lam, eps=0.0)
    mu, sd = u.mean((2, 3)), u.std((2, 3), unbiased=False)
    omu, osd = out.mean((2, 3)), out.std((2, 3), unbiased=False)
    assert torch.allclose(out[0], u[0], atol=1e-5)  # λ = 1: unchanged
    assert torch.allclose(omu[1], mu[0], atol=1e-5) and torch.allclose(osd[1], sd[0], atol=1e-4)  # λ = 0: swapped
    assert torch.allclose(omu[2], 0.25 * mu[2] + 0.75 * mu[1], atol=1e-5)
    assert torch.allclose(osd[2], 0.25 * sd[2] + 0.75 * sd[1], atol=1e-4)


def test_info_nce_matches_hand_value():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zp = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    c = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau)))
    l1 = -math.log(math.exp(c / tau) / (math.exp(0.0) + math.exp(c / tau)))
    assert float(info_nce(z, zp, tau)) == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_shuffle_tiles_is_a_permutation_of_tiles():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    out = shuffle_tiles(x, g, grid=2)
    for i in range(2):
        tiles = {tuple(x[i, 0, r : r + 2, c : c + 2].flatten().tolist()) for r in (0, 2) for c in (0, 2)}
        got = {tuple(out[i, 0, r : r + 2, c : c + 2].flatten().tolist()) for r in (0, 2) for c in (0, 2)}
        assert tiles == got


def test_recipe_rejects_unknown_key_and_bad_arm():
    with pytest.raises(ConfigError, match="bogus"):
        load_task_config(KD3Config, {"kd3": {"bogus": 1}})
    cfg = load_task_config(KD3Config, {"kd3": {"arm": "nope"}})
    with pytest.raises(ConfigError):
        cfg.check()
    with pytest.raises(ConfigError, match="keep_fraction"):
        load_task_config(KD3Config, {"kd3": {"keep_fraction": 0.0}}).check()


def test_mix_lambdas_are_a_pure_function_of_the_seed():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a, b = mix_lambdas(16, 0.1, 0, 3, 1, 2), mix_lambdas(16, 0.1, 0, 3, 1, 2)
    assert torch.equal(a, b) and not torch.equal(a, mix_lambdas(16, 0.1, 0, 3, 1, 3))
    assert torch.equal(torch.random.get_rng_state(), before)      # the global stream is untouched
    assert a.min() >= 0 and a.max() <= 1


def test_group_norm_variant_keeps_the_init_and_drops_batch_coupling():
    torch.manual_seed(0)
    bn = tiny_cnn(10, 4)
    torch.manual_seed(0)
    gn = tiny_cnn(10, 4, "group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert torch.equal(bn.fc.weight, gn.fc.weight)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(gn(x)[:2], gn(x[:2]), atol=1e-6)        # a sample's output ignores the others
    with pytest.raises(KdforgeError, match="norm"):
        tiny_cnn(10, 4, "layer")


def test_stop_and_resume_is_bit_identical(tmp_path):
    # teacher stage: 4 steps; stop inside it, then inside the student's second epoch (selection on,
    # MixDistribution λ's and partners drawn per step, the selection buffer mid-way)
    assert_resume_exact(RECIPE, TINY, tmp_path / "teacher", stop_after=2)
    full = assert_resume_exact(RECIPE, TINY, tmp_path / "student", stop_after=6)
    assert full["steps"] == 8 and 0.3 <= full["selected_fraction"] < 0.5
    assert {"test_top1", "val_top1", "teacher_test_top1", "web_in_class_top1", "style_gap", "selection_precision",
            "pool_label_precision", "test_worst_class_top1", "test_classes_predicted",
            "last_selected_per_class_min"} <= set(full)


def test_shared_teacher_gives_the_same_student(tmp_path):
    # a teacher_only run handed to a student run via teacher_run = the recipe that trains its own teacher
    teacher = tmp_path / "teacher"
    assert run_recipe(RECIPE, [*TINY, "teacher_only=true"], out=teacher)["stage"] == "teacher"
    whole = run_recipe(RECIPE, TINY, out=tmp_path / "whole")
    shared = run_recipe(RECIPE, [*TINY, f"teacher_run={teacher}"], out=tmp_path / "shared")
    assert not (tmp_path / "shared" / "stages").exists()
    assert shared["test_top1"] == whole["test_top1"] and shared["teacher_test_top1"] == whole["teacher_test_top1"]
    a, b = (load_tensors(tmp_path / d / "checkpoints" / "last.safetensors") for d in ("whole", "shared"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a kd3 run's own teacher stage can be reused too; another data set or teacher cannot
    again = run_recipe(RECIPE, [*TINY, f"teacher_run={tmp_path / 'whole'}"], out=tmp_path / "again")
    assert again["test_top1"] == whole["test_top1"]
    with pytest.raises(ConfigError, match="data"):
        run_recipe(RECIPE, [*TINY, "data.seed=1", f"teacher_run={teacher}"], out=tmp_path / "bad")
    with pytest.raises(ConfigError, match="no finished teacher"):
        run_recipe(RECIPE, [*TINY, f"teacher_run={tmp_path / 'nowhere'}"], out=tmp_path / "bad2")


def test_experiment_recipe_cells_are_valid_kd3_recipes():
    cfg = load_experiment(EXPERIMENT)
    assert len(cfg.seeds) >= 5 and cfg.baseline == "kd" and cfg.method == "kd3"
    stages, arms = plan(cfg, Path("/x"))
    assert [s.name for s in stages] == ["teacher"]
    assert _cfg(stages[0].recipe, stages[0].overrides).teacher_only
    seen = {}
    for cell in arms:
        c = _cfg(cell.recipe, cell.overrides)
        assert c.teacher_run == "/x/stages/teacher" and c.seed == cell.seed
        seen[cell.name] = (c.kd3.arm, c.kd3.selection)
    assert seen == {"kd": ("kd", True), "kd3": ("kd3", True), "no_selection": ("kd3", False)}


def test_cli_train_writes_a_complete_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), *TINY, "kd3.arm=kd", "--out", str(out)]) == 0
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors",
                 "stages/teacher/config.yaml", "stages/teacher/metrics.csv", "stages/teacher/result.json",
                 "stages/teacher/checkpoints/last.safetensors"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["arm"] == "kd" and "selected_fraction" not in result and result["steps"] == 8
    teacher = json.loads((out / "stages/teacher/result.json").read_text())
    assert teacher["test_top1"] == pytest.approx(result["teacher_test_top1"])
    assert "kd3" in (out / "config.yaml").read_text() and "threads: 1" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert cli_main(["train", str(RECIPE), *TINY, "--out", str(out)]) == 2       # one line, no retraining
    assert "already holds a run" in capsys.readouterr().err


def test_two_gloo_processes_match_one(tmp_path):
    # per-sample GroupNorm and no InfoNCE: selection, CE+KD and the feature term are per-sample with a
    # global Σm, so 2 ranks x 16 reproduce 1 rank x 32 (with BatchNorm/InfoNCE DDP uses per-rank statistics)
    assert_ddp_matches(RECIPE, [*TINY, "norm=group", "kd3.con_weight=0"], tmp_path)
