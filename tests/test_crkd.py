"""CrKD: relation KD and its learnable weight against hand computations; the NCD setting's pieces;
the two-stage recipe through the one Trainer (exact resume, run directory, shared pretraining)."""

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_resume_exact

from kdforge.cli import main as cli_main
from kdforge.config import TrainerConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.crkd import CrKD, CrKDConfig, CrKDTask, ncd_setting, relation_kd_loss, run_crkd
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig, load_task_config
from kdforge.tasks.ncd import (
    NCDSpec,
    cluster_accuracy,
    discovery_net,
    discovery_targets,
    ncd_split,
    procedural_ncd,
    sinkhorn_knopp,
    split_cluster_accuracy,
    swapped_prediction_loss,
)
from kdforge.train.stages import loop_settings
from kdforge.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "methods" / "crkd.yaml"
# 4 classes x 12 images at 8 px, a width-4 convnet: pretrain 3 steps, discovery 2 epochs x 3 steps
TINY = ["data.pairs=2", "data.num_train=48", "data.num_test=24", "data.image_size=8",
        "model.backbone_args.width=4", "model.hidden_dim=16", "model.proj_dim=8",
        "pretrain.epochs=1", "pretrain.batch_size=8", "discover.epochs=2", "discover.batch_size=16",
        "trainer.progress=false"]

SCALE = 0.1 * 4.0  # logit temperature tau * KD temperature T: the loss divides logits by it


def _hand_case():
    """Two unlabelled samples, 2 known + 1 novel class, logits given as (value * tau * T)."""
    teacher = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]]) * SCALE  # p_T = (3/4, 1/4) for both
    s_known = torch.tensor([[0.0, 0.0], [math.log(2), 0.0]]) * SCALE  # q_S = (1/2, 1/2), (2/3, 1/3)
    s_all = torch.tensor([[0.0, 0.0, math.log(2)], [math.log(2), 0.0, 0.0]]) * SCALE
    # full softmax: (1/4, 1/4, 1/2) -> g = 1/2 ; (1/2, 1/4, 1/4) -> g = 3/4 ; mean 5/8 -> w = (0.8, 1.2)
    ce = [math.log(2), -(0.75 * math.log(2 / 3) + 0.25 * math.log(1 / 3))]
    return teacher, s_known, s_all, ce


def test_relation_kd_learnable_weight_hand_computation():
    teacher, s_known, s_all, ce = _hand_case()
    loss, w = relation_kd_loss(teacher, s_known, s_all, kd_temperature=4.0, logit_temperature=0.1)
    assert torch.allclose(w, torch.tensor([0.8, 1.2]), atol=1e-5)
    expected = 16 * (0.8 * ce[0] + 1.2 * ce[1]) / 2  # T^2 * mean(w * CE)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_relation_kd_fixed_weight_hand_computation():
    teacher, s_known, s_all, ce = _hand_case()
    loss, w = relation_kd_loss(teacher, s_known, s_all, weighting="fixed")
    assert torch.equal(w, torch.ones(2))
    assert float(loss) == pytest.approx(16 * (ce[0] + ce[1]) / 2, rel=1e-5)


def test_weight_is_trained_unless_fixed_or_detached():
    teacher, s_known, s_all, _ = _hand_case()
    grads = {}
    for mode in ("learnable", "fixed", "detached"):
        known = s_known.clone().requires_grad_(True)
        novel = s_all[:, 2:].clone().requires_grad_(True)  # novel logits only enter through w
        loss, w = relation_kd_loss(teacher, known, torch.cat([s_all[:, :2], novel], 1), weighting=mode)
        loss.backward()
        grads[mode] = 0.0 if novel.grad is None else float(novel.grad.abs().sum())
        assert float(w.detach().mean()) == pytest.approx(1.0, abs=1e-6)
    assert grads["learnable"] > 1e-4 and grads["fixed"] == 0.0 and grads["detached"] == 0.0


def test_relation_kd_leading_dims_and_errors():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    full = torch.cat([s, torch.randn(2, 3, 5, 6, generator=g)], -1)
    loss, w = relation_kd_loss(t, s, full)
    flat, _ = relation_kd_loss(t.reshape(-1, 4), s.reshape(-1, 4), full.reshape(-1, 10))
    assert w.shape == (2, 3, 5) and float(loss) == pytest.approx(float(flat), rel=1e-5)
    with pytest.raises(KdforgeError):
        relation_kd_loss(t, s, s)  # no novel block
    with pytest.raises(KdforgeError):
        relation_kd_loss(t, s, full, weighting="soft")


# --------------------------------------------------------------------------- NCD pieces


