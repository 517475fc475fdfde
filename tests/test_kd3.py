"""KD³ mechanism against hand-worked values and direct formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.kd3 import (
    KD3Config,
    combined_prediction,
    info_nce,
    kd3_kd_feat_losses,
    mix_distribution,
    select_instances,
    teacher_weight,
)
from kdforge.tasks.common import load_task_config
from kdforge.tasks.datafree import shuffle_tiles


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
