"""AdaSim bank, voting and adaptive partner sampling; DINO loss, k-NN metric against direct formulas;
its recipe through the one Trainer (exact resume, run directory, 2 gloo processes == 1)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_ddp_matches, assert_resume_exact

from kdforge.cli import main as cli_main
from kdforge.errors import ConfigError
from kdforge.methods.adasim import AdaSimConfig, AdaSimTask, NeighbourBank, adaptive_partners, vote_scores
from kdforge.tasks.common import load_task_config
from kdforge.tasks.selfsup import dino_loss, ema_update, knn_accuracy, random_view, view_params
from kdforge.train.distributed import DistEnv, GlobalBatchNorm2d, global_batchnorm

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "methods" / "adasim.yaml"
# 64 images, batch 16: 4 steps/epoch x 3 epochs; window 1 and a soft sampling temperature, so the
# bank is voted on and partners are drawn (some images bootstrapped) from the second epoch on
TINY = ["data.num_train=64", "data.num_test=40", "width=4", "dino.out_dim=32", "dino.hidden=32",
        "dino.bottleneck=16", "loop.epochs=3", "loop.batch_size=16", "adasim.window=1",
        "adasim.sampling_temperature=0.5", "eval.probe_steps=10", "eval.knn_k=5", "trainer.progress=false"]


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


def test_views_are_a_pure_function_of_the_generator_seed():
    imgs = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = random_view(imgs, 8, (0.4, 1.0), torch.Generator().manual_seed(3), mean, std)
    b = random_view(imgs, 8, (0.4, 1.0), torch.Generator().manual_seed(3), mean, std)
    assert torch.equal(a, b)
    p = view_params(6, (0.4, 1.0), torch.Generator().manual_seed(3))
    assert set(p) == {"box", "flip", "bright", "contrast", "grey"} and all(len(v) == 6 for v in p.values())


def test_task_batches_are_index_addressable_and_module_keeps_the_teacher():
    cfg = load_task_config(AdaSimConfig, {"data": {"num_train": 64, "num_test": 40}, "width": 4,
                                          "dino": {"out_dim": 32, "hidden": 32, "bottleneck": 16},
                                          "loop": {"epochs": 2, "batch_size": 16}})
    task = AdaSimTask(cfg)
    module = task.build(torch.device("cpu"), DistEnv())
    assert task.steps_per_epoch() == 4
    a, b, c = task.batch(1, 2, DistEnv()), task.batch(1, 2, DistEnv()), task.batch(1, 3, DistEnv())
    assert torch.equal(a.index, b.index) and torch.equal(a.g1, b.g1) and torch.equal(a.g2, b.g2)
    assert not torch.equal(a.index, c.index)
    # the EMA teacher is saved (exact resume) but never optimised
    ids = {id(p) for p in module.trainable_parameters()}
    assert ids == {id(p) for p in module.student.parameters()}
    keys = module.checkpoint_state()
    assert any(k.startswith("teacher.") for k in keys) and "center" in keys
    before = [p.clone() for p in module.teacher.parameters()]
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    module.after_optimizer_step(0)       # m = teacher_momentum at step 0
    m = cfg.dino.teacher_momentum
    for t, s0, s in zip(module.teacher.parameters(), before, module.student.parameters(), strict=True):
        assert torch.allclose(t, m * s0 + (1 - m) * s)


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ref.load_state_dict(net.state_dict())
    global_batchnorm(net)
    assert isinstance(net[1], GlobalBatchNorm2d)
    x = torch.randn(5, 3, 6, 6)
    assert torch.allclose(net(x), ref(x)) and torch.allclose(net[1].running_var, ref[1].running_var)


def test_stop_and_resume_is_bit_identical(tmp_path):
    # stop inside the third epoch: bank window full, partners drawn per step, epoch counts half-way
    full = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=10)
    assert full["steps"] == 12 and len(full["bootstrap_rate_per_epoch"]) == 3
    assert sum(full["bootstrap_rate_per_epoch"]) > 0
    assert {"knn_top1", "linear_top1", "neighbour_precision", "final_teacher_entropy", "final_loss"} <= set(full)


def test_cli_train_writes_a_complete_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), *TINY, "adasim.mode=dino", "loop.epochs=1", "--out", str(out)]) == 0
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "stages").exists()          # one stage: the recipe's run directory itself
    result = json.loads((out / "result.json").read_text())
    assert result["mode"] == "dino" and result["steps"] == 4 and result["neighbour_precision"] is None
    assert "train_bootstrap_rate" in (out / "metrics.csv").read_text()
    assert cli_main(["train", str(RECIPE), *TINY, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_two_gloo_processes_match_one(tmp_path):
    # the bank, partner draws and centre see the global batch; BatchNorm uses global-batch statistics
    assert_ddp_matches(RECIPE, TINY, tmp_path)
