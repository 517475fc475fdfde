"""MTL-CSKD: the Cauchy-Schwarz divergence against independent computations, the within- and across-task
matches against per-pixel loops, the method's terms inside a training step, and the recipe's errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.losses import cs_divergence, cs_inter, cs_intra
from kdforge.losses.base import LossContext
from kdforge.registry import LOSSES, METHODS, build

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/mtl_cskd.yaml"
TINY = ["data.size=16", "data.num_train=8", "data.num_test=4", "model.width=2", "teacher.model.width=4",
        "train.epochs=1", "train.batch_size=4", "teacher.loop.epochs=1", "teacher.loop.batch_size=4",
        "trainer.threads=1"]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cs_vec(p: list[float], q: list[float]) -> float:
    """D_CS of two plain vectors, written out with math (no torch)."""
    pq = sum(a * b for a, b in zip(p, q))
    return -math.log(pq + 1e-8) + 0.5 * math.log(sum(a * a for a in p) + 1e-8) + 0.5 * math.log(
        sum(b * b for b in q) + 1e-8)


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def test_cs_divergence_matches_minus_log_cosine_along_any_dim() -> None:
    p, q = torch.rand(3, 4, 5, generator=_g(1)), torch.rand(3, 4, 5, generator=_g(2))
    for dim in (0, 1, -1):
        got = cs_divergence(p, q, dim=dim)
        assert got.shape == tuple(s for i, s in enumerate(p.shape) if i != dim % 3)       # other dims kept
        torch.testing.assert_close(got, -torch.log(F.cosine_similarity(p, q, dim=dim)), atol=1e-5, rtol=1e-5)
    assert float(cs_divergence(torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5]))) == pytest.approx(
        _cs_vec([0.2, 0.8], [0.5, 0.5]), abs=1e-6)
    # symmetric, zero for proportional vectors, the eps keeps two zero vectors finite
    torch.testing.assert_close(cs_divergence(p, q), cs_divergence(q, p))
    assert float(cs_divergence(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))) == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(float(cs_divergence(torch.zeros(3), torch.zeros(3))))
    assert cs_divergence(p.half(), q.half()).dtype == torch.float32


def test_intra_channel_and_binary_match_a_pixel_loop() -> None:
    s, t = torch.randn(2, 3, 2, 2, generator=_g(3)), torch.randn(2, 3, 2, 2, generator=_g(4))
    T = 2.0
    loop = [_cs_vec(_softmax((t[n, :, i, j] / T).tolist()), _softmax((s[n, :, i, j] / T).tolist()))
            for n in range(2) for i in range(2) for j in range(2)]
    assert float(cs_intra(s, t, "channel", T)) == pytest.approx(sum(loop) / len(loop), abs=1e-6)
    zs, zt = s[:, :1], t[:, :1]
    loop = [_cs_vec(_softmax([0.0, float(zt[n, 0, i, j]) / T]), _softmax([0.0, float(zs[n, 0, i, j]) / T]))
            for n in range(2) for i in range(2) for j in range(2)]
    assert float(cs_intra(zs, zt, "binary", T)) == pytest.approx(sum(loop) / len(loop), abs=1e-6)


def test_intra_spatial_matches_a_channel_loop() -> None:
    s, t = torch.randn(2, 3, 3, 2, generator=_g(5)), torch.randn(2, 3, 3, 2, generator=_g(6))
    T = 4.0
    loop = [_cs_vec(_softmax((t[n, c].flatten() / T).tolist()), _softmax((s[n, c].flatten() / T).tolist()))
            for n in range(2) for c in range(3)]
    assert float(cs_intra(s, t, "spatial", T)) == pytest.approx(sum(loop) / len(loop), abs=1e-6)


def test_inter_matches_a_loop_over_concatenated_task_distributions() -> None:
    """At each pixel: [softmax over the classes, 2-way boundary, spatial depth x HW / 1] concatenated."""
    n, h, w, T = 2, 2, 3, 3.0
    s = [torch.randn(n, 4, h, w, generator=_g(7)), torch.randn(n, 1, h, w, generator=_g(8)),
         torch.randn(n, 1, h, w, generator=_g(9))]
    t = [torch.randn(n, 4, h, w, generator=_g(10)), torch.randn(n, 1, h, w, generator=_g(11)),
         torch.randn(n, 1, h, w, generator=_g(12))]

    def vector(maps: list[torch.Tensor], b: int, i: int, j: int) -> list[float]:
        seg = _softmax((maps[0][b, :, i, j] / T).tolist())
        bnd = _softmax([0.0, float(maps[1][b, 0, i, j]) / T])
        spatial = _softmax((maps[2][b, 0].flatten() / T).tolist())
        return seg + bnd + [spatial[i * w + j] * h * w]

    loop = [_cs_vec(vector(t, b, i, j), vector(s, b, i, j)) for b in range(n) for i in range(h) for j in range(w)]
    got = cs_inter(s, t, ["channel", "binary", "spatial"], T)
    assert float(got) == pytest.approx(sum(loop) / len(loop), abs=1e-6)
    assert float(cs_inter(t, t, ["channel", "binary", "spatial"], T)) == pytest.approx(0.0, abs=1e-6)


def test_registered_cs_loss_scales_averages_and_resizes() -> None:
    s = [torch.randn(2, 3, 4, 4, generator=_g(13), requires_grad=True), torch.randn(2, 1, 4, 4, generator=_g(14))]
    t = [torch.randn(2, 3, 8, 8, generator=_g(15)), torch.randn(2, 1, 8, 8, generator=_g(16))]
    up = [F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False) for x in s]
    loss = build(LOSSES, "cs", temperature=2.0, axis=["channel", "spatial"])
    with torch.no_grad():
        want = 4.0 * (cs_intra(up[0], t[0], "channel", 2.0) + cs_intra(up[1], t[1], "spatial", 2.0)) / 2
    value = loss(s, t, LossContext())
    assert float(value.detach()) == pytest.approx(float(want), rel=1e-5)
    value.backward()
    assert s[0].grad is not None and s[0].grad.abs().sum() > 0
    inter = build(LOSSES, "cs", temperature=2.0, axis=["channel", "spatial"], match="inter", t2=False)
    with torch.no_grad():
        got, want = inter(s, t, LossContext()), cs_inter(up, t, ["channel", "spatial"], 2.0)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    logits = build(LOSSES, "cs", temperature=4.0)       # classifier logits (N, C) work too
    a, b = torch.randn(5, 10, generator=_g(17)), torch.randn(5, 10, generator=_g(18))
    want = 16 * cs_divergence(F.softmax(b / 4, 1), F.softmax(a / 4, 1), dim=1).mean()
    assert float(logits(a, b, LossContext())) == pytest.approx(float(want), rel=1e-5)
    for bad, message in (({"axis": "pixel"}, "unknown axis"), ({"match": "both"}, "intra"),
                         ({"temperature": 0}, "temperature")):
        with pytest.raises(KdforgeError, match=message):
            build(LOSSES, "cs", **bad)
    with pytest.raises(KdforgeError, match="one axis per tap"):
        build(LOSSES, "cs", axis=["channel"])(s, t, LossContext())


def test_autokd_cs_distance_reuses_cs_divergence() -> None:
    from kdforge.losses.autokd import row_distance

    s, t = torch.randn(6, 5, generator=_g(19)), torch.randn(6, 5, generator=_g(20))
    want = cs_divergence(F.softmax(t / 2, 1), F.softmax(s / 2, 1), dim=1).mean()
    assert float(row_distance("cs", s, t, 2.0)) == pytest.approx(float(want), rel=1e-6)


def test_method_terms_in_a_step_equal_beta_t2_times_intra_plus_inter() -> None:
    from kdforge.methods.mtl_cskd import MTLCSKDArgs, kd_terms
    from kdforge.tasks.dense.models import MultiTaskNet, task_channels
    from kdforge.tasks.dense.scenes import procedural_split
    from kdforge.tasks.dense.task import DenseTask, normalise

    data = procedural_split(4, seed=2, size=16)
    tasks = data.tasks
    ch = task_channels(tasks, data.num_classes)
    torch.manual_seed(0)
    student, teacher = MultiTaskNet(ch, width=2), MultiTaskNet(ch, width=4)
    args = MTLCSKDArgs(beta=0.5, temperature=8.0)
    terms = kd_terms(tasks, args)
    assert [(t.name, t.student_taps, t.teacher_taps) for t in terms] == [("cs_intra", tasks, tasks),
                                                                         ("cs_inter", tasks, tasks)]
    task = DenseTask(student, data, data, 4, teacher=teacher, terms=terms, flip=False)
    module = task.build(torch.device("cpu"), None)
    module.train()
    batch = task.batch(0, 0, type("Env", (), {"enabled": False})())
    step = module(batch)
    losses = {k: float(v.detach()) for k, v in step.losses.items()}
    with torch.no_grad():       # the student again in train mode (batch statistics): the same outputs
        s_out, t_out = student.train()(batch.images), teacher.eval()(batch.images)
    axes = ["channel", "spatial", "spatial", "binary"]
    intra = sum(cs_intra(s_out[k], t_out[k], a, 8.0) for k, a in zip(tasks, axes)) / 4
    inter = cs_inter([s_out[k] for k in tasks], [t_out[k] for k in tasks], axes, 8.0)
    assert losses["cs_intra"] == pytest.approx(0.5 * 64 * float(intra), rel=1e-4)
    assert losses["cs_inter"] == pytest.approx(0.5 * 64 * float(inter), rel=1e-4)
    assert losses["cs_inter"] > 0 and step.groups["cs_inter"] == "distill"
    assert torch.equal(batch.images, normalise(data.images[batch.index]))
    assert kd_terms(tasks, MTLCSKDArgs(beta=0)) == []
    (kl,) = kd_terms(tasks, MTLCSKDArgs(divergence="kl", inter=False))
    assert kl.name == "kl_intra"


def test_dense_kl_matches_a_pixel_loop() -> None:
    from kdforge.methods.mtl_cskd import dense_kl

    s, t = torch.randn(1, 3, 2, 2, generator=_g(21)), torch.randn(1, 3, 2, 2, generator=_g(22))
    loop = []
    for i in range(2):
        for j in range(2):
            p, q = _softmax((t[0, :, i, j] / 2).tolist()), _softmax((s[0, :, i, j] / 2).tolist())
            loop.append(sum(a * math.log(a / b) for a, b in zip(p, q)))
    assert float(dense_kl(s, t, "channel", 2.0)) == pytest.approx(sum(loop) / 4, abs=1e-6)


def test_mtl_cskd_is_registered() -> None:
    import kdforge.methods.mtl_cskd  # noqa: F401
    from kdforge.methods.catalog import SEED_METHODS

    assert "mtl_cskd" in SEED_METHODS and "mtl_cskd" in METHODS and "cs" in LOSSES


def test_shared_teacher_run_is_reused_and_checked(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    assert main(["train", str(RECIPE), *TINY, "teacher_only=true", "--out", str(teacher)]) == 0
    assert main(["train", str(RECIPE), *TINY, f"teacher.run={teacher}", "--out", str(tmp_path / "kd")]) == 0
    assert not (tmp_path / "kd/stages").exists()                # the shared teacher was loaded, not trained
    assert main(["train", str(RECIPE), *TINY, f"teacher.run={teacher}", "teacher.model.width=6",
                 "--out", str(tmp_path / "other")]) == 2


def test_bad_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("mtl_cskd.divergence=kl", "set mtl_cskd.inter=false"),
                              ("mtl_cskd.axes={semseg: pixel}", "mtl_cskd.axes semseg: pixel"),
                              ("data.tasks=[semseg, saliency]", "unknown task saliency"),
                              ("mtl_cskd.beta=-1", "beta must be >= 0"),
                              ("model.arch=vit", "model arch must be one of"),
                              ("data.size=20", "divisible by the models' stride"),
                              ("baselines.semseg=/nonexistent", "no finished run"),
                              ("data.format=folder", "needs data.root")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2, override
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
