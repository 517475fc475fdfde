"""L2D: MLD and LED against hand computations, mAP against hand-worked APs, the multi-label setting."""

import csv
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_ddp_matches, assert_resume_exact

from kdforge.distill.terms import Term
from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses import l2d_led_loss, l2d_mld_loss
from kdforge.losses.l2d import l2d_cd_loss, l2d_id_loss, masked_normalised_distances
from kdforge.methods.l2d import L2DArgs, L2DConfig, l2d_terms
from kdforge.models.taps import FeatureTap
from kdforge.registry import LOSSES, METHODS
from kdforge.tasks.common import LoopConfig, load_task_config
from kdforge.tasks.multilabel import (
    average_precision,
    labelwise_net,
    mean_average_precision,
    per_class_average_precision,
    procedural_multilabel,
)
from kdforge.tasks.multilabel.train import MultiLabelTask
from kdforge.train.stages import loop_settings
from kdforge.train.trainer import Trainer

# --------------------------------------------------------------------------- MLD


def test_mld_matches_hand_computation():
    # sample 0: teacher logit ln 3 -> p_t = 3/4; student logit 0 -> p_s = 1/2
    #   KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2
    # sample 0, class 1: both logits 0 -> KL 0
    # sample 1, class 0: teacher 0 (1/2), student ln 3 (3/4): KL = 1/2 ln(2/3) + 1/2 ln(2)
    # sample 1, class 1: teacher -ln 3 (1/4), student -ln 3: KL 0
    s = torch.tensor([[0.0, 0.0], [math.log(3), -math.log(3)]])
    t = torch.tensor([[math.log(3), 0.0], [0.0, -math.log(3)]])
    kl00 = 0.75 * math.log(1.5) - 0.25 * math.log(2)
    kl10 = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    expected = (kl00 + kl10) / 2  # summed over labels, divided by N = 2
    assert float(l2d_mld_loss(s, t)) == pytest.approx(expected, abs=1e-6)


def test_mld_is_not_softmax_kd_and_grad_reaches_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    loss = l2d_mld_loss(s, t)
    loss.backward()
    assert s.grad is not None and t.grad is None
    # shifting all logits of a row by a constant leaves softmax KD unchanged but not MLD
    assert float(l2d_mld_loss(t.detach() + 1.0, t.detach())) > 1e-3
    assert float(l2d_mld_loss(t.detach(), t.detach())) == pytest.approx(0.0, abs=1e-6)


def test_mld_clamps_saturated_probabilities():
    s = torch.tensor([[-200.0]])
    t = torch.tensor([[200.0]])
    value = float(l2d_mld_loss(s, t))
    # p_t = 1 - 1e-8, p_s = 1e-8 after clamping: KL ~ ln(1e8)
    assert math.isfinite(value) and value == pytest.approx(math.log(1e8), rel=1e-3)


def test_mld_shape_errors():
    with pytest.raises(KdforgeError):
        l2d_mld_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- LED


def _triangle_case():
    """Class 0 positive in images 0-2; student embeddings form a 3-4-5 triangle, teacher points on a line."""
    s = torch.zeros(3, 2, 2)
    t = torch.zeros(3, 2, 2)
    s[:, 0] = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # d01 = 3, d02 = 4, d12 = 5 (mean 4)
    t[:, 0] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # d01 = 1, d02 = 2, d12 = 1 (mean 4/3)
    s[:, 1] = torch.randn(3, 2)
    t[:, 1] = torch.randn(3, 2)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # class 1 never positive: ignored
    return s, t, y


def test_cd_hand_worked_case():
    s, t, y = _triangle_case()
    # normalised: student (0.75, 1, 1.25), teacher (0.75, 1.5, 0.75); differences 0, -0.5, 0.5
    # smooth-L1 (beta 1): 0.5 * 0.5^2 = 0.125 for two pairs; both triangles of the matrix: 0.5
    # divided by |P_0| = 3
    assert float(l2d_cd_loss(s, t, y)) == pytest.approx(0.5 / 3, abs=1e-5)
    assert float(l2d_led_loss(s, t, y, w_cd=100.0, w_id=0.0)) == pytest.approx(100 * 0.5 / 3, abs=1e-3)


