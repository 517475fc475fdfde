"""KD³ mechanism against hand-worked values and direct formulas; its recipe through the one Trainer."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_ddp_matches, assert_resume_exact

from kdforge.cli import main as cli_main
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.kd3 import (
    KD3Config,
    combined_prediction,
    info_nce,
    kd3_kd_feat_losses,
    mix_distribution,
    mix_lambdas,
    select_instances,
    teacher_weight,
)
from kdforge.tasks.common import load_task_config
from kdforge.tasks.datafree import shuffle_tiles, tiny_cnn

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "methods" / "kd3.yaml"
# teacher: 4 steps/epoch x 1; student: 4 steps/epoch x 2. The 1-epoch teacher is barely confident:
# threshold 0.13 keeps about 3/4 of the web pool in the student's first epoch and 1/20 in its second
# (so some batch shares select nothing while others do: the global Σm matters under DDP)
TINY = [
    "data.num_orig=128", "data.num_web=128", "data.num_test=64", "data.image_size=8",
    "teacher_width=4", "student_width=4",
    "teacher_loop.epochs=1", "teacher_loop.batch_size=32", "student_loop.epochs=2", "student_loop.batch_size=32",
    "kd3.threshold=0.13", "kd3.agreement_warmup=5", "trainer.progress=false", "trainer.threads=1",
]


def test_teacher_weight_schedule_is_linear():
    assert teacher_weight(0, 11) == 1.0
    assert teacher_weight(10, 11) == 0.5
    assert teacher_weight(5, 11) == pytest.approx(0.75)


def test_selection_hand_worked():
    zt = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]))
    zs = torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.1, 0.9]]))
    p = combined_prediction(zt, zs, 0.5)
    assert torch.allclose(p, torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.15, 0.85]]), atol=1e-6)
    mask, conf, pseudo = select_instances(p, zt, zs, threshold=0.7, agreement=False)
    assert mask.tolist() == [1.0, 0.0, 1.0] and pseudo.tolist() == [0, 1, 1]
    assert torch.allclose(conf, torch.tensor([0.8, 0.6, 0.85]))
    # with agreement, row 1 (teacher says 0, student says 1) would be dropped even with a low threshold
    mask2, _, _ = select_instances(p, zt, zs, threshold=0.5, agreement=True)
    assert mask2.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(KdforgeError):
        combined_prediction(zt, zs, 1.5)


def test_kd_and_feature_losses_match_formula():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 3), torch.randn(4, 3)
    hs, ht = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    w = torch.tensor([0.9, 0.5, 0.7, 0.8])
    y = torch.tensor([0, 1, 2, 0])
    l_kd, l_feat = kd3_kd_feat_losses(zs, zt, hs, ht, mask, w, y, temperature=2.0)
    exp_kd, exp_feat = 0.0, 0.0
    for i in (0, 2, 3):
        pt, ps = F.softmax(zt[i] / 2, 0), F.softmax(zs[i] / 2, 0)
        kl = float((pt * (pt.log() - ps.log())).sum()) * 4
        ce = -math.log(float(F.softmax(zs[i], 0)[y[i]]))
        exp_kd += ce + kl
        exp_feat += float(w[i]) * float(((hs[i] - ht[i]) ** 2).sum()) / 5
    assert float(l_kd) == pytest.approx(exp_kd / 3, rel=1e-5)
    assert float(l_feat) == pytest.approx(exp_feat / 3, rel=1e-5)
    zero_kd, _ = kd3_kd_feat_losses(zs.requires_grad_(), zt, hs, ht, torch.zeros(4), w, y)
    assert float(zero_kd.detach()) == 0.0 and zero_kd.requires_grad
    # one rank's share of a global batch: divided by the global Σm instead of its own
    half_kd, half_feat = kd3_kd_feat_losses(zs, zt, hs, ht, mask, w, y, temperature=2.0, denom=torch.tensor(6.0))
    assert float(half_kd.detach()) == pytest.approx(exp_kd / 6, rel=1e-5)
    assert float(half_feat) == pytest.approx(exp_feat / 6, rel=1e-5)


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
    assert full["steps"] == 8 and 0 < full["selected_fraction"] < 1
    assert {"test_top1", "teacher_test_top1", "web_in_class_top1", "style_gap", "selection_precision"} <= set(full)


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
