"""iod_wcbc: DMD and IFD against plain-loop computations, the grown student and its pseudo-objects, and the
recipe on the one Trainer (old stage, arms, shared old run, resume, bad input)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.losses.iod_wcbc import box_mean, distance_matrix_kd, semantic_guided_feature_kd
from kdforge.methods.iod_wcbc import IODArgs, IODModule, grow_classes, paired_instances, pseudo_objects
from kdforge.tasks.detection.models import build_detector
from kdforge.tasks.detection.task import DetectionBatch

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/iod_wcbc.yaml"
TINY = ["data.num_train=32", "data.num_test=16", "data.size=32", "train.epochs=1", "train.batch_size=8",
        "old.loop.epochs=1", "old.loop.batch_size=8", "model.backbone_args={width: 4}", "model.width=16",
        "model.head={queries: 4, heads: 2, ffn: 16}", "iod.tau=0.005", "trainer.threads=1"]


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def test_dmd_is_the_mse_of_euclidean_class_distance_matrices() -> None:
    g = torch.Generator().manual_seed(1)
    p_t, p_s = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g, requires_grad=True)
    t, s = p_t.tolist(), p_s.tolist()
    expected = sum((_dist(s[i], s[j]) - _dist(t[i], t[j])) ** 2 for i in range(3) for j in range(3)) / 9
    loss = distance_matrix_kd(p_t, p_s)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert p_s.grad is not None and bool(torch.isfinite(p_s.grad).all())
    # the same geometry (a rotated, shifted copy) costs nothing: only distances are distilled
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert distance_matrix_kd(p_t, p_t @ q + 5.0).item() == pytest.approx(0.0, abs=1e-8)
    same = p_t.clone().requires_grad_(True)          # zero distances (diagonal): finite, zero gradient
    distance_matrix_kd(p_t, same).backward()
    assert bool((same.grad == 0).all())
    assert distance_matrix_kd(p_t[:1], p_s[:1]).item() == 0.0      # one class has no geometry
    with pytest.raises(Exception, match="same C"):
        distance_matrix_kd(p_t, p_s[:2])


def _cells(box: list[float], h: int, w: int, stride: float) -> list[tuple[int, int]]:
    inside = [(i, j) for i in range(h) for j in range(w)
              if box[0] <= (j + 0.5) * stride <= box[2] and box[1] <= (i + 0.5) * stride <= box[3]]
    if inside:
        return inside
    return [(min(int((box[1] + box[3]) / 2 / stride), h - 1), min(int((box[0] + box[2]) / 2 / stride), w - 1))]


def test_ifd_weights_box_feature_gaps_by_the_softmax_of_semantic_gaps() -> None:
    g = torch.Generator().manual_seed(2)
    f_t, f_s = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    q_t, q_s = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [5.0, 5.0, 7.0, 7.0], [4.0, 0.0, 16.0, 6.0]])   # 2nd: inside 1 cell
    image = torch.tensor([0, 0, 1])
    gaps = [_dist(a, b) for a, b in zip(q_s.tolist(), q_t.tolist())]
    weights = [math.exp(v) / sum(math.exp(u) for u in gaps) for v in gaps]
    expected = 0.0
    for n, box in enumerate(boxes.tolist()):
        cells = _cells(box, 4, 4, 4.0)
        b = int(image[n])
        gap = sum(float((f_s[b, c, i, j] - f_t[b, c, i, j]) ** 2) for i, j in cells for c in range(3))
        gap /= 3 * len(cells)
        expected += weights[n] * gap
    got = semantic_guided_feature_kd(q_t, q_s, f_t, f_s, boxes, image, stride=4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert _cells([5.0, 5.0, 7.0, 7.0], 4, 4, 4.0) == [(1, 1)]
    # box means: the plain average of the box's cells
    mean = box_mean(f_s, boxes[:1], image[:1], 4.0)
    torch.testing.assert_close(mean[0], f_s[0, :, :2, :2].mean((1, 2)))
    # identical feature maps: nothing to distil, whatever the semantic gaps
    assert semantic_guided_feature_kd(q_t, q_s, f_t, f_t.clone(), boxes, image, 4.0).item() == 0.0


def _query(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_detector("query", "convnet", {"width": 4}, ["feat3"], num_classes, 16, 32, queries=4, heads=2,
                          ffn=16).eval()


def test_grown_student_keeps_the_old_model_and_pseudo_objects_pair_with_their_own_queries() -> None:
    old = _query(2)
    student = grow_classes(old, _query(4, seed=1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t_out, s_out = old(x), student(x)
    torch.testing.assert_close(s_out["logits"][..., :2], t_out["logits"])      # old rows copied, rest unchanged
    torch.testing.assert_close(s_out["hidden"], t_out["hidden"])
    assert not torch.allclose(student.cls_head.weight[2:], old.cls_head.weight)  # new rows: a fresh init
    scores = t_out["logits"].sigmoid().amax(-1)
    tau = float(scores.median())
    pseudo = pseudo_objects(old, t_out, tau, [torch.zeros(0, 4), torch.zeros(0, 4)], 0.7)
    for b in range(2):
        want = (scores[b] > tau).nonzero()[:, 0]
        assert pseudo[b]["queries"].tolist() == want.tolist()
        assert pseudo[b]["labels"].tolist() == t_out["logits"][b, want].argmax(-1).tolist()
    # a ground-truth box on a pseudo box removes it (the old model fired on a labelled object)
    first = pseudo[0]["boxes"][:1]
    dropped = pseudo_objects(old, t_out, tau, [first, torch.zeros(0, 4)], 0.7)
    assert len(dropped[0]["queries"]) == len(pseudo[0]["queries"]) - 1
    # the student (a copy) is Hungarian-matched to the very queries that found the pseudo-objects
    inst = paired_instances(student, s_out, t_out, pseudo)
    torch.testing.assert_close(inst["q_s"], inst["q_t"])


def test_distillation_terms_vanish_at_the_copy_and_grow_as_the_student_drifts() -> None:
    old = _query(2)
    with torch.no_grad():          # queries disagree about the class: both old classes get pseudo-objects
        old.cls_head.weight.normal_(0, 1)
    student = grow_classes(old, _query(4, seed=1))
    module = IODModule(student, old, IODArgs(old_classes=2, tau=0.005)).train()
    student.eval()                 # batch norm in eval: the copy is exact
    x = torch.randn(4, 3, 32, 32)
    batch = DetectionBatch(x, [torch.tensor([[2.0, 2.0, 12.0, 12.0]])] * 4, [torch.tensor([3])] * 4,
                           torch.arange(4))
    step = module(batch)
    with torch.no_grad():
        t_out, s_out = old(x), student(x)
    inst = paired_instances(student, s_out, t_out, pseudo_objects(old, t_out, 0.005, batch.boxes, 0.7))
    assert len(inst["labels"].unique()) == 2
    assert step.groups["dmd"] == "distill" and step.groups["ifd"] == "distill"
    assert step.losses["dmd"].item() == pytest.approx(0.0, abs=1e-6)
    assert step.losses["ifd"].item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for p in student.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        student.input_proj[0][0].weight.mul_(1.5)
    step = module(batch)
    assert step.losses["dmd"].item() > 1e-4 and step.losses["ifd"].item() > 1e-4
    (step.losses["dmd"] + step.losses["ifd"]).backward()
    assert student.decoder[0].cross_attn.in_proj_weight.grad is not None
    assert all(p.grad is None for p in module.teachers.parameters())


def test_recipe_trains_old_stage_then_arms_with_subset_ap(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    for key in ("test_AP", "test_old_AP", "test_new_AP", "old_model_old_AP", "forgetting", "test_dmd_gap"):
        assert key in result, key
    assert result["forgetting"] == pytest.approx(result["old_model_old_AP"] - result["test_old_AP"])
    old = json.loads((tmp_path / "run/stages/old/result.json").read_text())
    assert old["test_AP"] == result["old_model_old_AP"]
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    assert "train_dmd" in header and "train_ifd" in header
    for arm, overrides in (("ft", ["iod.pseudo=false", "iod.w_dmd=0", "iod.w_ifd=0"]), ("joint", ["iod.mode=joint"])):
        out = tmp_path / arm
        assert main(["train", str(RECIPE), *TINY, *overrides, f"old.run={tmp_path / 'run/stages/old'}",
                     "--out", str(out)]) == 0
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert "dmd" not in header and not (out / "stages").exists()
        assert json.loads((out / "result.json").read_text())["old_model_old_AP"] == old["test_AP"]


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    # the old stage (4 steps) runs through; the student stage (8 steps) stops at 6 and resumes
    assert_resume_exact(RECIPE, [*TINY, "train.epochs=2"], tmp_path, stop_after=6)


def test_bad_iod_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("model.kind=fcos", "model.kind must be query"),
                              ("iod.old_classes=6", "iod.old_classes must be in 1..5"),
                              ("iod.mode=replay", "iod.mode must be one of incremental, joint"),
                              ("iod.w_dmd=-1", "iod.w_dmd, iod.w_ifd >= 0"),
                              (f"old.run={tmp_path / 'none'}", "holds no finished run")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
