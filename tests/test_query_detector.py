"""The query (DETR-style) detector: Hungarian matching vs brute force, the set loss on a hand-worked case,
decode, and the `method: detector` recipe with `model.kind: query` on the one Trainer (run, resume, bad input)."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.tasks.detection.models import build_detector
from kdforge.tasks.detection.query import QueryDetector, hungarian_match, match_cost, pairwise_giou

RECIPE = Path(__file__).resolve().parents[1] / "configs/detection/detr.yaml"
TINY = ["data.num_train=48", "data.num_test=16", "data.size=32", "train.epochs=2", "train.batch_size=8",
        "model.backbone_args={width: 4}", "model.width=16", "model.head={queries: 4, heads: 2, ffn: 16}",
        "trainer.progress=false", "trainer.threads=1"]


def _tiny(num_classes: int = 2, **head) -> QueryDetector:
    torch.manual_seed(0)
    head = {"queries": 2, "heads": 2, "ffn": 16, **head}
    return build_detector("query", "convnet", {"width": 4}, ["feat3"], num_classes, 16, 32, **head)


def _brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective assignment of the smaller side into the larger."""
    n, g = cost.shape
    if n >= g:
        return min(sum(float(cost[p[j], j]) for j in range(g)) for p in itertools.permutations(range(n), g))
    return min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(g), n))


def test_hungarian_match_is_the_brute_force_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    for shape in ((3, 3), (5, 3), (4, 2), (2, 4)):
        for _ in range(5):
            cost = torch.rand(shape, generator=g) * 10 - 3
            rows, cols = hungarian_match(cost)
            assert len(rows) == min(shape) and len(set(rows.tolist())) == len(rows) == len(set(cols.tolist()))
            assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost), abs=1e-5)
    with pytest.raises(Exception, match="non-finite"):
        hungarian_match(torch.tensor([[0.0, math.inf]]))


def test_match_cost_is_focal_class_cost_plus_l1_minus_giou() -> None:
    logits = torch.tensor([[0.0, 1.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    p = 0.5
    cls = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p ** 2 * -math.log(1 - p)
    # L1 = 0.2; pred (0.3, 0.4, 0.7, 0.6) inside target (0.3, 0.3, 0.7, 0.7): IoU 0.5, enclosing = union
    expected = 2 * cls + 5 * 0.2 - 2 * 0.5
    assert match_cost(logits, boxes, torch.tensor([0]), target).item() == pytest.approx(expected, rel=1e-5)
    assert pairwise_giou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 0, 3, 1]])).item() == pytest.approx(
        -1 / 3)         # disjoint: IoU 0, enclosing 3, union 2 -> 0 - (3 - 2) / 3


def _focal(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    pt = p * t + (1 - p) * (1 - t)
    return (0.25 * t + 0.75 * (1 - t)) * (1 - pt) ** 2 * ce


def _raw(logits: list[list[float]], boxes: list[list[float]], aux: bool = False) -> dict[str, torch.Tensor]:
    lg, bx = torch.tensor([logits]), torch.tensor([boxes])
    return {"logits": lg, "boxes": bx, "aux_logits": lg[None] if aux else lg[None][:0],
            "aux_boxes": bx[None] if aux else bx[None][:0], "image_wh": torch.tensor([10.0, 10.0])}


def test_set_loss_hand_worked_case() -> None:
    model = _tiny()
    logits = [[0.0, 1.0], [-1.0, 2.0]]
    boxes = [[0.5, 0.5, 0.4, 0.2], [0.2, 0.2, 0.2, 0.2]]
    target_boxes, target_labels = [torch.tensor([[3.0, 3.0, 7.0, 7.0]])], [torch.tensor([0])]
    stats: dict[str, float] = {}
    losses = model.loss(_raw(logits, boxes), target_boxes, target_labels, stats)
    # query 0 matches (L1 cost 0.2 vs 1.0); its class-0 entry is the only positive; one target box
    focal = _focal(0.0, 1) + _focal(1.0, 0) + _focal(-1.0, 0) + _focal(2.0, 0)
    assert losses["cls"].item() == pytest.approx(2 * focal, rel=1e-5)
    assert losses["l1"].item() == pytest.approx(5 * 0.2, rel=1e-5)
    assert losses["giou"].item() == pytest.approx(2 * 0.5, rel=1e-5)
    assert stats["num_pos"] == 1.0
    # an auxiliary layer with the same predictions adds the same terms again
    both = model.loss(_raw(logits, boxes, aux=True), target_boxes, target_labels)
    for k in losses:
        assert both[k].item() == pytest.approx(2 * losses[k].item(), rel=1e-5)
    # no targets: every entry is a negative, no box terms
    empty = model.loss(_raw(logits, boxes), [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    assert empty["cls"].item() == pytest.approx(2 * sum(_focal(v, 0) for row in logits for v in row), rel=1e-5)
    assert empty["l1"].item() == 0.0


def test_decode_is_top_k_over_queries_and_classes() -> None:
    model = _tiny(top_k=3)
    out = _raw([[0.0, 3.0], [1.0, -2.0]], [[0.5, 0.5, 0.4, 0.4], [0.95, 0.1, 0.3, 0.4]])
    det = model.decode(out)[0]
    s = lambda v: 1 / (1 + math.exp(-v))                                # noqa: E731
    assert det["scores"].tolist() == pytest.approx([s(3.0), s(1.0), s(0.0)])
    assert det["labels"].tolist() == [1, 0, 0] and det["queries"].tolist() == [0, 1, 0]
    # query 1 = (8, -1, 11, 3) in pixels, clipped to the 10 x 10 image
    assert det["boxes"].tolist() == [pytest.approx([3, 3, 7, 7]), pytest.approx([8, 0, 10, 3]),
                                     pytest.approx([3, 3, 7, 7])]


def test_forward_exposes_raw_outputs_and_survives_a_copy() -> None:
    model = _tiny(num_classes=3, queries=5, decoder_layers=3)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out["logits"].shape == (2, 5, 3) and out["boxes"].shape == (2, 5, 4)
    assert out["hidden"].shape == (2, 5, 16) and out["memory"].shape == (2, 16, 8, 8)
    assert out["aux_logits"].shape == (2, 2, 5, 3) and out["aux_boxes"].shape == (2, 2, 5, 4)
    assert bool(((out["boxes"] > 0) & (out["boxes"] < 1)).all())
    model.eval()
    twin = copy.deepcopy(model)           # the feature taps are per call: a copy computes on its own weights
    torch.testing.assert_close(twin(x)["logits"], model(x)["logits"])
    with torch.no_grad():
        twin.cls_head.bias.add_(1.0)
    assert not torch.allclose(twin(x)["logits"], model(x)["logits"])


def test_query_recipe_trains_and_reports_coco_ap(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert result["detector"] == "QueryDetector" and 0.0 <= result["test_AP"] <= 100.0
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    assert "train_cls" in header and "train_l1" in header and "train_giou" in header


def test_query_recipe_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=7)


def test_bad_query_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    for override, message in (("model.head={queries: 0}", "need queries >= 1"),
                              ("model.head={quereis: 4}", "unexpected keyword argument 'quereis'"),
                              ("model.width=20", "must be a multiple of 8")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
