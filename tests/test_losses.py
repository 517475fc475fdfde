"""Baseline losses checked against independent numpy / plain-math computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdforge.losses as L
from kdforge.errors import KdforgeError
from kdforge.losses import LossContext
from kdforge.registry import LOSSES, build

ATOL = 1e-5


def t64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64))


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis."""
    return (p * (np.log(p) - np.log(q))).sum(-1)


# --------------------------------------------------------------------------- registry

def test_registry_names_and_metadata():
    expected = {"ce", "kd", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "crd"}
    assert expected <= set(LOSSES.names())
    for name in expected:
        meta = LOSSES.meta(name)
        assert meta["family"] and meta["paper"] and meta["group"] in {"task", "distill"}
        assert issubclass(LOSSES.get(name), L.DistillLoss)
    assert LOSSES.meta("ce")["group"] == "task" and LOSSES.get("ce").needs_teacher is False
    assert LOSSES.meta("kd")["paper"].startswith("Hinton")
    assert build(LOSSES, "kd", temperature=2.0).temperature == 2.0
    with pytest.raises(KdforgeError, match="kd"):
        build(LOSSES, "kd", temp=2.0)


# --------------------------------------------------------------------------- ce

def test_ce_hand_worked():
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    target = [1, 0]
    nll = []
    for row, y in zip(logits, target):
        lse = math.log(sum(math.exp(v) for v in row))
        nll.append(lse - row[y])
    ctx = LossContext(target=torch.tensor(target))
    got = L.CELoss()(t64(logits), None, ctx)
    assert got.item() == pytest.approx(sum(nll) / 2, abs=ATOL)
    # label smoothing: (1 - eps) * nll + eps * mean over classes of -log p
    eps = 0.1
    smooth = []
    for row, y in zip(logits, target):
        lse = math.log(sum(math.exp(v) for v in row))
        smooth.append((1 - eps) * (lse - row[y]) + eps * sum(lse - v for v in row) / 3)
    got = L.CELoss(label_smoothing=eps)(t64(logits), None, ctx)
    assert got.item() == pytest.approx(sum(smooth) / 2, abs=ATOL)


def test_ce_needs_target():
    with pytest.raises(KdforgeError, match="ctx.target"):
        L.CELoss()(torch.randn(2, 3), None, LossContext())


# --------------------------------------------------------------------------- kd

def test_kd_hand_worked_2x3():
    s = [[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]]
    t = [[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    T = 2.0
    total = 0.0
    for rs, rt in zip(s, t):
        zs = sum(math.exp(v / T) for v in rs)
        zt = sum(math.exp(v / T) for v in rt)
        ps = [math.exp(v / T) / zs for v in rs]
        pt = [math.exp(v / T) / zt for v in rt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = total / 2 * T * T
    assert L.kd_loss(t64(s), t64(t), T).item() == pytest.approx(expected, abs=ATOL)
    assert L.KDLoss(T)(t64(s), t64(t), LossContext()).item() == pytest.approx(expected, abs=ATOL)


def test_kd_zero_for_equal_logits_and_t_squared_scaling():
    torch.manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64)
    assert L.kd_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-12)
    t = torch.randn(5, 7, dtype=torch.float64)
    for T in (1.0, 2.0, 4.0, 8.0):
        kl = np_kl(np_softmax(t.numpy() / T), np_softmax(s.numpy() / T)).mean()
        assert L.kd_loss(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-9)
    # For large T the softened KL shrinks like 1/T^2, so T^2 * KL tends to a constant:
    # sum_c (d_c - mean d)^2 / (2 C) with d = t - s (second-order expansion).
    d = (t - s).numpy()
    limit = ((d - d.mean(1, keepdims=True)) ** 2).sum(1).mean() / (2 * 7)
    assert L.kd_loss(s, t, 1000.0).item() == pytest.approx(limit, rel=1e-2)


def test_kd_shape_mismatch():
    with pytest.raises(KdforgeError, match=r"\(2, 3\).*\(2, 4\)"):
        L.kd_loss(torch.randn(2, 3), torch.randn(2, 4))


# --------------------------------------------------------------------------- dkd

def np_dkd_parts(s: np.ndarray, t: np.ndarray, y: np.ndarray, T: float) -> tuple[float, float]:
    """TCKD and NCKD from the paper's definitions (binary and renormalised non-target KLs)."""
    tck, nck = [], []
    for zs, zt, c in zip(s, t, y):
        ps, pt = np_softmax(zs / T), np_softmax(zt / T)
        bs = np.array([ps[c], 1 - ps[c]])
        bt = np.array([pt[c], 1 - pt[c]])
        tck.append(np_kl(bt, bs))
        others = [j for j in range(len(zs)) if j != c]
        qs = ps[others] / (1 - ps[c])
        qt = pt[others] / (1 - pt[c])
        nck.append(np_kl(qt, qs))
    return float(np.mean(tck)) * T * T, float(np.mean(nck)) * T * T


def test_dkd_decomposition_matches_numpy():
    s = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]])
    t = np.array([[3.0, 1.0, 0.0], [0.0, 0.2, 1.0]])
    y = np.array([0, 2])
    T, alpha, beta = 2.0, 1.5, 8.0
    tckd, nckd = np_dkd_parts(s, t, y, T)
    got_t, got_n = L.dkd_parts(t64(s), t64(t), torch.tensor(y), T)
    assert got_t.item() == pytest.approx(tckd, abs=1e-9)
    assert got_n.item() == pytest.approx(nckd, abs=1e-9)
    got = L.dkd_loss(t64(s), t64(t), torch.tensor(y), alpha, beta, T)
    assert got.item() == pytest.approx(alpha * tckd + beta * nckd, abs=1e-9)
    module = L.DKDLoss(alpha=alpha, beta=beta, temperature=T)
    assert module(t64(s), t64(t), LossContext(target=torch.tensor(y))).item() == pytest.approx(
        alpha * tckd + beta * nckd, abs=1e-9)


