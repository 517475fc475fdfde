"""MemKD: the NR memory's recall and losses against plain loops / hand values, its gradients, the
exemplar sampler, and the recipe on the one Trainer (CLI run, exact resume, one-line errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.losses.memkd import memorisation_loss, orthogonality_loss, recall
from kdforge.methods.memkd import MemKDRecipe, MemoryFusion, NRMemory, memkd_module, sample_exemplars
from kdforge.methods.rd import make_teacher
from kdforge.tasks.anomaly.data import procedural_split
from kdforge.tasks.anomaly.task import AnomalyBatch, normalise

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/memkd.yaml"
TINY = ["data.size=16", "data.num_train=8", "data.num_test_normal=4", "data.num_test_defect=4", "train.epochs=1",
        "train.batch_size=4", "teacher.backbone_args={width: 4, depth: 3}", "model.embed=8", "score.sigma=1",
        "memkd.slots=5", "memkd.exemplars=3", "trainer.threads=1"]


def _loop_recall(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(b):
        for y in range(h):
            for z in range(w):
                q = x[i, :, y, z]
                sims = [float(q @ k) / (float(q.norm()) * float(k.norm())) for k in keys]
                e = [math.exp(s / temperature) for s in sims]
                out[i, :, y, z] = sum(ej / sum(e) * v for ej, v in zip(e, values))
    return out


def test_recall_matches_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x, keys, values = (torch.randn(2, 3, 2, 3, generator=g), torch.randn(5, 3, generator=g),
                       torch.randn(5, 3, generator=g))
    for temperature in (1.0, 0.2):
        want = _loop_recall(x.double(), keys.double(), values.double(), temperature)
        assert torch.allclose(recall(x.double(), keys.double(), values.double(), temperature), want, atol=1e-12)
    memory = NRMemory(3, slots=5)
    assert isinstance(memory.keys, torch.nn.Parameter) and isinstance(memory.values, torch.nn.Parameter)
    assert memory.keys.shape == (5, 3)
    with pytest.raises(KdforgeError, match="keys and values must both be"):
        recall(x, keys, values[:, :2])


def test_orthogonality_loss_hand_case() -> None:
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    values = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # cos(K_i, V_j): [[0, 1], [1/sqrt2, 1/sqrt2]] -> squares 0, 1, 1/2, 1/2 -> mean 1/2
    assert orthogonality_loss(keys, values).item() == pytest.approx(0.5)
    assert orthogonality_loss(keys, -values).item() == pytest.approx(0.5)       # squared: never negative


def test_memorisation_loss_hand_case() -> None:
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])        # (1, 2, 1, 2): positions (1, 0) and (0, 2)
    # position (1, 0): cos with V = (1, 0) -> a = (e, 1) / (e + 1), r = a, ||(1, 0) - n(r)||^2 = 2 - 2e / sqrt(e^2 + 1);
    # position (0, 2) is the mirror image: the same value, so that is also the mean
    want = 2 - 2 * math.e / math.sqrt(math.e ** 2 + 1)
    assert memorisation_loss(teacher, values).item() == pytest.approx(want, rel=1e-6)
    v = values.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    memorisation_loss(t, v).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and t.grad is None     # the teacher is a target only


def _tiny_module() -> tuple[object, object, object]:
    cfg = MemKDRecipe()
    cfg.teacher.backbone_args = {"width": 4, "depth": 3}
    cfg.model.embed, cfg.memkd.slots, cfg.memkd.exemplars = 8, 5, 3
    train, _ = procedural_split("stripes", 16, num_train=6, num_test_normal=1, num_test_defect=1)
    teacher = make_teacher(cfg.teacher)
    return memkd_module(cfg, teacher.shapes(16), teacher, train), train, cfg


def test_memories_are_trained_and_fused_at_every_scale() -> None:
    module, train, _ = _tiny_module()
    params = {id(p) for p in module.trainable_parameters()}
    memories = module.memories()
    assert len(memories) == 3 and [m.keys.shape[1] for m in memories] == [4, 8, 16]      # finest scale first
    assert all(id(m.keys) in params and id(m.values) in params for m in memories)
    assert not any(id(p) in params for p in module.teachers.parameters())
    step = module(AnomalyBatch(normalise(train.images[:4]), torch.arange(4)))
    assert set(step.losses) == {"kd", "nm", "orth"}
    step.total().backward()
    for m in memories:
        assert m.keys.grad is not None and m.keys.grad.abs().sum() > 0
        assert m.values.grad is not None and m.values.grad.abs().sum() > 0
    fusion = MemoryFusion(4, slots=5)          # the adapter = 1x1 conv of concat[S, recall(S)]
    s = torch.randn(2, 4, 3, 3)
    want = fusion.fuse(torch.cat([s, recall(s, fusion.memory.keys, fusion.memory.values)], 1))
    assert torch.allclose(fusion(s), want)


def test_exemplars_are_normal_training_images() -> None:
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0])
    pick = sample_exemplars(labels, 3, seed=4)
    assert len(set(pick.tolist())) == 3 and (labels[pick] == 0).all()
    assert torch.equal(pick, sample_exemplars(labels, 3, seed=4))
    assert len(sample_exemplars(labels, 50, seed=0)) == 5             # at most every normal image once
    with pytest.raises(KdforgeError, match="no normal image"):
        sample_exemplars(torch.ones(4, dtype=torch.long), 2, 0)
    module, train, cfg = _tiny_module()
    index = sample_exemplars(train.labels, cfg.memkd.exemplars, cfg.seed)
    assert torch.equal(module.exemplar_images, train.images[index])
    assert "exemplar" not in " ".join(module.checkpoint_state())       # data, not weights


def test_memkd_recipe_trains_with_its_terms(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert 0 <= result["test_image_auroc"] <= 100 and 0 <= result["test_pixel_auroc"] <= 100
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    assert "train_kd" in header and "train_nm" in header and "train_orth" in header
    from kdforge.methods.catalog import SEED_METHODS
    from kdforge.registry import METHODS

    assert "memkd" in SEED_METHODS and "memkd" in METHODS        # what `kdforge methods` lists as implemented


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    assert_resume_exact(RECIPE, [*TINY, "train.epochs=2"], tmp_path, stop_after=3)


def test_bad_memkd_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("memkd.slots=0", "memkd.slots and memkd.exemplars must be >= 1"),
                              ("memkd.lambda2=-1", "must be >= 0"),
                              ("memkd.temperature=0", "memkd.temperature must be > 0"),
                              ("memkd.slot=3", "slot"),
                              ("train.batch_size=0", "batch_size >= 1")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