def test_cluster_accuracy_hand_case():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [1, 1, 0, 0, 2, 0]  # best map 1->0, 0->1, 2->2: 5 of 6 right
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    assert cluster_accuracy(torch.tensor(y_true), torch.tensor([5, 5, 3, 3, 4, 3])) == pytest.approx(5 / 6)
    # task-agnostic: classes 0 (old) and 1, 2 (new); the same single matching serves both subsets
    res = split_cluster_accuracy(y_true, y_pred, num_known=1)
    assert res["all"] == pytest.approx(5 / 6) and res["old"] == 1.0 and res["new"] == pytest.approx(3 / 4)


def test_sinkhorn_equipartition_hand_case():
    # two identical samples preferring cluster 0: equipartition splits each 1/2 - 1/2
    q = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), num_iters=3, epsilon=1.0)
    assert torch.allclose(q, torch.full((2, 2), 0.5), atol=1e-6)
    # one iteration by hand: Q = exp(L)^T / sum; rows -> 1/K; columns -> 1/B; times B
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    e = torch.exp(logits).t()
    e = e / e.sum()
    e = e / e.sum(1, keepdim=True) / 2
    e = e / e.sum(0, keepdim=True) / 3
    assert torch.allclose(sinkhorn_knopp(logits, num_iters=1, epsilon=1.0), (e * 3).t(), atol=1e-6)
    many = sinkhorn_knopp(torch.randn(60, 4), num_iters=50, epsilon=0.5)
    assert torch.allclose(many.sum(1), torch.ones(60), atol=1e-5)
    assert torch.allclose(many.sum(0), torch.full((4,), 15.0), atol=1e-3)


def test_swapped_prediction_hand_case():
    logits = torch.tensor([[[[0.0, math.log(3)]]], [[[math.log(3), 0.0]]]]) * 0.1  # (V=2, H=1, N=1, C=2)
    targets = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    # view 0's target (class 0) supervises view 1 (p = 3/4); view 1's target (class 1) supervises view 0 (3/4)
    expected = -math.log(0.75)
    assert float(swapped_prediction_loss(logits, targets, temperature=0.1)[0]) == pytest.approx(
        expected, rel=1e-5
    )


def test_discovery_targets_blocks():
    unlab = torch.randn(2, 3, 5, 4)
    labels = torch.tensor([1, 0, 6, 7, 5])
    labelled = torch.tensor([True, True, False, False, False])
    t = discovery_targets(unlab, labels, labelled, num_known=3)
    assert t.shape == (2, 3, 5, 7)
    assert (
        torch.equal(t[:, :, 0, :3], torch.tensor([0.0, 1.0, 0.0]).expand(2, 3, 3))
        and float(t[:, :, :2, 3:].abs().sum()) == 0
    )
    assert torch.allclose(t[:, :, 2:, 3:].sum(-1), torch.ones(2, 3, 3), atol=1e-5)
    assert float(t[:, :, 2:, :3].abs().sum()) == 0


def test_ncd_split_relabels_known_then_novel():
    data = procedural_ncd("train", pairs=3, num_train=60, num_test=30, image_size=8, seed=0)
    assert data.num_known == 3 and data.num_novel == 3 and data.known_classes == [0, 2, 4]
    assert torch.equal(data.labelled, data.labels < 3) and set(data.labels.tolist()) == set(range(6))
    with pytest.raises(KdforgeError):
        from kdforge.data.synthetic import procedural_cifar

        ncd_split(
            procedural_cifar("train", 20, 10, num_classes=4, num_superclasses=2, image_size=8), [0, 1], [1]
        )


def test_crkd_term_keeps_the_relation_closer_to_the_teacher(tmp_path):
    cfg = load_task_config(CrKDConfig, {"data": {"pairs": 3, "num_train": 120, "num_test": 30, "image_size": 8,
                                                 "seed": 1},
                                        "model": {"backbone_args": {"width": 4}, "num_heads": 1, "hidden_dim": 16,
                                                  "proj_dim": 8}})
    train, test, make_net = ncd_setting(cfg)
    torch.manual_seed(0)
    start = make_net().state_dict()      # an untrained start is enough to see the drift
    settings = loop_settings(LoopConfig(epochs=2, batch_size=40), 0, TrainerConfig(device="cpu", tensorboard=False,
                                                                                   progress=False))
    drift = {}
    for alpha in (0.0, 5.0):
        task = CrKDTask(train, test, make_net, NCDSpec(), 0, 40, pretrained=start, crkd=replace(cfg.crkd, alpha=alpha))
        trainer = Trainer(settings, tmp_path / f"a{alpha}", task=task, quiet=True)
        before = {k: v.clone() for k, v in trainer.module.teachers.state_dict().items()}
        drift[alpha] = trainer.fit()["relation_kl_test"]
    assert drift[5.0] < drift[0.0]
    frozen = trainer.module.teachers.state_dict()  # the snapshot never trains (weights and BN statistics)
    assert all(torch.equal(frozen[k], v) for k, v in before.items())
    assert not any(k.startswith("teachers") for k in trainer.module.checkpoint_state())