def test_dkd_relates_to_kd_per_sample():
    # Paper Eq. 7: KD = TCKD + (1 - p_t^teacher) * NCKD for each sample.
    torch.manual_seed(1)
    s, t = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    y = torch.tensor([3])
    T = 3.0
    tckd, nckd = L.dkd_parts(s, t, y, T)
    pt_gt = torch.softmax(t / T, 1)[0, 3].item()
    assert L.kd_loss(s, t, T).item() == pytest.approx(tckd.item() + (1 - pt_gt) * nckd.item(), rel=1e-9)


def test_dkd_extreme_logits_stay_finite():
    s = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-50.0, 50.0, 0.0]])
    loss = L.dkd_loss(s, t, torch.tensor([0]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_needs_target():
    with pytest.raises(KdforgeError, match="ctx.target"):
        L.DKDLoss()(torch.randn(2, 3), torch.randn(2, 3), LossContext())


# --------------------------------------------------------------------------- fitnet

def test_fitnet_hand_worked_and_lists():
    s = [[[1.0, 2.0]], [[0.0, -1.0]]]
    t = [[[0.0, 2.0]], [[1.0, 1.0]]]
    # squared errors: 1, 0, 1, 4 -> mean 1.5
    assert L.fitnet_loss(t64(s), t64(t)).item() == pytest.approx(1.5)
    module = L.FitNetLoss()
    both = module([t64(s), t64(s)], [t64(t), t64(s)], LossContext())
    assert both.item() == pytest.approx(1.5)


def test_fitnet_shape_mismatch_names_shapes_and_connector():
    with pytest.raises(KdforgeError, match=r"\(2, 8, 4, 4\).*\(2, 16, 4, 4\).*connector"):
        L.FitNetLoss()(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4), LossContext())
    with pytest.raises(KdforgeError, match="2 student taps but 1 teacher"):
        L.FitNetLoss()([torch.randn(2, 3)] * 2, [torch.randn(2, 3)], LossContext())


# --------------------------------------------------------------------------- at

def np_at(fs: np.ndarray, ft: np.ndarray, p: float = 2.0) -> float:
    def amap(f):
        a = (f ** p).mean(axis=1).reshape(f.shape[0], -1)
        return a / np.maximum(np.sqrt((a ** 2).sum(1, keepdims=True)), 1e-12)
    return float(((amap(fs) - amap(ft)) ** 2).mean())


def test_at_matches_numpy_and_sums_layers():
    rng = np.random.default_rng(0)
    fs1, ft1 = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 6, 5, 5))
    fs2, ft2 = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 8, 2, 2))
    assert L.at_loss(t64(fs1), t64(ft1)).item() == pytest.approx(np_at(fs1, ft1), rel=1e-9)
    got = L.ATLoss()([t64(fs1), t64(fs2)], [t64(ft1), t64(ft2)], LossContext())
    assert got.item() == pytest.approx(np_at(fs1, ft1) + np_at(fs2, ft2), rel=1e-9)
    assert L.ATLoss(p=4)(t64(fs1), t64(ft1), LossContext()).item() == pytest.approx(
        np_at(fs1, ft1, 4), rel=1e-9)


