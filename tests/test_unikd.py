"""UniKD: the embedding loss, the stage-1 matching and the frozen AKE checked by hand; the recipe on the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.methods.unikd import AKE, AKEArgs, UniKDArgs, UniKDModule, embedding_loss, match_cost, neck_of, set_loss
from kdforge.tasks.detection.query import hungarian_match, pairwise_giou

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/unikd.yaml"
TINY = ["data.num_train=16", "data.num_test=4", "data.size=32", "train.epochs=1", "train.batch_size=8",
        "teacher.loop.epochs=1", "teacher.loop.batch_size=8", "ake.loop.epochs=1", "ake.loop.batch_size=8",
        "model.width=8", "teacher.model.backbone_args={width: 4}", "teacher.model.width=8",
        "teacher.model.head={fc: 16}", "ake.dim=16", "ake.ffn=16", "ake.queries=4", "ake.layers=1",
        "trainer.threads=1"]


def test_embedding_loss_is_query_by_query_squared_distance() -> None:
    g = torch.Generator().manual_seed(0)
    e_s, e_t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    expected = 0.0
    for b in range(2):
        for q in range(3):                        # query q of the student <-> query q of the teacher
            expected += sum((e_s[b, q, d].item() - e_t[b, q, d].item()) ** 2 for d in range(5))
    assert embedding_loss(e_s, e_t).item() == pytest.approx(expected / 6, rel=1e-6)
    # a permutation of the queries is NOT matched away
    assert embedding_loss(e_t[:, [1, 0, 2]], e_t).item() > 0
    with pytest.raises(Exception, match="differ in shape"):
        embedding_loss(e_s, e_t[:, :2])


def test_hungarian_match_is_the_brute_force_optimum_and_cost_hand_case() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        cost = torch.rand(5, 3, generator=g)
        rows, cols = hungarian_match(cost)
        best = min(sum(cost[r, c].item() for r, c in zip(perm, range(3)))
                   for perm in itertools.permutations(range(5), 3))
        assert cost[rows, cols].sum().item() == pytest.approx(best, rel=1e-6)
        assert len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    # GIoU: two 2x2 boxes overlapping by half -> IoU 1/3, enclosing box = union -> GIoU 1/3; apart -> negative
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    assert pairwise_giou(a, b)[0].tolist() == pytest.approx([1 / 3, 0 - (12 - 8) / 12])
    # the DETR cost of one query against one target, by hand
    args = AKEArgs(w_cls=1.0, w_l1=5.0, w_giou=2.0)
    logits = torch.tensor([[0.0, 0.0, 0.0]])              # p = 1/3 for every class
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    tgt = torch.tensor([[0.6, 0.5, 0.2, 0.2]])            # shifted by 0.1: L1 0.1, IoU 0.1/0.3 = 1/3, GIoU 1/3
    cost = match_cost(logits, pred, torch.tensor([1]), tgt, args)
    assert cost.item() == pytest.approx(-1 / 3 + 5 * 0.1 - 2 / 3, rel=1e-5)


def test_set_loss_matches_queries_to_targets() -> None:
    args = AKEArgs(eos_coef=0.1)
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 3)
    targets = [(torch.tensor([1]), torch.tensor([[0.7, 0.7, 0.2, 0.2]]))]
    losses = set_loss(logits, boxes, targets, args)
    # query 1 sits exactly on the target: box terms 0; CE: weighted mean of ln 3 (weights 1, 0.1, 0.1)
    assert losses["ake_l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["ake_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["ake_cls"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)


def _pair(size: int = 32) -> tuple[torch.nn.Module, torch.nn.Module]:
    from kdforge.models import create_model
    from kdforge.tasks.detection.fcos import FCOS
    from kdforge.tasks.detection.two_stage import TwoStageDetector

    teacher = TwoStageDetector(create_model("convnet", num_classes=3, width=4), ["feat2", "feat3"], 3, width=8,
                               size=size, fc=16)
    student = FCOS(create_model("resnet8", num_classes=3), ["feat2", "feat3"], 3, width=8, tower=1,
                   probe_size=size)
    return teacher, student


def test_stage_two_keeps_the_ake_frozen_and_the_term_is_the_hand_loss() -> None:
    from kdforge.tasks.detection.task import DetectionBatch

    torch.manual_seed(0)
    teacher, student = _pair()
    ake = AKE([8, 8], 3, AKEArgs(queries=4, dim=16, heads=4, ffn=16, layers=1))
    module = UniKDModule(student, teacher, ake, UniKDArgs(mode="unikd", weight=0.5), 32).train()
    before = {k: v.clone() for k, v in ake.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    batch = DetectionBatch(x, [torch.tensor([[2.0, 2.0, 14.0, 14.0]]), torch.zeros(0, 4)],
                           [torch.tensor([1]), torch.zeros(0, dtype=torch.long)], torch.tensor([0, 1]))
    step = module(batch)
    # independently: the teacher's maps through the teacher-side adapters, the student's FPN maps by hand
    with torch.no_grad():
        e_t = ake.embed(teacher(x)["features"])
        s_maps = neck_of(student).run(student, x)[1]
        e_s = ake.embed(s_maps, module.adapters, [(16, 16), (8, 8)])
    assert [tuple(m.shape[1:]) for m in s_maps] == [(8, 16, 16), (8, 8, 8)]
    hand = 0.5 * sum(((e_s[b, q] - e_t[b, q]) ** 2).sum().item() for b in range(2) for q in range(4)) / 8
    assert step.losses["unikd"].item() == pytest.approx(hand, rel=1e-5)
    assert step.groups["unikd"] == "distill"
    params = module.trainable_parameters()
    assert not any(p is q for p in params for q in ake.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    step.total().backward()
    opt.step()
    assert all(p.grad is None for p in ake.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in ake.state_dict().items())
    assert all(p.grad is not None for p in module.adapters.parameters())
    assert not any(k.startswith("teachers.") for k in module.checkpoint_state())


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teacher + AKE trained once (prepare_only), shared by the tests that train students."""
    out = tmp_path_factory.mktemp("unikd") / "prep"
    assert main(["train", str(RECIPE), *TINY, "prepare_only=true", "--out", str(out)]) == 0
    return out