def test_crkd_term_reads_only_unlabelled_rows():
    torch.manual_seed(0)
    net = discovery_net("convnet", 2, 2, num_heads=2, hidden_dim=8, proj_dim=4, backbone_args={"width": 4})
    term = CrKD.snapshot(net, alpha=0.5)
    x = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    outs = [net(v) for v in x]
    outputs = {
        "logits_lab": torch.stack([o["logits_lab"] for o in outs]),
        "logits_unlab": torch.stack([o["logits_unlab"] for o in outs]),
    }
    labelled = torch.tensor([True, False, True, False])
    loss, logs = term(x, outputs, labelled)
    assert set(logs) == {"rkd_unweighted", "rkd_w_std"}
    assert float(loss.detach()) == pytest.approx(0.5 * float(logs["rkd_unweighted"]))
    lab, unl = outputs["logits_lab"][:, ~labelled], outputs["logits_unlab"][:, :, ~labelled]
    with torch.no_grad():
        t = torch.stack([term.teacher(v[~labelled])["logits_lab"] for v in x])
    ref, _ = relation_kd_loss(
        t.unsqueeze(1).expand(-1, 2, -1, -1),
        lab.unsqueeze(1).expand(-1, 2, -1, -1),
        torch.cat([lab.unsqueeze(1).expand(-1, 2, -1, -1), unl], -1),
    )
    assert float(loss.detach()) == pytest.approx(0.5 * float(ref.detach()), rel=1e-5)
    assert F.softmax(t, -1).shape == (2, 2, 2)


def test_recipe_and_registry():
    assert "crkd" in METHODS
    cfg = load_task_config(CrKDConfig, "configs/methods/crkd.yaml", ["crkd.alpha=0.0"])
    assert cfg.crkd.alpha == 0.0 and cfg.ncd.temperature == 0.1 and cfg.crkd.kd_temperature == 4.0
    with pytest.raises(ConfigError, match="crkd.alfa"):
        load_task_config(CrKDConfig, {"crkd": {"alfa": 0.1}})


# --------------------------------------------------------------------------- the recipe on the Trainer


def test_resume_inside_discovery_is_exact(tmp_path):
    # pretrain has 3 steps, so step 4 stops the discovery stage in its second epoch
    full = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=4)
    assert full["steps"] == 6 and 0 <= full["best_head"] < 2 and "relation_kl_test" in full


def test_cli_writes_a_complete_run_and_pretraining_is_shared(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), *TINY, "--out", str(run)]) == 0
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors",
                 "stages/pretrain/result.json", "stages/pretrain/metrics.csv",
                 "stages/pretrain/checkpoints/last.safetensors"):
        assert (run / name).is_file(), name
    result = json.loads((run / "result.json").read_text())
    assert result["task"] == "ncd_discovery_crkd" and "train_novel" in result and "teacher_test_known" in result
    assert "rkd" in (run / "metrics.csv").read_text().splitlines()[0]

    cfg = load_task_config(CrKDConfig, RECIPE, [o for o in TINY if not o.startswith("trainer.")] + ["seed=1"])
    quiet = TrainerConfig(device="cpu", tensorboard=False, progress=False)
    other = run_crkd(cfg, tmp_path / "seed1", trainer=quiet, pretrain_from=run)   # reuses run's teacher
    assert not (tmp_path / "seed1" / "stages").exists()
    assert other["teacher_test_known"] == result["teacher_test_known"]
    cfg.pretrain_seed = 1
    with pytest.raises(KdforgeError, match="pretrain_seed"):
        run_crkd(cfg, tmp_path / "bad", trainer=quiet, pretrain_from=run)


def test_relation_kd_reads_the_large_crops_only():
    """Official CrKD distils on the large crops (the views that make the targets), not every view."""
    from kdforge.tasks.ncd.train import DiscoveryModule
    from kdforge.tasks.ncd.views import NCDBatch, NCDSpec

    torch.manual_seed(0)
    net = discovery_net("convnet", 2, 2, num_heads=2, hidden_dim=8, proj_dim=4, backbone_args={"width": 4})
    seen = []

    def spy(views, outputs, labelled):
        seen.append((len(views), outputs["logits_lab"].shape[0], outputs["logits_unlab"].shape[0]))
        return outputs["logits_lab"].sum() * 0.0, {}

    spec = NCDSpec(num_views=3, num_large=2)
    module = DiscoveryModule(net, copy.deepcopy(net), spec, spy)
    views = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    batch = NCDBatch(views=views, labels=torch.tensor([0, 2, 1, 3]), labelled=torch.tensor([True, False, True, False]),
                     index=torch.arange(4))
    module(batch)
    assert seen == [(2, 2, 2)]