def test_at_hand_worked():
    # one sample, one channel, 1x2 maps: student [1, 1] -> a = [1, 1]/sqrt2 ; teacher [0, 2] -> [0, 1]
    s = t64([[[[1.0, 1.0]]]])
    t = t64([[[[0.0, 2.0]]]])
    r = 1 / math.sqrt(2)
    expected = ((r - 0) ** 2 + (r - 1) ** 2) / 2
    assert L.at_loss(s, t).item() == pytest.approx(expected, abs=1e-12)


def test_at_spatial_mismatch():
    with pytest.raises(KdforgeError, match=r"\(2, 4, 8, 8\).*\(2, 4, 4, 4\).*spatial"):
        L.at_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4))


# --------------------------------------------------------------------------- sp

def np_sp(fs: np.ndarray, ft: np.ndarray) -> float:
    n = fs.shape[0]

    def gram(f):
        f = f.reshape(n, -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    return float(((gram(fs) - gram(ft)) ** 2).sum() / n ** 2)


def test_sp_matches_numpy_and_hand_case():
    rng = np.random.default_rng(1)
    fs, ft = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 10))
    assert L.sp_loss(t64(fs), t64(ft)).item() == pytest.approx(np_sp(fs, ft), rel=1e-9)
    got = L.SPLoss()([t64(fs), t64(ft)], [t64(ft), t64(fs)], LossContext())
    assert got.item() == pytest.approx(2 * np_sp(fs, ft), rel=1e-9)
    # hand case: orthogonal rows -> G_s = I; identical rows -> G_t rows = [1, 1]/sqrt2
    s = t64([[1.0, 0.0], [0.0, 1.0]])
    t = t64([[1.0, 1.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r ** 2) / 4
    assert L.sp_loss(s, t).item() == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- rkd

def np_huber(x: np.ndarray, y: np.ndarray) -> float:
    d = np.abs(x - y)
    return float(np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean())


def np_rkd(s: np.ndarray, t: np.ndarray, w_d: float = 25.0, w_a: float = 50.0) -> float:
    """Paper formulas, written with explicit loops over pairs and triplets."""
    n = s.shape[0]

    def dist(e):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = np.sqrt(((e[i] - e[j]) ** 2).sum())
        mu = d[d > 0].mean()
        return d / mu

    def angle(e):
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    if nu > 0 and nv > 0:
                        a[i, j, k] = (u @ v) / (nu * nv)
        return a

    return w_d * np_huber(dist(s), dist(t)) + w_a * np_huber(angle(s), angle(t))


def test_rkd_matches_numpy():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 2, 2)) * 3
    assert L.rkd_loss(t64(s), t64(t)).item() == pytest.approx(np_rkd(s, t.reshape(5, -1)), rel=1e-6)
    assert L.RKDLoss(w_d=1.0, w_a=0.0)(t64(s), t64(t), LossContext()).item() == pytest.approx(
        np_rkd(s, t.reshape(5, -1), 1.0, 0.0), rel=1e-6)


def test_rkd_is_scale_invariant_and_safe_for_batch_of_one():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(6, 4))
    assert L.rkd_loss(t64(t * 7.0), t64(t)).item() == pytest.approx(0.0, abs=1e-9)
    one = L.rkd_loss(torch.randn(1, 4, requires_grad=True), torch.randn(1, 4))
    assert torch.isfinite(one) and one.item() == 0.0


# --------------------------------------------------------------------------- pkt

def np_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    def probs(f):
        f = f / (np.sqrt((f ** 2).sum(1, keepdims=True)) + eps)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdims=True)
    ps, pt = probs(s), probs(t)
    return float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


