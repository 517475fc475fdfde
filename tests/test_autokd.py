"""Auto-KD: CKA and training-free weights against hand formulas, the searched loss's transforms and
distances against direct computations, the space built from the registry, a tiny real search
(cached teacher, interruption + resume, recipe that `kdforge train` runs) and the proxy trials as
ordinary Trainer runs (run directory, exact resume mid-trial, read-not-retrained, patience,
schedule, divergence)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdforge.losses  # noqa: F401
from kdforge.cli import main as kdforge_main
from kdforge.config import load_config
from kdforge.errors import KdforgeError
from kdforge.losses.at import at_loss
from kdforge.losses.autokd import AutoKDLoss, autokd_distance, global_transform, intra_transform
from kdforge.losses.base import DistillLoss
from kdforge.losses.kd import kd_loss
from kdforge.models import create_model
from kdforge.models.taps import FeatureTap
from kdforge.registry import LOSSES, METHODS
from kdforge.search.autokd import recipe, run_autokd, setup_autokd
from kdforge.search.autokd_space import MULTI, AutoKDSpace
from kdforge.search.cka import linear_cka, training_free_weights
from kdforge.search.options import AutoKDOptions
from kdforge.search.proxy import Proxy, sparsity_masks, student_features, subset_rows
from kdforge.search.storage import complete_trials, open_study
from kdforge.train.checkpoint import load_checkpoint, save_tensors
from kdforge.train.optim import lr_factor
from kdforge.train.trainer import Trainer

# ------------------------------------------------------------------ CKA and training-free weights


def _cka_by_kernels(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, L = Y Y^T, H = I - 11^T / n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().t(), y.double() @ y.double().t()
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)   # noqa: E731
    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_matches_kernel_formula_and_invariances() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=gen), torch.randn(12, 5, generator=gen)
    assert float(linear_cka(x, y)) == pytest.approx(_cka_by_kernels(x, y), abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    assert float(linear_cka(x, 2.5 * x @ q + 1.0)) == pytest.approx(1.0, abs=1e-6)   # rotation, scale, shift
    # hand case: centred x = (-1, 0, 1), centred y = (1/3, -2/3, 1/3) are orthogonal -> CKA 0
    assert float(linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [1.0]]))) == \
        pytest.approx(0.0, abs=1e-7)
    assert float(linear_cka(torch.randn(6, 2, 2, 2, generator=gen), torch.randn(6, 4, generator=gen))) <= 1.0
    with pytest.raises(KdforgeError):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))


def test_training_free_weights_are_a_softmax_of_gaps() -> None:
    w = training_free_weights([0.2, 0.6], tau=0.5)      # softmax(0.4, 1.2)
    e = math.exp(0.8)
    assert w == pytest.approx([1 / (1 + e), e / (1 + e)])
    assert sum(training_free_weights([0.1, 0.5, 0.9], 0.3)) == pytest.approx(1.0)
    assert training_free_weights([0.3, 0.9], tau=1e6) == pytest.approx([0.5, 0.5])
    with pytest.raises(KdforgeError):
        training_free_weights([0.1], tau=0.0)


# ------------------------------------------------------------------ transforms and distances


def test_distances_on_logits_match_direct_formulas() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    kd = float(kd_loss(s, t, 4.0))
    assert autokd_distance(s, t, distance="kl", temperature=4.0) == pytest.approx(kd, rel=1e-5)
    assert autokd_distance(s, t, distance="mse") == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)
    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    assert autokd_distance(s, t, distance="cosine") == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    corr = torch.stack([torch.corrcoef(torch.stack([s[i], t[i]]))[0, 1] for i in range(5)])
    assert autokd_distance(s, t, distance="pearson") == pytest.approx(float((1 - corr).mean()), rel=1e-5)
    gl2 = ((s / s.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert autokd_distance(s, t, distance="gl2") == pytest.approx(float(gl2), rel=1e-5)
    p, q = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    cs = -torch.log((p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1)))
    assert autokd_distance(s, t, distance="cs", temperature=2.0) == pytest.approx(float(cs.mean()), rel=1e-5)
    assert autokd_distance(t, t, distance="cs", temperature=2.0) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KdforgeError):
        autokd_distance(s, t, global_transform_name="spatial_attention")


def test_feature_chains_match_hand_computations() -> None:
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    # channel-wise KL = channel-wise distillation: softmax over the 16 positions of each channel
    ps = F.log_softmax(s.reshape(12, 16) / 2, 1)
    pt = F.log_softmax(t.reshape(12, 16) / 2, 1)
    cwd = (pt.exp() * (pt - ps)).sum(1).mean() * 4
    v = autokd_distance(s, t, inter="channel", distance="kl", temperature=2.0)
    assert v == pytest.approx(float(cwd), rel=1e-5)
    # spatial attention + normalised L2 = AT's loss summed over the H*W positions
    v = autokd_distance(s, t, global_transform_name="spatial_attention", distance="gl2")
    assert v == pytest.approx(float(at_loss(s, t)) * 16, rel=1e-5)
    # multi-scale pooling: 1 + 4 + 16 positions; the first is the global mean
    ms = intra_transform("multiscale", s)
    assert ms.shape == (3, 4, 21) and torch.allclose(ms[:, :, 0], s.mean((2, 3)))
    assert torch.allclose(ms[:, :, 1], s[:, :, :2, :2].mean((2, 3)))
    # patches: 2x2 grid, patch (row 0, col 1) of sample 0 is the top-right quarter
    pt_rows = intra_transform("patches", s)
    assert pt_rows.shape == (12, 4, 4)
    assert torch.equal(pt_rows[1], s[0, :, :2, 2:].reshape(4, 4))
    # teacher-guided mask keeps the top (1 - ratio) positions of the teacher's attention, same for both
    ms_s, ms_t = global_transform("mask_teacher", s, t, mask_ratio=0.75)
    att = t.pow(2).mean(1).reshape(3, 16)
    for i in range(3):
        keep = set(att[i].topk(4).indices.tolist())
        kept = {j for j in range(16) if ms_t[i].reshape(4, 16)[:, j].abs().sum() > 0}
        assert kept == keep
        assert torch.equal(ms_s[i].reshape(4, 16)[:, sorted(keep)], s[i].reshape(4, 16)[:, sorted(keep)])
    with pytest.raises(KdforgeError):
        AutoKDLoss(distance="l1")


# ------------------------------------------------------------------ the space


def _space(**kw: object) -> AutoKDSpace:
    opts = AutoKDOptions(layers={"feat2": "feat2", "feat3": "feat3"}, **kw)
    student = {"logits": (2, 10), "feat2": (2, 8, 4, 4), "feat3": (2, 16, 2, 2)}
    teacher = {"teacher": {"logits": (2, 10), "feat2": (2, 16, 4, 4), "feat3": (2, 32, 2, 2)}}
    return AutoKDSpace(opts, student, teacher, num_samples=64)


def _registered(kind: str) -> list[str]:
    """Independent of the space: registered distillation losses whose metadata says they read `kind`."""
    return [n for n in LOSSES.names() if LOSSES.meta(n).get("group") == "distill"
            and LOSSES.meta(n).get("inputs") == kind and n != "autokd_distill"]


def test_space_options_follow_the_inputs_and_the_registry() -> None:
    space = _space()
    assert space.options(()) == ["logits", "feat2", "feat3", MULTI]
    assert space.options(("logits",)) == ["none"]
    assert space.options(("feat2",)) == ["none", "spatial_attention", "channel_attention", "mask_random",
                                        "mask_teacher"]
    assert space.options(("feat2", "none")) == ["none", "patches", "multiscale"]        # 4x4 grid
    assert space.options(("feat3", "none")) == ["none", "patches", "multiscale"]        # 2x2 grid
    assert space.options(("feat2", "channel_attention")) == ["none"]                     # 1x1 left
    assert space.options(("feat2", "channel_attention", "none")) == ["none"]
    assert space.options(("feat3", "none", "patches")) == ["none"]                # 1 position per patch
    base = ["mse", "gl2", "cosine", "pearson", "kl", "cs"]
    raw = ("none", "none", "none")
    assert space.options(("logits", *raw)) == base + ["loss:" + n for n in _registered("logits")]
    assert "loss:kd" in space.options(("logits", "none", "none", "none"))
    assert space.options(("feat2", *raw)) == base + ["loss:" + n for n in _registered("features")]
    assert space.options(("feat2", "spatial_attention", "none", "none")) == base  # registered: raw only
    assert space.options(("logits", "none", "none", "none", "kl")) == [1.0, 2.0, 4.0, 8.0]
    assert space.options(("logits", "none", "none", "none", "loss:kd")) == [1.0, 2.0, 4.0, 8.0]
    assert space.options(("feat2", "none", "none", "none", "mse")) == [None]
    assert space.options(("feat2", "none", "none", "none", "mse", None)) == [0.5, 0.75, 0.9]
    assert space.options(("feat2", "none", "none", "none", "mse", None, 0.5)) == []


def test_a_newly_registered_loss_joins_the_space(monkeypatch: pytest.MonkeyPatch) -> None:
    class Dummy(DistillLoss):
        def forward(self, student, teacher, ctx):   # noqa: ANN001, ANN201
            return (student - teacher).abs().mean()

    monkeypatch.setitem(LOSSES._items, "zz_test_logit_l1", Dummy)
    monkeypatch.setitem(LOSSES._meta, "zz_test_logit_l1", {"group": "distill", "inputs": "logits"})
    assert "loss:zz_test_logit_l1" in _space().options(("logits", "none", "none", "none"))
    assert "loss:zz_test_logit_l1" not in _space(exclude=["zz_test_logit_l1"]).options(
        ("logits", "none", "none", "none"))


def test_paths_compile_to_registered_losses_or_autokd_distill() -> None:
    space = _space()
    cand = space.candidate(("logits", "none", "none", "none", "kl", 4.0, 0.9))
    (term,) = cand.terms
    assert (term.loss, term.args, term.connector, cand.alpha) == ("kd", {"temperature": 4.0}, None, 0.9)
    (term,) = space.candidate(("feat2", "none", "none", "none", "mse", None, 0.5)).terms
    assert (term.loss, term.connector, term.student, term.teacher) == ("fitnet", "conv1x1", "feat2", "feat2")
    (term,) = space.candidate(("feat3", "mask_teacher", "none", "channel", "cs", 2.0, 0.5)).terms
    assert term.loss == "autokd_distill"
    assert term.args == {"global_transform": "mask_teacher", "intra": "none", "inter": "channel",
                         "distance": "cs", "temperature": 2.0, "mask_ratio": 0.5}
    multi = space.candidate((MULTI, "spatial_attention", "none", "none", "gl2", None, 0.75),
                            weights={("teacher", "feat2"): 0.3, ("teacher", "feat3"): 0.7})
    assert [(t.student, t.weight) for t in multi.terms] == [("feat2", 0.3), ("feat3", 0.7)]


def test_proxy_helpers() -> None:
    rows = subset_rows(100, 0.2, seed=3, minimum=5)
    assert len(rows) == 20 and torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == 20
    assert torch.equal(rows, subset_rows(100, 0.2, seed=3, minimum=5))
    model = create_model("convnet", num_classes=10, in_channels=3, width=8, depth=3)
    masks = sparsity_masks(model, 0.5, seed=0)
    kept = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0.45 < kept < 0.55 and sparsity_masks(model, 0.0, 0) == {}


# ------------------------------------------------------------------ a tiny real search

DATA = ["data.name=procedural_cifar", "data.batch_size=32", "data.val_fraction=0.2",
        "data.args={num_train: 320, num_test: 64, num_classes: 10, num_superclasses: 5, image_size: 16}"]
COMMON = ["trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false"]


def _opts(trials: int = 3) -> AutoKDOptions:
    return AutoKDOptions(trials=trials, proxy_steps=4, eval_every=2, patience=1, subset=0.5, cache_epochs=1,
                         layers={"feat3": "feat3"}, temperatures=[1.0, 4.0], alphas=[0.5, 0.9])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("autokd")
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10, in_channels=3)
    save_tensors(root / "teacher.safetensors", teacher.state_dict())
    cfg = load_config(None, [*DATA, *COMMON, "student.name=convnet", "student.args={width: 4, depth: 3}",
                             "teacher.name=resnet8", f"teacher.checkpoint={root / 'teacher.safetensors'}",
                             "trainer.epochs=1"])
    calls: list[str] = []
    flag = {"on": False}
    original = Proxy.run

    def watched(self: Proxy, candidate):   # noqa: ANN001, ANN202
        flag["on"] = True
        try:
            return original(self, candidate)
        finally:
            flag["on"] = False

    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__) if flag["on"] else None)
    Proxy.run = watched
    try:
        full = run_autokd(cfg, _opts(), root / "full", quiet=True)
    finally:
        Proxy.run = original
        hook.remove()
    return {"root": root, "cfg": cfg, "full": full, "calls": calls}


def _history(out: Path) -> list[tuple[list, float, bool]]:
    study = open_study("autokd", f"sqlite:///{out / 'search.db'}")
    return [(t.user_attrs["path"], t.value, bool(t.user_attrs.get("cached"))) for t in complete_trials(study)]


def test_search_never_runs_the_teacher_during_trials(tiny: dict) -> None:
    assert "ConvNet" in tiny["calls"]                  # the proxy student trained
    assert "CifarResNet" not in tiny["calls"]          # the teacher (resnet8) never ran in a trial
    assert tiny["full"]["trials_done"] == 3
    assert METHODS.meta("autokd")["family"] == "search"


def test_interrupted_search_resumes_without_losing_trials(tiny: dict) -> None:
    out = tiny["root"] / "resumed"

    def stop_after_two(study, trial):   # noqa: ANN001, ANN202
        if sum(1 for t in complete_trials(study) if not t.user_attrs.get("cached")) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KdforgeError, match="interrupted after 2 finished trials"):
        run_autokd(tiny["cfg"], _opts(), out, quiet=True, callbacks=[stop_after_two])
    before = _history(out)
    assert sum(not cached for *_, cached in before) == 2
    summary = run_autokd(tiny["cfg"], _opts(), out, quiet=True)
    after = _history(out)
    assert after[:len(before)] == before               # finished trials kept, values unchanged
    assert summary["trials_done"] == 3
    assert after == _history(tiny["root"] / "full")    # the tree rebuilt from storage continued identically
    assert summary["best_value"] == pytest.approx(max(v for _, v, _ in after))
    assert summary["best_value"] == pytest.approx(tiny["full"]["best_value"])


def test_best_recipe_is_a_run_config_that_kdforge_train_runs(tiny: dict, tmp_path: Path) -> None:
    full = tiny["full"]
    cfg = load_config(full["recipe"])
    alpha = full["best_path"][-1]
    assert cfg.terms[0].loss == "ce" and cfg.terms[0].weight == pytest.approx(1 - alpha)
    assert {t.name: t.weight for t in cfg.terms[1:]} == pytest.approx(full["weights"])
    rc = kdforge_main(["train", full["recipe"], "trainer.stop_after_steps=2", "--out", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "checkpoints" / "last.json").is_file()


def test_transformed_distiller_recipe_trains(tiny: dict, tmp_path: Path) -> None:
    """A path with no registered equivalent becomes `autokd_distill`, which the normal trainer runs."""
    space = _space()
    cand = space.candidate(("feat3", "spatial_attention", "multiscale", "channel", "kl", 4.0, 0.5))
    cfg = recipe(tiny["cfg"], cand, 0.5, {cand.terms[0].name: 2.0})
    assert cfg.terms[1].loss == "autokd_distill" and cfg.terms[1].weight == 2.0
    path = tmp_path / "r.yaml"
    from kdforge.config import dump_config

    path.write_text(dump_config(cfg))
    rc = kdforge_main(["train", str(path), "trainer.stop_after_steps=2", "--out", str(tmp_path / "run")])
    assert rc == 0


def test_bad_search_inputs(tiny: dict, tmp_path: Path) -> None:
    cfg = load_config(None, [*DATA[:-1], *COMMON, "data.val_fraction=0.0",
                             "data.args={num_train: 320, num_test: 64, num_classes: 10, num_superclasses: 5, "
                             "image_size: 16}"])
    with pytest.raises(KdforgeError, match="val_fraction"):
        run_autokd(cfg, _opts(), tmp_path / "x", quiet=True)
    with pytest.raises(KdforgeError, match="another search space"):
        opts = _opts()
        opts.alphas = [0.25]
        run_autokd(tiny["cfg"], opts, tiny["root"] / "full", quiet=True)


def test_multi_teacher_multi_layer_weights_are_training_free(tiny: dict) -> None:
    root = tiny["root"]
    torch.manual_seed(1)
    second = create_model("resnet8", num_classes=10, in_channels=3)
    save_tensors(root / "teacher2.safetensors", second.state_dict())
    cfg = load_config(None, [*DATA, *COMMON, "student.name=convnet", "student.args={width: 4, depth: 3}",
                             "teacher.name=resnet8", f"teacher.checkpoint={root / 'teacher.safetensors'}",
                             "teachers={t2: {name: resnet8, checkpoint: "
                             f"{root / 'teacher2.safetensors'}}}}}"])
    opts = _opts()
    opts.layers = {"feat2": "feat2", "feat3": "feat3"}
    setup = setup_autokd(cfg, opts, root / "multi", quiet=True)
    # independent recomputation: gaps 1 - CKA(untrained student, teacher) on the validation split
    student = setup.proxy.build_student()
    val, cached = setup.proxy.pdata.val, setup.proxy.pdata.val_teacher
    with FeatureTap(student, ["feat2", "feat3", "pool"]) as tap:
        _, feats = student_features(student, tap, val.images, val.mean, val.std, ["feat2", "feat3", "pool"])
    gap = {tid: {k: 1 - float(linear_cka(feats[k], cached[tid][k])) for k in ("feat2", "feat3", "pool")}
           for tid in ("teacher", "t2")}
    w_t = training_free_weights([gap["teacher"]["pool"], gap["t2"]["pool"]], opts.weight_tau)
    assert [setup.teacher_weights[k] for k in ("teacher", "t2")] == pytest.approx(w_t)
    for tid in ("teacher", "t2"):
        w_l = training_free_weights([gap[tid]["feat2"], gap[tid]["feat3"]], opts.weight_tau)
        assert [setup.layer_weights[tid][k] for k in ("feat2", "feat3")] == pytest.approx(w_l)
    cand = setup.candidate((MULTI, "spatial_attention", "none", "none", "gl2", None, 0.5))
    assert [(t.teacher_id, t.student) for t in cand.terms] == [
        ("teacher", "feat2"), ("teacher", "feat3"), ("t2", "feat2"), ("t2", "feat3")]
    for term in cand.terms:
        expected = setup.teacher_weights[term.teacher_id] * setup.layer_weights[term.teacher_id][term.student]
        assert term.weight == pytest.approx(expected)
    single = setup.candidate(("feat2", "none", "none", "none", "cosine", None, 0.5))
    assert [t.weight for t in single.terms] == pytest.approx([setup.teacher_weights["teacher"],
                                                             setup.teacher_weights["t2"]])
    result = setup.proxy.run(cand)
    assert math.isfinite(result.reward) and result.ce_weight == 0.5 and len(result.weights) == 4


def test_every_trial_is_a_run_directory(tiny: dict) -> None:
    study = open_study("autokd", f"sqlite:///{tiny['root'] / 'full' / 'search.db'}")
    fresh = [t for t in complete_trials(study) if not t.user_attrs.get("cached")]
    dirs = {Path(t.user_attrs["run_dir"]) for t in fresh}
    assert len(dirs) == len(fresh) == 3 and all(d.parent == tiny["root"] / "full" / "trials" for d in dirs)
    for trial in fresh:
        run = Path(trial.user_attrs["run_dir"])
        result = json.loads((run / "result.json").read_text())
        assert result["reward"] == trial.value == result["best_val_reward"]
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "best.json").is_file()
        assert "val_reward" in (run / "metrics.csv").read_text().splitlines()[0]


def test_ctrl_c_inside_a_trial_resumes_that_trial(tiny: dict) -> None:
    """SIGINT mid-trial: the Trainer checkpoints the trial, the search stops; rerunning finishes it exactly."""
    out = tiny["root"] / "ctrl-c"
    seen = {"train_forwards": 0}

    def interrupt(module, inputs, output):   # noqa: ANN001, ANN202
        if type(module).__name__ == "ConvNet" and module.training:
            seen["train_forwards"] += 1
            if seen["train_forwards"] == 9:      # 5 per trial (first-batch probe + 4 steps): trial 2, step 3
                os.kill(os.getpid(), signal.SIGINT)

    hook = torch.nn.modules.module.register_module_forward_hook(interrupt)
    try:
        with pytest.raises(KdforgeError, match="interrupted after 1 finished trials"):
            run_autokd(tiny["cfg"], _opts(), out, quiet=True)
    finally:
        hook.remove()
    partial = [d for d in (out / "trials").iterdir() if not (d / "result.json").is_file()]
    assert len(partial) == 1 and json.loads((partial[0] / "checkpoints" / "last.json").read_text())["step"] == 3
    summary = run_autokd(tiny["cfg"], _opts(), out, quiet=True)
    assert _history(out) == _history(tiny["root"] / "full")       # the resumed trial scored exactly the same
    assert summary["best_value"] == tiny["full"]["best_value"]


@pytest.fixture(scope="module")
def proxy_setup(tiny: dict):   # noqa: ANN201
    opts = replace(_opts(), proxy_steps=6, eval_every=2, patience=3, sparsity=0.5)
    return setup_autokd(tiny["cfg"], opts, tiny["root"] / "proxy", quiet=True)


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(f)]


def test_interrupted_trial_resumes_exactly_and_finished_trials_are_read(proxy_setup, tmp_path: Path) -> None:   # noqa: ANN001
    base = proxy_setup.proxy
    cand = proxy_setup.candidate(("feat3", "none", "none", "none", "mse", None, 0.5))
    whole = Proxy(base.cfg, base.pdata, base.opts, tmp_path / "whole").run(cand)
    proxy = Proxy(base.cfg, base.pdata, base.opts, tmp_path / "cut")
    run = tmp_path / "cut" / proxy.trial_key(cand)
    settings = replace(proxy.settings, trainer=replace(proxy.settings.trainer, stop_after_steps=3))
    assert Trainer(settings, run, task=proxy.task(cand), quiet=True).fit() == {"stopped_at_step": 3}
    resumed = proxy.run(cand)
    assert resumed.run_dir == str(run)
    assert {**resumed.attrs(), "seconds": 0, "run_dir": ""} == {**whole.attrs(), "seconds": 0, "run_dir": ""}
    assert _rows(run) == _rows(Path(whole.run_dir)) and len(_rows(run)) == 3
    # the sparsity masks hold after every step: masked weights are still zero at the end
    weights = load_checkpoint(run / "checkpoints", "last")[0]
    masks = sparsity_masks(proxy.build_student(), 0.5, proxy.opts.seed)
    assert masks and all(float(weights[f"student.{k}.weight"][m == 0].abs().sum()) == 0 for k, m in masks.items())
    calls: list[str] = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        again = proxy.run(cand)              # finished: read from result.json, nothing runs
    finally:
        hook.remove()
    assert calls == [] and again.reward == whole.reward and again.weights == whole.weights


def test_patience_schedule_and_dot_mapping(proxy_setup) -> None:   # noqa: ANN001
    base = proxy_setup.proxy
    cand = proxy_setup.candidate(("logits", "none", "none", "none", "kl", 4.0, 0.9))
    proxy = Proxy(base.cfg, base.pdata, replace(base.opts, proxy_steps=20, eval_every=2, patience=2))
    task = proxy.task(cand)
    stops = [task.should_stop(e, {"reward": r, "ce": 1.0, "cka": 0.5, "top1": 10.0})
             for e, r in enumerate([-3.0, -3.2, -2.9, -3.1, -3.0])]
    assert stops == [False, False, False, False, True]
    assert (task.scores()["reward"], task.scores()["best_step"]) == (-2.9, 6)
    other = proxy.task(cand)
    other.load_state_dict(task.state_dict())
    assert other.scores() == task.scores()
    # the Trainer's per-step cosine over proxy_steps is the card's lr decay
    s = base.settings
    steps, every = base.opts.proxy_steps, base.opts.eval_every
    assert (s.trainer.epochs, s.trainer.eval_every) == (3, 1)
    assert [lr_factor(s.schedule, k, every, s.trainer.epochs) for k in range(steps)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)])
    dot = replace(base.cfg, optim=replace(base.cfg.optim, name="dot"))
    assert Proxy(dot, base.pdata, base.opts).settings.optim.name == "sgd"


def test_diverging_trial_is_scored_not_raised(proxy_setup, tmp_path: Path) -> None:   # noqa: ANN001
    base = proxy_setup.proxy
    cand = proxy_setup.candidate(("logits", "none", "none", "none", "kl", 4.0, 0.9))
    wild = Proxy(replace(base.cfg, optim=replace(base.cfg.optim, lr=1e6)), base.pdata, base.opts, tmp_path)
    result = wild.run(cand)
    saved = json.loads((Path(result.run_dir) / "result.json").read_text())
    assert "non-finite" in saved["diverged"] and result.reward == saved["reward"] == -1e6
    assert wild.run(cand).reward == -1e6                  # read back, not retrained