def test_id_hand_worked_case():
    s, t, _ = _triangle_case()
    # image 0 has three positive labels whose embeddings are the triangle / line points above
    s_id, t_id = s.transpose(0, 1).contiguous(), t.transpose(0, 1).contiguous()  # (2 images, 3 labels, 2)
    y = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # image 1 has two positives: one normalised distance, always 1 for both networks -> 0
    assert float(l2d_id_loss(s_id, t_id, y)) == pytest.approx(0.5 / 3, abs=1e-5)
    y_single = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # groups of one are skipped
    assert float(l2d_id_loss(s_id, t_id, y_single)) == 0.0


def _reference_group(s, t):
    """The official per-group computation on explicit rows (loops, no masks)."""

    def psi(e):
        d = torch.cdist(e.double(), e.double())
        off = ~torch.eye(len(e), dtype=torch.bool)
        return d / d[off].mean()

    return F.smooth_l1_loss(psi(s), psi(t), reduction="sum") / len(s)


def test_led_vectorised_matches_loops_with_different_widths():
    g = torch.Generator().manual_seed(0)
    n, c = 9, 5
    s = torch.randn(n, c, 4, generator=g)
    t = torch.randn(n, c, 7, generator=g)  # teacher width differs: only distances are compared
    y = (torch.rand(n, c, generator=g) < 0.5).float()
    cd = sum(_reference_group(s[y[:, k] > 0, k], t[y[:, k] > 0, k]) for k in range(c) if y[:, k].sum() > 1)
    idl = sum(_reference_group(s[i, y[i] > 0], t[i, y[i] > 0]) for i in range(n) if y[i].sum() > 1)
    assert float(l2d_cd_loss(s, t, y)) == pytest.approx(float(cd), rel=1e-4)
    assert float(l2d_id_loss(s, t, y)) == pytest.approx(float(idl), rel=1e-4)
    assert float(l2d_led_loss(s, t, y)) == pytest.approx(float(100 * cd + 1000 * idl), rel=1e-4)


def test_led_uses_index_masks_not_zero_rows():
    s, t, y = _triangle_case()
    s[0, 0] = (
        0.0  # an exactly-zero positive embedding still counts (the official zero-row test would drop it)
    )
    d = masked_normalised_distances(s[:, 0].unsqueeze(0), torch.ones(1, 3, dtype=torch.bool))
    assert d.shape == (1, 3, 3) and float(d[0, 0, 1]) == pytest.approx(0.75, abs=1e-5)
    assert float(l2d_cd_loss(s, t, y)) == pytest.approx(0.5 / 3, abs=1e-5)


def test_led_gradient_only_to_student_and_needs_targets():
    s = torch.randn(4, 3, 5, requires_grad=True)
    t = torch.randn(4, 3, 5, requires_grad=True)
    y = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    l2d_led_loss(s, t, y).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0 and t.grad is None
    with pytest.raises(KdforgeError):
        l2d_led_loss(s, t, None)


# --------------------------------------------------------------------------- mAP


def test_average_precision_hand_cases():
    # ranks: + - + -  -> AP = 1/2 * (1/1) + 1/2 * (2/3)
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(
        5 / 6
    )
    # a tie at the top: one threshold holding (+, -): P = 1/2 at R = 1/2; then P = 2/3 at R = 1
    assert average_precision(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 1])) == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3
    )
    assert math.isnan(average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0])))


def test_map_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.2, 0.1], [0.7, 0.9, 0.2], [0.6, 0.3, 0.4]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
    aps = per_class_average_precision(scores, targets)
    # class 0: + - + - -> 5/6; class 1: the positive is ranked first -> 1; class 2: no positives
    assert aps[0] == pytest.approx(5 / 6) and aps[1] == pytest.approx(1.0) and math.isnan(aps[2])
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1.0) / 2)


# --------------------------------------------------------------------------- setting


def test_procedural_multilabel_targets_and_frequencies():
    tr = procedural_multilabel("train", 600, 100, num_classes=6, image_size=16, rarity=0.05, seed=3)
    again = procedural_multilabel("train", 600, 100, num_classes=6, image_size=16, rarity=0.05, seed=3)
    te = procedural_multilabel("test", 600, 100, num_classes=6, image_size=16, rarity=0.05, seed=3)
    assert tr.images.shape == (600, 3, 16, 16) and tr.targets.shape == (600, 6)
    per_image = tr.targets.sum(1)
    assert bool(((per_image >= 1) & (per_image <= 3)).all()) and set(tr.targets.unique().tolist()) == {
        0.0,
        1.0,
    }
    freq = tr.targets.mean(0)
    assert float(freq[0]) > float(freq[3]) > float(freq[5]) and float(freq[5]) < 0.12
    assert torch.equal(tr.images, again.images) and not torch.equal(tr.images[:100], te.images)
    with pytest.raises(KdforgeError):
        procedural_multilabel("val")


