"""OTD mechanism (per-sample head gradients, energy rank, subspaces, EMA, navigation), the official
class-mixing with current-model pseudo-labels, banks sized to the run, navigation of the feature
layers, the three arms and their paired batches, and the recipe on the one Trainer (exact resume,
CLI run dir, DDP refusal)."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_resume_exact  # tests/ is on sys.path

from kdforge.cli import main as cli_main
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.otd import (
    GradientSubspace,
    OTDConfig,
    class_mix,
    ema_stat,
    energy_rank,
    mixed_targets,
    navigate,
    per_sample_head_grads,
)
from kdforge.methods.otd import build_task as otd_build_task
from kdforge.tasks.common import load_task_config
from kdforge.tasks.domain import mix_regions
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import loop_settings
from kdforge.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "methods" / "otd.yaml"
TINY = [
    "data.num_old=2", "data.num_new=1", "data.src_per_class=32", "data.shots=2", "data.unl_per_class=8",
    "data.val_per_class=4", "data.test_per_class=8", "data.image_size=8", "width=4", "loop.epochs=2",
    "loop.batch_size=16", "trainer.threads=1", "trainer.progress=false",
]


def test_per_sample_head_grads_match_functorch_hard_and_soft_targets():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4), torch.randn(3)
    h, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    soft = torch.rand(5, 3) * torch.tensor([[1.0], [0.5], [1.0], [0.2], [1.0]])   # rows summing to <= 1 ...
    soft = soft / soft.sum(1, keepdim=True) * torch.tensor([[1.0], [0.5], [1.0], [0.2], [0.9]])

    def hard(wt, bt, hi, yi):
        return F.cross_entropy((hi @ wt.T + bt)[None], yi[None])

    def soft_ce(wt, bt, hi, yi):
        return -(yi * (hi @ wt.T + bt).log_softmax(-1)).sum()

    for fn, target in ((hard, y), (soft_ce, soft)):
        gw, gb = torch.func.vmap(torch.func.grad(fn, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, h, target)
        got = per_sample_head_grads(h, h @ w.T + b, target, bias=True)
        assert torch.allclose(got[..., :4], gw, atol=1e-6) and torch.allclose(got[..., 4], gb, atol=1e-6)


def test_head_grads_are_differentiable_through_features():
    h = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(2, 3)
    g = per_sample_head_grads(h, h @ w.T, torch.tensor([0, 1]))
    (g.pow(2).sum()).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_energy_rank_hand_values():
    assert energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.98) == 2  # 9/10.01 = 0.899 < 0.98 <= 10/10.01
    assert energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.85) == 1
    assert energy_rank(torch.tensor([1.0, 1.0]), 1.0) == 2
    with pytest.raises(KdforgeError):
        energy_rank(torch.tensor([1.0]), 0.0)


def test_subspace_circular_bank_svd_and_state_round_trip():
    s = GradientSubspace(dim=3, size=2, every=2, energy=0.98)
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(s.project(x), x)  # identity before the first SVD
    s.push(torch.tensor([1.0, 0, 0]))
    assert s.basis is None
    s.push(torch.tensor([0, 3.0, 0]))       # bank full -> SVD: span{e1, e2} (energies 9 and 1, both needed)
    assert s.basis is not None and s.basis.shape == (3, 2)
    assert torch.allclose(s.project(x), torch.tensor([1.0, 2.0, 0.0]), atol=1e-6)
    s.push(torch.tensor([0, 0, 5.0]))       # overwrites the oldest column (circular), no SVD yet
    assert torch.equal(s.bank, torch.tensor([[0, 0], [0, 3.0], [5.0, 0]]))
    t = GradientSubspace(dim=3, size=2, every=2, energy=0.98)
    t.load_state_dict(s.state_dict())
    assert t.pushes == 3 and torch.equal(t.bank, s.bank) and torch.equal(t.project(x), s.project(x))


def test_ema_stat_starts_from_zero_and_keeps_current_graph_only():
    cur = torch.tensor([3.0], requires_grad=True)
    assert float(ema_stat(None, cur, 0.95).detach()) == pytest.approx(0.15)   # official MovingAverage: zero start
    stored = torch.tensor([1.0], requires_grad=True)
    out = ema_stat(stored, cur, 0.95)
    assert float(out.detach()) == pytest.approx(0.95 + 0.15)
    out.sum().backward()
    assert stored.grad is None and float(cur.grad) == pytest.approx(0.05)


def test_navigation_waits_for_full_bank_then_adds_projection():
    s = GradientSubspace(dim=2, size=2, every=2)
    g1 = torch.tensor([1.0, 0.0])
    assert torch.equal(navigate(g1, s, 0.1), g1)  # bank not full
    out = navigate(torch.tensor([2.0, 0.0]), s, 0.1)  # second push -> SVD; basis = e1
    assert torch.allclose(out, torch.tensor([2.2, 0.0]))
    out = navigate(torch.tensor([1.0, 1.0]), s, 0.1)  # 3rd push: no re-SVD yet, basis still e1
    assert torch.allclose(out, torch.tensor([1.1, 1.0]), atol=1e-6)
    out = navigate(torch.tensor([0.0, 1.0]), s, 0.1)  # 4th push: bank [1,1],[0,1] spans R^2 -> g + 0.1 g
    assert torch.allclose(out, torch.tensor([0.0, 1.1]), atol=1e-6)


# ------------------------------------------------------------------------- the official mixing


def test_class_mix_pastes_few_shot_regions_into_unlabelled_images_as_a_pure_function():
    mask, area = mix_regions(3, 8, 8, 0.25, seed=0, epoch=1, step=2)
    assert mask.shape == (3, 1, 8, 8) and torch.equal(mask.sum((1, 2, 3)), torch.full((3,), 16))
    assert torch.allclose(area, torch.full((3,), 0.25))
    few, unl = torch.full((3, 2, 8, 8), 9.0), torch.zeros(3, 2, 8, 8)
    mixed = class_mix(few, unl, mask)
    assert torch.equal(mixed == 9.0, mask.expand_as(mixed))
    again, _ = mix_regions(3, 8, 8, 0.25, 0, 1, 2)
    assert torch.equal(again, mask)
    assert not all(torch.equal(mix_regions(3, 8, 8, 0.25, 0, 1, s)[0], mask) for s in range(3, 8))


def test_mixed_targets_are_area_weighted_with_thresholded_pseudo_labels():
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.35, 0.3, 0.35]])
    y, keep = mixed_targets(torch.tensor([2, 0]), probs, torch.tensor([0.25, 0.5]), threshold=0.4)
    assert keep.tolist() == [True, False]
    assert torch.allclose(y, torch.tensor([[0.0, 0.75, 0.25], [0.5, 0.0, 0.0]]))   # unconfident part dropped


def _tiny(arm: str = "otd", extra: tuple[str, ...] = ()):
    cfg = load_task_config(OTDConfig, RECIPE, [o for o in TINY if not o.startswith("trainer.")]
                           + [f"otd.arm={arm}", *extra])
    task = otd_build_task(cfg)
    module = task.build(torch.device("cpu"), DistEnv())
    module.train()
    return cfg, task, module


def test_mixed_stream_class_mixes_target_images_with_current_model_pseudo_labels():
    _, task, module = _tiny("mix")
    b = task.batch(1, 0, DistEnv())
    assert b.unl is not None and b.mixed is not None and len(b.mixed) == len(b.few)
    inside = b.mixed == b.few            # the few-shot target view where the region is, the unlabelled one elsewhere
    assert inside.any() and torch.equal(b.mixed[~inside], b.unl[~inside])
    assert torch.allclose(b.mix_area, torch.full_like(b.mix_area, b.mix_area[0]))
    assert not hasattr(module, "labeller")          # no frozen snapshot: the model being trained labels
    m = module.model

    def expected_ce_mix() -> float:
        with torch.no_grad():
            state = copy.deepcopy(m.state_dict())     # the pseudo-label forward runs in training mode (BN)
            probs = m(b.unl).softmax(1)
            h = m.features(torch.cat([b.src, b.mixed]))
            z = m.fc(h)[len(b.src):]
            m.load_state_dict(state)
        y, _ = mixed_targets(b.mix_labels, probs, b.mix_area, module.args.pl_threshold)
        return float(module.args.mix_weight * -(y * z.log_softmax(-1)).sum(-1).mean())

    want = expected_ce_mix()
    assert float(module(b).losses["ce_mix"].detach()) == pytest.approx(want, rel=1e-5)
    with torch.no_grad():                # change the model: its pseudo-labels and the mixed CE follow
        m.fc.weight.add_(torch.randn_like(m.fc.weight))
    want2 = expected_ce_mix()
    assert float(module(b).losses["ce_mix"].detach()) == pytest.approx(want2, rel=1e-5) and want2 != pytest.approx(want)


# ----------------------------------------------------------------------- arms and pairing


def test_three_arms_have_their_terms():
    losses = {}
    for arm in ("finetune", "mix", "otd"):
        _, task, module = _tiny(arm)
        losses[arm] = set(module(task.batch(1, 0, DistEnv())).losses)
    assert losses == {"finetune": {"ce_src", "ce_few"}, "mix": {"ce_src", "ce_few", "ce_mix"},
                      "otd": {"ce_src", "ce_few", "ce_mix", "dom", "cls"}}


def test_arms_of_a_seed_see_the_same_batches_and_initial_weights():
    env = DistEnv()
    tasks = {arm: _tiny(arm)[1:] for arm in ("finetune", "mix", "otd")}
    ref_task, ref_module = tasks["finetune"]
    for arm, (task, module) in tasks.items():
        for p, q in zip(module.model.state_dict().values(), ref_module.model.state_dict().values()):
            assert torch.equal(p, q), arm
        for epoch, step in ((0, 1), (1, 0), (1, 3)):
            a, b = task.batch(epoch, step, env), ref_task.batch(epoch, step, env)
            for key in ("src", "src_labels", "few", "few_labels"):
                assert torch.equal(getattr(a, key), getattr(b, key)), (arm, key, epoch, step)
    a, b = tasks["mix"][0].batch(1, 2, env), tasks["otd"][0].batch(1, 2, env)
    for key in ("unl", "mixed", "mix_labels", "mix_area"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert tasks["otd"][0].batch(0, 2, env).mixed is None          # no mixing in the warm-up epoch


def test_logged_gradient_losses_are_unweighted_means_over_adaptation_steps():
    _, task, module = _tiny("otd")
    env = DistEnv()
    module(task.batch(0, 0, env))                          # warm-up step: no mixing, no OTD terms
    outs = [module(task.batch(1, k, env)) for k in range(2)]
    info = module.diagnostics()
    w = module.args.grad_weight
    assert module.steps == 3 and info["adapt_steps"] == 2
    for key, term in (("l_dom", "dom"), ("l_cls", "cls")):
        want = sum(float(o.losses[term].detach()) for o in outs) / 2 / w
        assert info[key] == pytest.approx(want, rel=1e-5), key


# ----------------------------------------------------- navigation: feature layers, sized to the run


def test_navigation_edits_the_feature_layer_gradients_not_the_head():
    _, task, module = _tiny("otd")
    nav = module.otd.nav
    assert set(nav) == {"stem.0.0.weight", "body.0.0.weight", "body.2.0.weight"}
    for name, sub in nav.items():                 # first push: U = g / |g|, so g + 0.1 U Uᵀ g = 1.1 g
        nav[name] = GradientSubspace(sub.dim, size=1, every=1)
    start = copy.deepcopy(module.task_state())
    grads = []
    for navigating in (False, True):
        module.load_task_state(start)      # same EMA statistics and banks for both backward passes
        for name in nav:
            nav[name] = GradientSubspace(nav[name].dim, size=1, every=1)
        module.zero_grad()
        out = module(task.batch(1, 0, DistEnv()))
        module._navigating = navigating
        out.total().backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
    for name in nav:
        assert torch.allclose(grads[1][name], 1.1 * grads[0][name], atol=1e-6), name
    for name in ("fc.weight", "fc.bias"):
        assert torch.equal(grads[1][name], grads[0][name]), name


def test_banks_are_sized_to_the_run_and_a_bank_that_never_fills_is_refused():
    cfg = load_task_config(OTDConfig, RECIPE)
    task = otd_build_task(cfg)
    steps = cfg.adapt_steps()
    assert steps == (cfg.loop.epochs - cfg.otd.warmup_epochs) * cfg.steps_per_epoch()
    for name, sub in task.module.otd.subspaces().items():
        assert sub.every <= cfg.otd.bank_frac * steps, name       # first SVD within the first fifth of adaptation
    with pytest.raises(ConfigError, match="never act"):          # the old demo: a 300-push bank, 175 steps
        otd_build_task(load_task_config(OTDConfig, RECIPE, ["loop.epochs=8", "otd.nav_bank=300"]))
    with pytest.raises(ConfigError, match="never act"):
        otd_build_task(load_task_config(OTDConfig, RECIPE, [f"otd.svd_every={steps + 1}"]))


def test_recipe_rejects_unknown_key_and_bad_values():
    with pytest.raises(ConfigError, match="nope"):
        load_task_config(OTDConfig, {"otd": {"nope": 1}})
    with pytest.raises(ConfigError):
        load_task_config(OTDConfig, {"otd": {"arm": "x"}}).check()
    with pytest.raises(ConfigError, match="nav_layers"):
        load_task_config(OTDConfig, {"otd": {"nav_layers": ["head"]}}).check()
    with pytest.raises(ConfigError, match="dot"):
        load_task_config(OTDConfig, {"loop": {"optim": {"name": "dot"}}}).check()


# --------------------------------------------------------------------------- the one Trainer


@pytest.mark.parametrize("stop_after", [4, 6])
def test_resume_is_exact_inside_the_adaptation_epochs(tmp_path, stop_after):
    # 4 steps per epoch, warm-up = epoch 0. Step 4: stopped at the switch to mixing; step 6: inside the
    # OTD epoch, after the first SVDs (statistic and navigation banks, EMA statistics in flight)
    full = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=stop_after)
    assert full["steps"] == 8 and full["adapt_steps"] == 4 and "target_top1" in full


def test_cli_run_navigates_with_the_default_bank_sizes(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), "--out", str(out), *TINY]) == 0
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors",
                 "checkpoints/last.task.safetensors", "checkpoints/best.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "stages").exists()      # one stage: the warm-up is the first epochs of the run
    result = json.loads((out / "result.json").read_text())
    assert {"target_top1", "target_new_top1", "val_target_top1", "source_old_top1", "l_dom", "l_cls",
            "pl_kept", "pl_acc"} <= set(result)
    assert result["adapt_steps"] == 4 and result["nav_steps"] >= 3     # the navigation acted (bank of 1 here)
    assert all(result[f"rank_{k}"] is not None for k in ("head_mu", "head_var", "rows_mu", "rows_var"))
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train_dom" in header and "val_target_top1" in header


def test_ddp_is_refused_with_one_clear_error(tmp_path):
    cfg, task, _ = _tiny()
    with pytest.raises(KdforgeError, match="cannot run distributed: OTD's losses"):
        Trainer(loop_settings(cfg.loop, cfg.seed), tmp_path / "ddp", task=task, env=DistEnv(rank=0, world=2))
