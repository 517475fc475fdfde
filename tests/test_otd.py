"""OTD mechanism (per-sample head gradients, energy rank, subspace projection, EMA, navigation),
the domain task's pure batches, and the recipe on the one Trainer (exact resume, CLI run dir,
DDP refusal)."""

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
    OTDModule,
    ema_stat,
    energy_rank,
    mix_domains,
    navigate,
    per_sample_head_grads,
)
from kdforge.tasks.common import load_task_config
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.domain import DomainTask, build_domains
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import loop_settings
from kdforge.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "methods" / "otd.yaml"
TINY = [
    "data.num_old=2", "data.num_new=1", "data.src_per_class=32", "data.shots=2", "data.unl_per_class=8",
    "data.test_per_class=8", "data.image_size=8", "width=4", "loop.epochs=2", "loop.batch_size=16",
    "otd.svd_every=2", "otd.nav_bank=2", "trainer.threads=1", "trainer.progress=false",
]


def test_per_sample_head_grads_match_functorch():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4), torch.randn(3)
    h, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])

    def loss(wt, hi, yi):
        return F.cross_entropy((hi @ wt.T + b)[None], yi[None])

    ref = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, h, y)
    got = per_sample_head_grads(h, h @ w.T + b, y)
    assert torch.allclose(got, ref, atol=1e-6)


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


def test_subspace_projection_after_svd_and_state_round_trip():
    s = GradientSubspace(dim=3, size=4, every=4, energy=0.98)
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(s.project(x), x)  # identity before the first SVD
    for v in ([1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0]):
        s.push(torch.tensor(v))
    assert s.basis is not None and s.basis.shape == (3, 2)  # energies 10 and 5 -> both needed at 98 %
    assert torch.allclose(s.project(x), torch.tensor([1.0, 2.0, 0.0]), atol=1e-6)
    t = GradientSubspace(dim=3, size=4, every=4, energy=0.98)
    t.load_state_dict(s.state_dict())
    assert t.pushes == 4 and torch.equal(t.bank, s.bank) and torch.equal(t.project(x), s.project(x))


def test_ema_stat_keeps_current_graph_only():
    stored = torch.tensor([1.0], requires_grad=True)
    cur = torch.tensor([3.0], requires_grad=True)
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


def test_mix_pastes_a_square_target_patch_as_a_pure_function():
    src = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    tgt = torch.full((3, 1, 8, 8), 9, dtype=torch.uint8)
    out = mix_domains(src, tgt, seed=0, epoch=1, step=2, frac=0.5)
    assert ((out == 9).sum((1, 2, 3)) == 16).all()
    src = torch.arange(3 * 64, dtype=torch.uint8).reshape(3, 1, 8, 8)
    assert torch.equal(mix_domains(src, tgt, 0, 1, 2), mix_domains(src, tgt, 0, 1, 2))
    assert not all(torch.equal(mix_domains(src, tgt, 0, 1, s), mix_domains(src, tgt, 0, 1, 2)) for s in range(3, 8))


def _tiny_task(arm: str = "otd"):
    cfg = load_task_config(OTDConfig, RECIPE, [o for o in TINY if not o.startswith("trainer.")] + [f"otd.arm={arm}"])
    d = cfg.data
    data = build_domains(d.num_old, d.num_new, d.src_per_class, d.shots, d.unl_per_class, d.test_per_class,
                         d.image_size, d.seed)
    torch.manual_seed(0)
    adapt = cfg.otd.warmup_epochs if arm == "otd" else None
    module = OTDModule(TinyCNN(data.num_classes, cfg.width), cfg.otd, data.num_old, adapt)
    task = DomainTask(module, data, cfg.loop.batch_size, cfg.seed, mix_from=adapt)
    return cfg, task