def test_validation_split_is_its_own_stream_and_leaves_train_and_test_unchanged():
    args = (600, 100, 6, 16, 3, 0.05, 3)
    tr, te = procedural_multilabel("train", *args), procedural_multilabel("test", *args)
    va = procedural_multilabel("val", *args, num_val=100)
    tr_v, te_v = procedural_multilabel("train", *args, num_val=100), procedural_multilabel("test", *args, num_val=100)
    assert torch.equal(tr.images, tr_v.images) and torch.equal(te.images, te_v.images)
    assert va.images.shape == (100, 3, 16, 16) and not torch.equal(va.images, te.images)
    assert va.mean == tr.mean          # normalised with the train statistics, like test
    with pytest.raises(KdforgeError, match="num_val"):
        procedural_multilabel("val", *args)


def test_labelwise_net_logits_are_group_fc_of_the_tapped_embeddings():
    torch.manual_seed(0)
    net = labelwise_net("convnet", 5, dim=16, heads=2, backbone_args={"width": 4}).eval()
    x = torch.randn(3, 3, 16, 16)
    with FeatureTap(net, ["label_embed"]) as tap:
        logits = net(x)
        e = tap.features["label_embed"]
    assert e.shape == (3, 5, 16) and logits.shape == (3, 5)
    manual = torch.einsum("ncd,cd->nc", e, net.group_fc.weight) + net.group_fc.bias
    assert torch.allclose(logits, manual, atol=1e-5)


def test_registries_and_terms():
    assert "l2d_mld" in LOSSES and "l2d_led" in LOSSES and "l2d" in METHODS
    names = [t.name for t in l2d_terms(L2DArgs())]
    assert names == ["bce", "mld", "led"]
    assert [t.name for t in l2d_terms(L2DArgs(w_mld=0, w_cd=0, w_id=0))] == ["bce"]


def test_recipe_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="l2d.w_mdl"):
        load_task_config(L2DConfig, {"method": "l2d", "l2d": {"w_mdl": 1.0}})
    cfg = load_task_config(L2DConfig, "configs/methods/l2d.yaml", ["seed=3"])
    assert cfg.seed == 3 and cfg.l2d.w_mld == 10.0 and cfg.l2d.w_cd == 100.0 and cfg.l2d.w_id == 1000.0


TINY = ["data.num_train=96", "data.num_test=32", "data.num_classes=4", "data.image_size=12",
        "teacher.backbone_args={width: 4}", "teacher.dim=8", "teacher.heads=2",
        "student.backbone_args={width: 4}", "student.dim=8", "student.heads=2",
        "teacher_train.epochs=1", "train.epochs=2", "l2d.bce_reduction=mean"]


def test_teacher_cache_reproduces_the_uncached_run():
    data = procedural_multilabel("train", 96, 10, num_classes=4, image_size=12, seed=1)
    torch.manual_seed(5)
    teacher = labelwise_net("convnet", 4, dim=8, heads=2, backbone_args={"width": 4}).eval()
    terms = [
        Term("multilabel_bce", teacher=None, group="task"),
        Term("l2d_mld", weight=10),
        Term("l2d_led", student="label_embed", teacher="label_embed"),
    ]
    runs = []
    for cache in (None, {}):
        torch.manual_seed(0)
        student = labelwise_net("convnet", 4, dim=8, heads=2, backbone_args={"width": 4})
        task = MultiLabelTask(student, data, data, terms, 32, seed=0, teacher=teacher, augment_seed=7,
                              teacher_cache=cache)
        settings = loop_settings(LoopConfig(epochs=2, batch_size=32), seed=0)
        trainer = Trainer(settings, Path(tempfile.mkdtemp()) / "run", quiet=True, task=task)
        trainer.fit()
        runs.append((trainer.metrics.rows, student.state_dict()))
        if cache is not None:
            assert sorted(cache) == [0, 1] and set(cache[0]) == {"logits", "label_embed"}
    (h0, s0), (h1, s1) = runs
    assert h0[-1]["train_l2d_led"] == pytest.approx(h1[-1]["train_l2d_led"], rel=1e-4)
    assert all(torch.allclose(s0[k].float(), s1[k].float(), atol=1e-5) for k in s0)


