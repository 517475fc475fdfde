"""AdaSim bank, voting and adaptive partner sampling; DINO loss, k-NN metric against direct formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import ConfigError
from kdforge.methods.adasim import AdaSimConfig, NeighbourBank, adaptive_partners, vote_scores
from kdforge.tasks.common import load_task_config
from kdforge.tasks.selfsup import dino_loss, ema_update, knn_accuracy


def test_vote_sums_similarities_over_window():
    # image 0, two epochs, k=2: epoch 1 -> {0: .9, 3: .8}; epoch 2 -> {3: .95, 0: .7}
    nn_ = torch.tensor([[[0, 3]], [[3, 0]]])
    sim = torch.tensor([[[0.9, 0.8]], [[0.95, 0.7]]])
    cand, score = vote_scores(nn_, sim, num_items=5, topk=2)
    assert cand.tolist() == [[3, 0]]
    assert torch.allclose(score, torch.tensor([[1.75, 1.6]]))
    # non-finite slots are absent, not zero
    cand2, score2 = vote_scores(torch.tensor([[[1, 2]]]), torch.tensor([[[0.5, float("-inf")]]]), 4, 2)
    assert cand2[0, 0] == 1 and math.isinf(float(score2[0, 1]))


def test_partner_rule_and_sampling_distribution():
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 1])
    cand = torch.tensor([[0, 5], [7, 1]])  # image 1 is not its own top candidate -> keeps itself
    # scores/V/τ = [1.0, 0.9993]/1/0.001 -> logits differ by 0.7: P(5) = 1/(1+e^0.7)
    scores = torch.tensor([[1.0, 0.9993], [1.0, 0.9]])
    draws = torch.stack([adaptive_partners(index, cand, scores, 1, 0.001, g) for _ in range(4000)])
    assert (draws[:, 1] == 1).all()
    p5 = float((draws[:, 0] == 5).float().mean())
    assert p5 == pytest.approx(1 / (1 + math.exp(0.7)), abs=0.03)


def test_bank_compares_before_writing():
    bank = NeighbourBank(3, 2, topk=2, window=2)
    e = torch.eye(2)
    bank.update(torch.tensor([0, 1]), e)  # empty bank: no finite neighbours yet
    assert torch.isinf(bank.cur_sim[0]).all()
    f = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    bank.update(torch.tensor([0]), f)  # sees its own previous feature e0 and e1, both cos 1/sqrt2
    assert torch.allclose(bank.cur_sim[0], torch.full((2,), 1 / math.sqrt(2)))
    assert torch.equal(bank.feats[0], f[0])
    bank.end_epoch()
    assert not bank.ready
    bank.end_epoch()
    bank.end_epoch()
    assert bank.ready and len(bank.hist) == 2
    state = bank.state_dict()
    other = NeighbourBank(3, 2, topk=2, window=2)
    other.load_state_dict(state)
    assert torch.equal(other.history(torch.tensor([0]))[1], bank.history(torch.tensor([0]))[1])


def test_dino_loss_two_views_matches_formula():
    torch.manual_seed(0)
    s = [torch.randn(3, 4), torch.randn(3, 4)]
    t = [torch.randn(3, 4), torch.randn(3, 4)]
    c = torch.randn(4)
    got = dino_loss(s, t, c, 0.1, 0.04)

    def ce(tt, ss):
        return float((-(F.softmax((tt - c) / 0.04, 1) * F.log_softmax(ss / 0.1, 1)).sum(1)).mean())

    assert float(got) == pytest.approx(0.5 * (ce(t[1], s[0]) + ce(t[0], s[1])), rel=1e-5)
    # with a local crop: pairs (t0,s1) (t0,s2) (t1,s0) (t1,s2)
    s3 = s + [torch.randn(3, 4)]
    exp = (ce(t[0], s3[1]) + ce(t[0], s3[2]) + ce(t[1], s3[0]) + ce(t[1], s3[2])) / 4
    assert float(dino_loss(s3, t, c, 0.1, 0.04)) == pytest.approx(exp, rel=1e-5)


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def test_knn_weighted_vote_hand_case():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.2, 1.0], [1.0, 0.05]])
    assert knn_accuracy(train, labels, test, torch.tensor([1, 0]), k=1) == 100.0
    # k=3, T large: votes ~ counts -> class 0 (two neighbours) wins for the first point
    assert knn_accuracy(train, labels, test[:1], torch.tensor([0]), k=3, temperature=100.0) == 100.0


def test_recipe_rejects_unknown_key_and_mode():
    with pytest.raises(ConfigError, match="wat"):
        load_task_config(AdaSimConfig, {"adasim": {"wat": 1}})
    with pytest.raises(ConfigError):
        load_task_config(AdaSimConfig, {"adasim": {"mode": "x"}}).check()