def test_pkt_matches_numpy_and_hand_case():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 9))
    assert L.pkt_loss(t64(s), t64(t)).item() == pytest.approx(np_pkt(s, t), rel=1e-9)
    # hand case: student rows orthogonal -> kernel [[1, .5], [.5, 1]] -> p = [[2/3, 1/3], ...];
    # teacher rows identical -> p = 1/2 everywhere.
    s2, t2 = t64([[1.0, 0.0], [0.0, 1.0]]), t64([[2.0, 0.0], [3.0, 0.0]])
    per_row = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert L.pkt_loss(s2, t2).item() == pytest.approx(2 * per_row / 4, abs=1e-6)
    assert L.PKTLoss()(t64(s), t64(s), LossContext()).item() == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- crd

def make_crd(n: int = 32, s_dim: int = 6, t_dim: int = 10, **kw) -> L.CRDLoss:
    crd = L.CRDLoss(**kw)
    crd.setup([(4, s_dim)], [(4, t_dim)], num_samples=n)
    return crd


def test_crd_nce_loss_hand_worked():
    scores = [[0.5, 0.1, 0.2], [0.05, 0.3, 0.01]]
    n_data, eps = 10, 1e-7
    m_pn = 2 / n_data
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + m_pn + eps))
        total += sum(math.log(m_pn / (v + m_pn + eps)) for v in row[1:])
    assert L.crd_nce_loss(t64(scores), n_data).item() == pytest.approx(-total / 2, abs=1e-9)


def test_crd_state_dict_and_init():
    crd = make_crd(n=50, feat_dim=16)
    sd = crd.state_dict()
    assert sd["memory_s"].shape == (50, 16) and sd["memory_t"].shape == (50, 16)
    assert "z_norm" in sd and "embed_s.linear.weight" in sd and "embed_t.linear.weight" in sd
    stdv = 1 / math.sqrt(16 / 3)
    assert sd["memory_s"].abs().max() <= stdv and sd["memory_s"].std() > stdv / 4
    assert crd.num_negatives == 49
    assert crd.embed_s.linear.in_features == 6 and crd.embed_t.linear.in_features == 10