def test_recipe_trains_teacher_and_student_stages_in_one_run_directory(tmp_path):
    from kdforge.cli import main

    assert main(["train", "configs/methods/l2d.yaml", "--out", str(tmp_path / "run"), *TINY]) == 0
    for run in (tmp_path / "run", tmp_path / "run/stages/teacher"):
        for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors", "predictions.png"):
            assert (run / name).is_file(), run / name
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert 0 <= result["test_mAP"] <= 100 and "teacher_test_mAP" in result and result["steps"] == 6
    teacher_rows = list(csv.DictReader((tmp_path / "run/stages/teacher/metrics.csv").open()))
    assert len(teacher_rows) == 1 and "train_bce" in teacher_rows[0] and "train_mld" not in teacher_rows[0]
    # the same --out again is refused (no silent overwrite); --resume of a finished run retrains nothing
    assert main(["train", "configs/methods/l2d.yaml", "--out", str(tmp_path / "run"), *TINY]) == 2
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0


def test_stop_and_resume_is_bit_identical(tmp_path):
    # teacher stage: 3 steps; stop after 2 steps of it, then inside the student's second epoch
    assert_resume_exact("configs/methods/l2d.yaml", TINY, tmp_path / "a", stop_after=2)
    assert_resume_exact("configs/methods/l2d.yaml", TINY, tmp_path / "b", stop_after=4)


def test_two_gloo_processes_match_one(tmp_path):
    # BCE (mean) and MLD are per-sample terms: 2 ranks x 16 give 1 rank x 32's gradients, with a
    # per-sample normalisation in the convnets (batch norm would see half batches per rank). SGD:
    # Adam would blow the ~1e-9 summation-order noise of the attention key bias (whose true gradient
    # is 0) up to lr-sized steps
    ddp = [*TINY, "l2d.w_cd=0", "l2d.w_id=0", "trainer.threads=1", "train.optim.name=sgd",
           "teacher_train.optim.name=sgd",
           "teacher.backbone_args={width: 4, norm: group}", "student.backbone_args={width: 4, norm: group}"]
    assert_ddp_matches(Path("configs/methods/l2d.yaml"), ddp, tmp_path)


def test_teacher_only_run_is_shared_through_teacher_run(tmp_path):
    # an experiment trains the teacher once (teacher_only) and hands it to every arm (teacher_run):
    # the arm must train exactly the student of a full run (whose teacher stage is the same teacher)
    from kdforge.train.stages import run_recipe

    full = run_recipe("configs/methods/l2d.yaml", [*TINY, "data.num_val=16"], out=tmp_path / "full")
    teacher = run_recipe("configs/methods/l2d.yaml", [*TINY, "teacher_only=true"], out=tmp_path / "teacher")
    assert not (tmp_path / "teacher/stages").exists() and teacher["terms"] == ["bce"]
    arm = run_recipe("configs/methods/l2d.yaml", [*TINY, "data.num_val=16", f"teacher_run={tmp_path / 'teacher'}"],
                     out=tmp_path / "arm")
    assert not (tmp_path / "arm/stages").exists()
    assert arm["teacher_test_mAP"] == pytest.approx(teacher["test_mAP"]) == pytest.approx(full["teacher_test_mAP"])
    assert arm["test_mAP"] == pytest.approx(full["test_mAP"]) and arm["val_mAP"] == pytest.approx(full["val_mAP"])
    assert "val_mAP" not in teacher and 0 <= arm["val_mAP"] <= 100
    # another data set, an unfinished run, or both options at once fail in one line
    with pytest.raises(ConfigError, match="data.seed"):
        run_recipe("configs/methods/l2d.yaml", [*TINY, "data.seed=5", f"teacher_run={tmp_path / 'teacher'}"],
                   out=tmp_path / "other")
    with pytest.raises(ConfigError, match="no finished run"):
        run_recipe("configs/methods/l2d.yaml", [*TINY, f"teacher_run={tmp_path / 'none'}"], out=tmp_path / "x")
    with pytest.raises(ConfigError, match="teacher_only"):
        run_recipe("configs/methods/l2d.yaml", [*TINY, "teacher_only=true", "teacher_run=a"], out=tmp_path / "y")
