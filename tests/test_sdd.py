"""SDD: HQS against a plain loop, the SDS surrogate's gradient against w(t) (eps_hat - eps) with autograd
on a tiny UNet, the UNet's save/load round trip and one-line errors, the timestep policies, and the
recipe on the one Trainer (stages, shared-stage reuse, exact resume, CLI errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.tasks.generative.data import HORIZONTAL, VERTICAL, bar_images
from kdforge.tasks.generative.diffusion import (
    DiffusionModelConfig,
    build_scheduler,
    build_unet,
    guided_eps,
    load_diffusion,
    sample,
    save_diffusion,
)
from kdforge.tasks.generative.models import Manipulator
from kdforge.tasks.generative.sds import hqs_scores, sds_gradient, sds_loss, select_timesteps, sparsify_topk
from kdforge.train.stages import run_recipe

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/sdd.yaml"
TINY = ["data.size=8", "data.num_train=32", "data.num_test=16", "data.thickness=[1, 2]", "data.length=[3, 6]",
        "diffusion.model.channels=[8, 16]", "diffusion.loop.epochs=1", "diffusion.loop.batch_size=16",
        "diffusion.sample_steps=3", "diffusion.num_samples=4", "classifier.loop.epochs=1",
        "classifier.loop.batch_size=16", "manipulator.num_train=16", "manipulator.num_val=8",
        "manipulator.num_test=8", "manipulator.width=4", "manipulator.bottleneck=8", "train.epochs=2",
        "train.batch_size=8", "sdd.grid=[20, 180, 40]", "sdd.hqs_images=4", "trainer.threads=1"]
SMALL = DiffusionModelConfig(channels=[8, 16], timesteps=50)


def _loop_hqs(grads: torch.Tensor) -> list[float]:
    """HQS by hand: per image and t, softmax over pixels of the channel mean, its entropy, the L1 norm."""
    T, N, C, H, W = grads.shape
    ent = [[0.0] * N for _ in range(T)]
    mag = [[0.0] * N for _ in range(T)]
    for t in range(T):
        for n in range(N):
            m = [sum(float(grads[t, n, c, i, j]) for c in range(C)) / C for i in range(H) for j in range(W)]
            z = sum(math.exp(v) for v in m)
            ent[t][n] = -sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in m)
            mag[t][n] = sum(abs(float(v)) for v in grads[t, n].flatten())

    def norm(v: list[list[float]], n: int) -> list[float]:
        col = [v[t][n] for t in range(T)]
        return [(x - min(col)) / (max(col) - min(col)) for x in col]

    nn_, nh = [norm(mag, n) for n in range(N)], [norm(ent, n) for n in range(N)]
    return [sum(nn_[n][t] - nh[n][t] for n in range(N)) / N for t in range(T)]


def test_hqs_matches_a_plain_loop() -> None:
    torch.manual_seed(0)
    grads = torch.randn(4, 3, 2, 3, 5) * torch.tensor([0.1, 1.0, 3.0, 0.5]).view(4, 1, 1, 1, 1)
    hqs, ent, mag = hqs_scores(grads)
    assert torch.allclose(hqs, torch.tensor(_loop_hqs(grads)), atol=1e-5)
    # a larger, more concentrated gradient scores higher than a small, flat one
    flat, peak = torch.full((1, 1, 4, 4), 0.01), torch.zeros(1, 1, 4, 4)
    peak[0, 0, 1, 2] = 5.0
    hqs2, ent2, _ = hqs_scores(torch.stack([flat, peak]))
    assert ent2[1, 0] < ent2[0, 0] and hqs2[1] == 1.0 and hqs2[0] == -1.0


def test_sds_gradient_is_weighted_noise_residual_and_skips_the_unet() -> None:
    torch.manual_seed(0)
    unet, sched = build_unet(SMALL, 8, 2).eval(), build_scheduler(SMALL)
    alphas = sched.alphas_cumprod.float()
    y = torch.randn(3, 1, 8, 8, requires_grad=True)
    t, noise, target = torch.tensor([5, 20, 45]), torch.randn(3, 1, 8, 8), torch.tensor([1, 1, 0])
    g = sds_gradient(unet, alphas, y.detach(), t, noise, target, null=2, scale=7.5)
    (grad,) = torch.autograd.grad(sds_loss(y, g), y)
    assert torch.allclose(grad, g, atol=1e-6)
    with torch.no_grad():     # independently: separate unconditional / conditional passes, w(t) = 1 - abar_t
        want = []
        for i in range(3):
            a = float(sched.alphas_cumprod[int(t[i])])
            x_t = math.sqrt(a) * y[i:i + 1] + math.sqrt(1 - a) * noise[i:i + 1]
            e_u = unet(x_t, t[i:i + 1], class_labels=torch.tensor([2])).sample
            e_c = unet(x_t, t[i:i + 1], class_labels=target[i:i + 1]).sample
            want.append((1 - a) * (e_u + 7.5 * (e_c - e_u) - noise[i:i + 1]))
    assert torch.allclose(g, torch.cat(want), atol=1e-5)
    assert all(p.grad is None for p in unet.parameters())
    # through a manipulator: the surrogate's parameter gradient is the vector-Jacobian product with g
    manip = Manipulator(8, 1, 4, 8)
    torch.nn.init.normal_(manip.decode[-1].weight, std=0.1)
    x = torch.randn(3, 1, 8, 8)
    out = manip(x)
    g = sds_gradient(unet, alphas, out.detach(), t, noise, target, null=2, scale=7.5)
    got = torch.autograd.grad(sds_loss(out, g), list(manip.parameters()))
    want = torch.autograd.grad(manip(x), list(manip.parameters()), grad_outputs=g)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_guided_eps_scale_one_is_conditional() -> None:
    torch.manual_seed(0)
    unet = build_unet(SMALL, 8, 2).eval()
    x, t, lab = torch.randn(2, 1, 8, 8), torch.tensor([3, 9]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.allclose(guided_eps(unet, x, t, lab, 2, 1.0), unet(x, t, class_labels=lab).sample)


def test_topk_keeps_the_largest_entries_per_image() -> None:
    g = torch.tensor([[[[1.0, -5.0], [0.5, 3.0]]], [[[-0.1, 0.25], [-9.0, 0.0]]]])
    out = sparsify_topk(g, 2)
    assert out.tolist() == [[[[0.0, -5.0], [0.0, 3.0]]], [[[0.0, 0.25], [-9.0, 0.0]]]]
    assert torch.equal(sparsify_topk(g, 0), g)


def test_timestep_policies() -> None:
    grid, hqs = [20, 40, 60, 80], [-0.5, 0.2, 0.6, 0.1]
    assert select_timesteps("hqs", grid, hqs, 0.15, (4, 196)) == [40, 60]
    assert select_timesteps("hqs_top", grid, hqs, 0.0, (4, 196)) == [60]
    assert select_timesteps("hqs", grid, hqs, 0.9, (4, 196)) == [60]          # none passes xi: the argmax
    assert select_timesteps("all", grid, hqs, 0.0, (4, 196)) == grid
    assert select_timesteps("random", grid, hqs, 0.0, (4, 196)) == list(range(4, 197))
    with pytest.raises(Exception, match="sdd.timesteps"):
        select_timesteps("best", grid, hqs, 0.0, (4, 196))


def test_bars_have_the_labelled_orientation() -> None:
    labels = torch.tensor([HORIZONTAL, VERTICAL] * 50)
    data = bar_images(labels, size=16, seed=3, thickness=(2, 3), length=(8, 14))
    rows = data.masks.any(2).sum(1)          # rows the bar touches
    cols = data.masks.any(1).sum(1)
    assert bool((cols[labels == HORIZONTAL] > rows[labels == HORIZONTAL]).all())
    assert bool((rows[labels == VERTICAL] > cols[labels == VERTICAL]).all())
    assert data.images.min() == -1 and data.images.max() == 1
    assert torch.equal(bar_images(labels, seed=3).images, bar_images(labels, seed=3).images)
    assert not torch.equal(bar_images(labels, seed=3).images, bar_images(labels, seed=4).images)


def test_saved_unet_loads_through_from_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet, sched = build_unet(SMALL, 8, 2).eval(), build_scheduler(SMALL)
    save_diffusion(unet, sched, tmp_path / "unet")
    loaded, sched2 = load_diffusion(tmp_path / "unet", DiffusionModelConfig(), 8, 2)   # schedule from the dir
    x, t, lab = torch.randn(2, 1, 8, 8), torch.tensor([1, 30]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, class_labels=lab).sample, unet(x, t, class_labels=lab).sample)
    assert torch.equal(sched2.alphas_cumprod, sched.alphas_cumprod)
    with pytest.raises(KdforgeError, match="needs? a 16 px UNet|need a 16 px") as err:
        load_diffusion(tmp_path / "unet", SMALL, 16, 2)
    assert "\n" not in str(err.value)


def test_a_model_name_that_is_not_a_local_directory_fails_in_one_line(tmp_path: Path) -> None:
    for name in ("CompVis/stable-diffusion-v1-4", str(tmp_path / "missing")):
        with pytest.raises(KdforgeError, match="not a saved UNet directory") as err:
            load_diffusion(name, SMALL, 8, 2)
        assert "\n" not in str(err.value) and "nothing is downloaded" in str(err.value)


def test_recipe_trains_all_stages_and_resumes_exactly(tmp_path: Path) -> None:
    result = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=3)
    run = tmp_path / "full"
    assert (run / "stages/classifier/result.json").is_file() and (run / "stages/diffusion/unet/config.json").is_file()
    assert (run / "predictions.png").is_file() and (run / "stages/diffusion/predictions.png").is_file()
    for key in ("test_edit_success", "test_fidelity_mse", "val_edit_success", "sample_success", "hqs_range"):
        assert key in result, key
    assert len(result["hqs"]) == len(result["hqs_grid"]) == 5
    assert result["timesteps_used"] == [t for t, h in zip(result["hqs_grid"], result["hqs"]) if h > 0] or \
        result["timesteps_used"] == [result["hqs_argmax_t"]]
    assert result["steps"] == 4 and result["test_fidelity_mse"] > 0      # the manipulator moved off the identity


def test_shared_run_is_reused_not_retrained(tmp_path: Path) -> None:
    shared = run_recipe(RECIPE, [*TINY, "only=shared"], out=tmp_path / "shared")
    assert "sample_success" in shared and (tmp_path / "shared/unet/config.json").is_file()
    arm = run_recipe(RECIPE, [*TINY, f"shared_run={tmp_path / 'shared'}", "sdd.timesteps=random"],
                     out=tmp_path / "arm")
    assert not (tmp_path / "arm/stages").exists()
    assert arm["policy"] == "random" and arm["sample_success"] == shared["sample_success"]
    assert arm["timesteps_used"] == [4, 196]                         # 0.02 T .. 0.98 T, shown as its ends
    # the local-UNet path runs the same code on the saved directory
    local = run_recipe(RECIPE, [*TINY, f"diffusion.model.local_dir={tmp_path / 'shared/unet'}",
                                "sdd.timesteps=hqs_top"], out=tmp_path / "local")
    assert local["timesteps_used"] == [local["hqs_argmax_t"]]
    # pictures across runs: the same inputs edited by each run's manipulator, and the HQS curve
    from kdforge.tasks.generative.plots import load_manipulator, plot_hqs, plot_policy_edits

    net, _ = load_manipulator(tmp_path / "arm")
    assert net.delta(torch.zeros(1, 1, 8, 8)).abs().sum() > 0                 # trained weights, not the zero init
    assert plot_policy_edits({"random": tmp_path / "arm", "hqs_top": tmp_path / "local"}, tmp_path / "e.png").is_file()
    assert plot_hqs(tmp_path / "local/result.json", tmp_path / "h.png").is_file()
    with pytest.raises(KdforgeError, match="not a finished sdd run"):
        load_manipulator(tmp_path / "shared/stages")
    with pytest.raises(KdforgeError, match="other settings"):
        run_recipe(RECIPE, [*TINY, f"shared_run={tmp_path / 'shared'}", "data.seed=5"], out=tmp_path / "bad")


@pytest.mark.parametrize("override, message", [
    ("sdd.timesteps=best", "sdd.timesteps must be one of"),
    ("sdd.grid=[20, 400, 10]", "sdd.grid"),
    ("diffusion.model.local_dir=no/such/unet", "not a saved UNet directory"),
    ("only=teacher", "only must be null"),
    ("sdd.guidnce_scale=3", "guidnce_scale"),
])
def test_bad_recipes_fail_in_one_line(tmp_path: Path, capsys, override: str, message: str) -> None:
    assert main(["train", str(RECIPE), *TINY, override, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_result_json_is_written(tmp_path: Path) -> None:
    assert main(["train", str(RECIPE), *TINY, "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run/result.json").read_text())
    assert saved["policy"] == "hqs" and 0 <= saved["test_edit_success"] <= 100


def test_sdedit_sampling_keeps_the_start_image_at_low_noise_and_forgets_it_at_high_noise() -> None:
    """SDEdit (`sample(start=..., start_step=t0)`): noised to t0 then denoised; t0 = 0 is nearly the identity."""
    torch.manual_seed(0)
    unet, sched = build_unet(SMALL, 8, 2).eval(), build_scheduler(SMALL)
    start = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.ones(4, dtype=torch.long)
    low = sample(unet, sched, labels, null=2, scale=1.0, size=8, seed=0, start=start, start_step=0)
    high = sample(unet, sched, labels, null=2, scale=1.0, size=8, seed=0, start=start, start_step=49)
    again = sample(unet, sched, labels, null=2, scale=1.0, size=8, seed=0, start=start, start_step=0)
    assert torch.equal(low, again)                                       # seeded
    assert (low - start).abs().mean() < 0.05
    assert (high - start).abs().mean() > 10 * (low - start).abs().mean()