def test_crd_memory_update_rule():
    torch.manual_seed(0)
    crd = make_crd(n=20, feat_dim=8, nce_k=5, nce_m=0.5)
    s, t = torch.randn(4, 6), torch.randn(4, 10)
    index = torch.tensor([3, 7, 0, 19])
    old_s, old_t = crd.memory_s.clone(), crd.memory_t.clone()
    with torch.no_grad():
        new_s = F.normalize(crd.embed_s.linear(s), dim=1)
        new_t = F.normalize(crd.embed_t.linear(t), dim=1)
    loss = crd(s, t, LossContext(index=index))
    assert torch.isfinite(loss)
    for bank, old, new in ((crd.memory_s, old_s, new_s), (crd.memory_t, old_t, new_t)):
        mixed = (0.5 * old[index] + 0.5 * new).numpy()
        expected = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        np.testing.assert_allclose(bank[index].numpy(), expected, atol=1e-6)
        untouched = torch.ones(20, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(bank[untouched], old[untouched])
    assert (crd.z_norm > 0).all()


def test_crd_loss_value_matches_manual_computation():
    torch.manual_seed(5)
    crd = make_crd(n=12, feat_dim=4, nce_k=3, nce_t=0.5)
    s, t = torch.randn(2, 6), torch.randn(2, 10)
    index = torch.tensor([1, 4])
    mem_s, mem_t = crd.memory_s.numpy().copy(), crd.memory_t.numpy().copy()
    with torch.no_grad():
        vs = F.normalize(crd.embed_s.linear(s), dim=1).numpy()
        vt = F.normalize(crd.embed_t.linear(t), dim=1).numpy()
    state = torch.get_rng_state()
    negatives = L.sample_negatives(index, 12, 3).numpy()
    torch.set_rng_state(state)
    loss = crd(s, t, LossContext(index=index)).item()

    idx = np.concatenate([index.numpy()[:, None], negatives], axis=1)
    e_s = np.exp(np.einsum("nkd,nd->nk", mem_t[idx], vs) / 0.5)  # student anchor vs teacher bank
    e_t = np.exp(np.einsum("nkd,nd->nk", mem_s[idx], vt) / 0.5)  # teacher anchor vs student bank
    z_s, z_t = e_s.mean() * 12, e_t.mean() * 12

    def nce(p):
        m_pn = 3 / 12
        return -(np.log(p[:, 0] / (p[:, 0] + m_pn + 1e-7)).sum()
                 + np.log(m_pn / (p[:, 1:] + m_pn + 1e-7)).sum()) / p.shape[0]
    assert loss == pytest.approx(nce(e_s / z_s) + nce(e_t / z_t), rel=1e-5)


def test_crd_negatives_exclude_positive_and_follow_global_seed():
    index = torch.arange(10)
    torch.manual_seed(3)
    a = L.sample_negatives(index, 10, 200)
    torch.manual_seed(3)
    b = L.sample_negatives(index, 10, 200)
    assert torch.equal(a, b)
    assert not (a == index.unsqueeze(1)).any()
    assert a.min() >= 0 and a.max() <= 9
    assert set(a[0].tolist()) == set(range(1, 10))


def test_crd_loss_decreases_on_toy_problem():
    torch.manual_seed(0)
    n = 64
    x = torch.randn(n, 12)
    teacher_feat = torch.randn(n, 16)
    student = torch.nn.Linear(12, 8)
    crd = make_crd(n=n, s_dim=8, t_dim=16, feat_dim=16, nce_k=32)
    opt = torch.optim.Adam(list(student.parameters()) + list(crd.parameters()), lr=0.02)
    losses = []
    for _ in range(40):
        loss = crd(student(x), teacher_feat, LossContext(index=torch.arange(n)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_crd_errors_and_eval_mode():
    crd = L.CRDLoss()
    with pytest.raises(KdforgeError, match="setup"):
        crd(torch.randn(2, 3), torch.randn(2, 3), LossContext(index=torch.tensor([0, 1])))
    crd = make_crd(n=8)
    with pytest.raises(KdforgeError, match="ctx.index"):
        crd(torch.randn(4, 6), torch.randn(4, 10), LossContext())
    with pytest.raises(KdforgeError, match=r"\[0, 8\)"):
        crd(torch.randn(2, 6), torch.randn(2, 10), LossContext(index=torch.tensor([0, 8])))
    with pytest.raises(KdforgeError, match="setup"):
        crd(torch.randn(2, 5), torch.randn(2, 10), LossContext(index=torch.tensor([0, 1])))
    with pytest.raises(KdforgeError, match="one student tap"):
        L.CRDLoss().setup([(2, 3), (2, 4)], [(2, 3)], 10)
    crd.eval()
    before = crd.memory_s.clone()
    crd(torch.randn(2, 6), torch.randn(2, 10), LossContext(index=torch.tensor([0, 1])))
    assert torch.equal(before, crd.memory_s)


def test_crd_num_negatives_capped():
    crd = make_crd(n=5, nce_k=4096)
    assert crd.num_negatives == 4
    loss = crd(torch.randn(3, 6), torch.randn(3, 10), LossContext(index=torch.tensor([0, 2, 4])))
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- gradients

def _cases():
    y = torch.tensor([0, 2, 1, 1])
    logits = ((4, 5), (4, 5))
    fmap = ((4, 3, 4, 4), (4, 6, 4, 4))
    vec = ((4, 7), (4, 9))
    return [
        ("kd", {}, logits, LossContext()),
        ("dkd", {}, logits, LossContext(target=y)),
        ("fitnet", {}, (fmap[1], fmap[1]), LossContext()),
        ("at", {}, fmap, LossContext()),
        ("sp", {}, fmap, LossContext()),
        ("rkd", {}, vec, LossContext()),
        ("pkt", {}, vec, LossContext()),
        ("crd", {"nce_k": 8}, vec, LossContext(index=torch.tensor([0, 3, 5, 9]))),
    ]


@pytest.mark.parametrize("name,kwargs,shapes,ctx", _cases(), ids=[c[0] for c in _cases()])
def test_gradient_reaches_student_not_teacher(name, kwargs, shapes, ctx):
    torch.manual_seed(0)
    loss_mod = build(LOSSES, name, **kwargs)
    loss_mod.setup([shapes[0]], [shapes[1]], num_samples=16)
    s = torch.randn(*shapes[0], requires_grad=True)
    t = torch.randn(*shapes[1], requires_grad=True)
    loss = loss_mod(s, t, ctx)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    # a single tensor and a list of one are the same input
    if name != "crd":
        torch.manual_seed(0)
        again = loss_mod([s], [t], ctx)
        assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_ce_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    L.CELoss()(s, None, LossContext(target=torch.tensor([0, 1, 3]))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