def test_domain_batches_are_pure_and_mix_after_warmup():
    _, task = _tiny_task()
    task.build(torch.device("cpu"), DistEnv())
    env = DistEnv()
    a, b = task.batch(1, 2, env), task.batch(1, 2, env)
    assert torch.equal(a.src, b.src) and torch.equal(a.mixed, b.mixed) and torch.equal(a.few_labels, b.few_labels)
    assert task.batch(0, 2, env).mixed is None and not torch.equal(task.batch(1, 3, env).src, a.src)


def test_navigation_hook_runs_only_in_adaptation():
    _, task = _tiny_task()
    module = task.build(torch.device("cpu"), DistEnv())
    env = DistEnv()
    module.train()
    module(task.batch(0, 0, env)).total().backward()          # warm-up: no navigation push
    assert module.otd.nav.pushes == 0 and not bool(module.labeller_ready)
    module.on_epoch_start(1)
    assert bool(module.labeller_ready)
    assert all(torch.equal(p, q) for p, q in zip(module.labeller.parameters(), module.model.parameters()))
    out = module(task.batch(1, 0, env))
    assert {"ce_mix", "dom", "cls"} <= set(out.losses)
    out.total().backward()
    assert module.otd.nav.pushes == 1 and module.otd.head.pushes == 1


def test_navigation_hook_edits_the_head_gradient_inside_backward():
    _, task = _tiny_task()
    module = task.build(torch.device("cpu"), DistEnv())
    module.otd.nav = GradientSubspace(module.otd.nav.dim, size=1, every=1)   # first push: U = g / |g|
    module.train()
    module.on_epoch_start(1)
    grads, start = [], copy.deepcopy(module.task_state())
    for navigating in (False, True):
        module.load_task_state(start)     # same EMA statistics and banks for both backward passes
        module.zero_grad()
        out = module(task.batch(1, 0, DistEnv()))
        module._navigating = navigating
        out.total().backward()
        grads.append(module.model.fc.weight.grad.clone())
    assert torch.allclose(grads[1], 1.1 * grads[0], atol=1e-6)           # g + 0.1 U Uᵀ g = 1.1 g


def test_finetune_arm_has_no_otd_terms():
    _, task = _tiny_task("finetune")
    module = task.build(torch.device("cpu"), DistEnv())
    out = module(task.batch(1, 0, DistEnv()))
    assert set(out.losses) == {"ce_src", "ce_few"} and module.labeller is None


def test_recipe_rejects_unknown_key_and_bad_values():
    with pytest.raises(ConfigError, match="nope"):
        load_task_config(OTDConfig, {"otd": {"nope": 1}})
    with pytest.raises(ConfigError):
        load_task_config(OTDConfig, {"otd": {"arm": "x"}}).check()
    with pytest.raises(ConfigError, match="dot"):
        load_task_config(OTDConfig, {"loop": {"optim": {"name": "dot"}}}).check()


@pytest.mark.parametrize("stop_after", [4, 6])
def test_resume_is_exact_inside_the_adaptation_epochs(tmp_path, stop_after):
    # 4 steps per epoch, warm-up = epoch 0. Step 4: stopped before the pseudo-labeller snapshot; step 6:
    # inside the OTD epoch, after the first SVDs (head, rows and navigation banks, EMA statistics in flight)
    full = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=stop_after)
    assert full["steps"] == 8 and full["head_subspace_rank"] is not None and "target_top1" in full


def test_cli_writes_a_complete_run_dir(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), "--out", str(out), *TINY]) == 0
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors",
                 "checkpoints/last.task.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "stages").exists()      # one stage: the warm-up is the first epochs of the run
    result = json.loads((out / "result.json").read_text())
    assert {"target_top1", "target_new_top1", "l_dom", "l_cls", "head_subspace_rank"} <= set(result)
    assert "train_dom" in (out / "metrics.csv").read_text().splitlines()[0]


def test_ddp_is_refused_with_one_clear_error(tmp_path):
    cfg, task = _tiny_task()
    with pytest.raises(KdforgeError, match="cannot run distributed: OTD's losses"):
        Trainer(loop_settings(cfg.loop, cfg.seed), tmp_path / "ddp", task=task, env=DistEnv(rank=0, world=2))