def test_recipe_stages_arms_and_shared_preparation(tmp_path: Path, prep: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    for key in ("test_AP", "teacher_test_AP", "ake_test_AP"):
        assert key in result
    assert (tmp_path / "run/stages/teacher/result.json").is_file()
    assert (tmp_path / "run/stages/ake/result.json").is_file()
    assert "train_unikd" in (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    header = (tmp_path / "run/stages/ake/metrics.csv").read_text().splitlines()[0]
    assert "train_ake_cls" in header and "train_ake_giou" in header
    # teacher + AKE once, reused by two arms
    for mode, term in (("feat_mse", "train_feat_mse"), ("none", None)):
        out = tmp_path / mode
        assert main(["train", str(RECIPE), *TINY, f"prepared={prep}", f"unikd.mode={mode}",
                     "--out", str(out)]) == 0
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert (term in header) if term else ("unikd" not in header and "feat_mse" not in header)
        assert not (out / "stages").exists()
        assert json.loads((out / "result.json").read_text())["teacher_test_AP"] == \
            json.loads((prep / "result.json").read_text())["teacher_test_AP"]


def test_bad_unikd_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    for override, message in (("unikd.mode=deformable", "unikd.mode must be one of"),
                              ("ake.dim=18", "dim a multiple of heads"),
                              (f"prepared={tmp_path / 'none'}", "holds no finished teacher + AKE run"),
                              ("unikd.weight=-1", "must be >= 0")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_training_from_the_embedding_store_gives_the_online_losses(tmp_path: Path, prep: Path, capsys) -> None:
    arm = [*TINY, f"prepared={prep}", "train.epochs=2"]
    assert main(["train", str(RECIPE), *arm, "store_only=true", "--out", str(tmp_path / "store")]) == 0
    store = tmp_path / "store/embeddings"
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["shards"] == ["epoch_000.safetensors", "epoch_001.safetensors"] and manifest["seed"] == 0
    assert not list(tmp_path.glob("store/.*tmp*"))
    assert main(["train", str(RECIPE), *arm, "--out", str(tmp_path / "online")]) == 0
    assert main(["train", str(RECIPE), *arm, f"embeddings={store}", "--out", str(tmp_path / "offline")]) == 0

    def losses(run: str) -> list[list[float]]:
        rows = (tmp_path / run / "metrics.csv").read_text().splitlines()
        cols = [i for i, c in enumerate(rows[0].split(",")) if c.startswith("train_")]
        return [[float(r.split(",")[i]) for i in cols] for r in rows[1:]]

    online, offline = losses("online"), losses("offline")
    assert len(online) == 2 and all(a == pytest.approx(b, rel=1e-5) for a, b in zip(online, offline))
    capsys.readouterr()
    # another seed means other views: refused in one line
    assert main(["train", str(RECIPE), *arm, f"embeddings={store}", "seed=1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written for other settings (seed)" in err, err


def test_neck_features_of_every_detector_kind() -> None:
    from kdforge.models import create_model
    from kdforge.tasks.detection.query import build_query

    teacher, student = _pair()
    x = torch.randn(1, 3, 32, 32)
    assert [m.shape[1:] for m in neck_of(teacher).run(teacher, x)[1]] == [(8, 16, 16), (8, 8, 8)]
    assert torch.equal(neck_of(teacher).maps_only(teacher, x)[0], teacher(x)["features"][0])
    query = build_query(create_model("convnet", num_classes=3, width=4), ["feat3"], 3, width=16, size=32)
    out, maps = neck_of(query).run(query.eval(), x)
    assert len(maps) == 1 and maps[0] is out["memory"]
