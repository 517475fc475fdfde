"""OTD mechanism: per-sample head gradients, energy rank, subspace projection, EMA, navigation."""

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.otd import (
    GradientSubspace,
    OTDConfig,
    ema_stat,
    energy_rank,
    mix_domains,
    navigate,
    per_sample_head_grads,
)
from kdforge.tasks.common import load_task_config


def test_per_sample_head_grads_match_functorch():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4), torch.randn(3)
    h, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])

    def loss(wt, hi, yi):
        return F.cross_entropy((hi @ wt.T + b)[None], yi[None])

    ref = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, h, y)
    got = per_sample_head_grads(h, h @ w.T + b, y)
    assert torch.allclose(got, ref, atol=1e-6)


def test_head_grads_are_differentiable_through_features():
    h = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(2, 3)
    g = per_sample_head_grads(h, h @ w.T, torch.tensor([0, 1]))
    (g.pow(2).sum()).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_energy_rank_hand_values():
    assert energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.98) == 2  # 9/10.01 = 0.899 < 0.98 <= 10/10.01
    assert energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.85) == 1
    assert energy_rank(torch.tensor([1.0, 1.0]), 1.0) == 2
    with pytest.raises(KdforgeError):
        energy_rank(torch.tensor([1.0]), 0.0)


def test_subspace_projection_after_svd():
    s = GradientSubspace(dim=3, size=4, every=4, energy=0.98)
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(s.project(x), x)  # identity before the first SVD
    for v in ([1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0]):
        s.push(torch.tensor(v))
    assert s.basis is not None and s.basis.shape == (3, 2)  # energies 10 and 5 -> both needed at 98 %
    assert torch.allclose(s.project(x), torch.tensor([1.0, 2.0, 0.0]), atol=1e-6)


def test_ema_stat_keeps_current_graph_only():
    stored = torch.tensor([1.0], requires_grad=True)
    cur = torch.tensor([3.0], requires_grad=True)
    out = ema_stat(stored, cur, 0.95)
    assert float(out.detach()) == pytest.approx(0.95 + 0.15)
    out.sum().backward()
    assert stored.grad is None and float(cur.grad) == pytest.approx(0.05)


def test_navigation_waits_for_full_bank_then_adds_projection():
    s = GradientSubspace(dim=2, size=2, every=2)
    g1 = torch.tensor([1.0, 0.0])
    assert torch.equal(navigate(g1, s, 0.1), g1)  # bank not full
    out = navigate(torch.tensor([2.0, 0.0]), s, 0.1)  # second push -> SVD; basis = e1
    assert torch.allclose(out, torch.tensor([2.2, 0.0]))
    out = navigate(torch.tensor([1.0, 1.0]), s, 0.1)  # 3rd push: no re-SVD yet, basis still e1
    assert torch.allclose(out, torch.tensor([1.1, 1.0]), atol=1e-6)
    out = navigate(torch.tensor([0.0, 1.0]), s, 0.1)  # 4th push: bank [1,1],[0,1] spans R^2 -> g + 0.1 g
    assert torch.allclose(out, torch.tensor([0.0, 1.1]), atol=1e-6)


def test_mix_pastes_a_square_target_patch():
    g = torch.Generator().manual_seed(0)
    src = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    tgt = torch.full((3, 1, 8, 8), 9, dtype=torch.uint8)
    out = mix_domains(src, tgt, g, 0.5)
    assert ((out == 9).sum((1, 2, 3)) == 16).all()


def test_recipe_rejects_unknown_key():
    with pytest.raises(ConfigError, match="nope"):
        load_task_config(OTDConfig, {"otd": {"nope": 1}})
    with pytest.raises(ConfigError):
        load_task_config(OTDConfig, {"otd": {"arm": "x"}}).check()
