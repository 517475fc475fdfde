"""MDCS: prior-shifted diversity loss, confident-instance mask, consistency KD and the ramp against
hand computations; the multi-expert model, the views and the training module's wiring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.config import load_config
from kdforge.distill.distiller import Batch
from kdforge.errors import KdforgeError
from kdforge.methods.mdcs import (
    CIFAR10_POLICY,
    MAGNITUDES,
    MDCS,
    ExpertAverage,
    MultiExpertResNet,
    NormedLinear,
    _colour_op,
    affine_warp,
    apply_op,
    confident_mask,
    consistency_kd,
    cs_ramp,
    cutout,
    diversity_loss,
    mdcs_losses,
    prior_shifted_logits,
    rotation_matrices,
    strong_view,
)
from kdforge.models import create_model
from kdforge.registry import METHODS

# -- pure loss pieces ---------------------------------------------------------------------


def test_prior_shift_by_hand() -> None:
    counts = torch.tensor([1.0, 4.0, 16.0])
    z = torch.zeros(1, 3)
    # softmax(0 + 0.5 log n) is proportional to sqrt(n) = 1, 2, 4
    p = F.softmax(prior_shifted_logits(z, counts, 0.5), dim=1)
    assert torch.allclose(p, torch.tensor([[1 / 7, 2 / 7, 4 / 7]]), atol=1e-6)
    # lam = -0.5 favours the head class 0: proportional to 1, 1/2, 1/4
    p = F.softmax(prior_shifted_logits(z, counts, -0.5), dim=1)
    assert torch.allclose(p, torch.tensor([[4 / 7, 2 / 7, 1 / 7]]), atol=1e-6)


def test_diversity_loss_by_hand() -> None:
    counts = torch.tensor([1.0, 4.0, 16.0])
    logits = torch.zeros(2, 2, 3)           # 2 rows, 2 experts, 3 classes, all-zero logits
    target = torch.tensor([0, 2])
    loss = diversity_loss(logits, target, counts, [0.0, 1.0])
    # expert 0 (lam 0): uniform -> log 3 per row; expert 1 (lam 1): p = n/21 -> log 21 and log(21/16)
    expected = math.log(3) + (math.log(21) + math.log(21 / 16)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(KdforgeError, match="lambdas"):
        diversity_loss(logits, target, counts, [0.0, 1.0, 2.0])


def test_confident_mask_by_hand() -> None:
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.5, 0.4]])
    assert confident_mask(t, torch.tensor([0, 2, 1])).tolist() == [True, False, True]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def test_consistency_kd_by_hand() -> None:
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [10.0, -10.0]], requires_grad=True)
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [-10.0, 10.0]], requires_grad=True)
    mask = torch.tensor([True, True, False])
    loss = consistency_kd(teacher, student, mask)
    # row 0: p = (1/4, 3/4), q = (1/2, 1/2); row 1: p = (1/2, 1/2), q = (3/4, 1/4); row 2 is not selected
    expected = (_kl([0.25, 0.75], [0.5, 0.5]) + _kl([0.5, 0.5], [0.75, 0.25])) / 2   # batchmean over 2 rows
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert teacher.grad is None or float(teacher.grad.abs().sum()) == 0.0   # the weak view is detached
    assert float(student.grad[2].abs().sum()) == 0.0 and float(student.grad[0].abs().sum()) > 0
    # temperature T: KL of the tempered distributions times T^2
    t2 = consistency_kd(teacher, student, mask, temperature=2.0)
    p0, q1 = math.sqrt(3) / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    expected2 = 4 * (_kl([1 - p0, p0], [0.5, 0.5]) + _kl([0.5, 0.5], [q1, 1 - q1])) / 2
    assert t2.item() == pytest.approx(expected2, rel=1e-6)
    empty = consistency_kd(teacher, student, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_cs_ramp() -> None:
    # official: min(epoch / 20, 1) with epochs counted from 1
    assert cs_ramp(0, 20) == pytest.approx(0.05)
    assert cs_ramp(9, 20) == pytest.approx(0.5)
    assert cs_ramp(19, 20) == 1.0 and cs_ramp(50, 20) == 1.0 and cs_ramp(0, 0) == 1.0


def test_mdcs_losses_against_loops() -> None:
    g = torch.Generator().manual_seed(0)
    b, e, c = 3, 3, 4
    logits = (torch.randn(2 * b, e, c, generator=g) * 2).requires_grad_(True)
    target = torch.tensor([0, 3, 1])
    counts = torch.tensor([50.0, 20.0, 5.0, 2.0])
    lams = [-0.5, 1.0, 2.5]
    dl, cs, frac = mdcs_losses(logits, target, counts, lams)
    z = logits.detach().tolist()
    y2 = target.tolist() * 2
    exp_dl = exp_cs = 0.0
    exp_frac = []
    for k, lam in enumerate(lams):
        adj = [[z[i][k][j] + lam * math.log(counts[j].item() + 1e-9) for j in range(c)] for i in range(2 * b)]
        probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in adj]
        exp_dl += sum(-math.log(probs[i][y2[i]]) for i in range(2 * b)) / (2 * b)
        chosen = [i for i in range(b) if max(range(c), key=lambda j: adj[i][j]) == y2[i]]
        exp_frac.append(len(chosen) / b)
        if chosen:
            exp_cs += sum(_kl(probs[i], probs[b + i]) for i in chosen) / len(chosen)
    assert dl.item() == pytest.approx(exp_dl, rel=1e-5)
    assert cs.item() == pytest.approx(exp_cs, rel=1e-5)
    assert frac.tolist() == pytest.approx(exp_frac)
    cs.backward()
    assert float(logits.grad[:b].abs().sum()) == 0.0     # CS gradient reaches the strong rows only
    with pytest.raises(KdforgeError, match="2B rows"):
        mdcs_losses(logits[:5], target, counts, lams)


# -- model ------------------------------------------------------------------------------


def test_normed_linear_by_hand() -> None:
    head = NormedLinear(2, 2, scale=30.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    out = head(torch.tensor([[3.0, 4.0]]))     # cosines 3/5 and 4/5
    assert torch.allclose(out, torch.tensor([[18.0, 24.0]]))


def test_multi_expert_layout() -> None:
    torch.manual_seed(0)
    backbone = create_model("resnet8", num_classes=5)
    net = MultiExpertResNet(backbone, 5, num_experts=3, reduce_dimension=True)
    assert net.layer1 is backbone.layer1 and net.conv1 is backbone.conv1     # shared stem + stage 1
    # private stages at 3/4 width: 32 -> 24, 64 -> 48
    assert net.experts[0][0][0].conv1.out_channels == 24 and net.experts[0][1][0].conv1.out_channels == 48
    assert net.experts[0][0][0].conv1 is not net.experts[1][0][0].conv1
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    out = net(x)
    assert out.shape == (4, 3, 5)
    assert out.abs().max() <= 30.0 + 1e-4                               # cosine heads, s = 30
    assert torch.allclose(ExpertAverage(net)(x), out.mean(dim=1))
    with pytest.raises(KdforgeError, match="CIFAR ResNet"):
        MultiExpertResNet(create_model("mlp", num_classes=5, in_features=12), 5)


# -- views ------------------------------------------------------------------------------


def test_cutout_by_hand() -> None:
    x = torch.ones(2, 1, 6, 6)
    out = cutout(x, torch.tensor([2, 0]), torch.tensor([2, 5]), length=2)
    hole0 = torch.zeros(6, 6, dtype=torch.bool)
    hole0[1:3, 1:3] = True                     # centre (2, 2), side 2 -> rows/cols 1..2
    hole1 = torch.zeros(6, 6, dtype=torch.bool)
    hole1[0:1, 4:6] = True                     # centre (0, 5): rows -1..0, cols 4..5, clipped
    assert torch.equal(out[0, 0] == 0, hole0) and torch.equal(out[1, 0] == 0, hole1)


def test_affine_warp_rotation_and_fill() -> None:
    img = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    rot = affine_warp(img, rotation_matrices(torch.tensor([90.0, 0.0])), fill=-1.0)
    # output (r, c) samples input at (x, y) = (-y_out, x_out): out[r, c] = in[c, W-1-r] = rot90(k=1)
    assert torch.allclose(rot[0], torch.rot90(img[0], 1, dims=(1, 2)), atol=1e-5)
    assert torch.allclose(rot[1], img[1], atol=1e-5)
    big = torch.ones(1, 3, 8, 8)
    out = affine_warp(big, rotation_matrices(torch.tensor([45.0])), fill=torch.tensor([0.1, 0.2, 0.3]))
    # the corner pixel maps outside the image, the centre stays inside
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]), atol=1e-6)
    assert torch.allclose(out[0, :, 3, 3], torch.ones(3), atol=1e-6)


def test_shear_and_translate_follow_pil() -> None:
    img = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 255
    one = torch.ones(1)
    # PIL shearX: output (x, y) reads input (x + m*y, y) in pixels; m = 1 keeps pixel centres exact
    sheared = apply_op("shearX", img, one, one)[0, 0] * 255
    expected = torch.full((4, 4), 128.0)
    for y in range(4):
        for x in range(4 - y):
            expected[y, x] = 4 * y + x + y
    assert torch.allclose(sheared, expected, atol=1e-3)
    # translateX by a quarter of the side: output x reads input x + 1
    moved = apply_op("translateX", img, torch.tensor([0.25]), one)[0, 0] * 255
    assert torch.allclose(moved[:, :3], img[0, 0, :, 1:] * 255, atol=1e-3)
    assert torch.allclose(moved[:, 3], torch.full((4,), 128.0), atol=1e-3)


def test_colour_ops_by_hand() -> None:
    x = torch.tensor([0.2, 0.6, 100 / 255]).view(1, 3, 1, 1)
    plus, minus = torch.tensor([1.0]), torch.tensor([-1.0])
    # solarize at threshold 128: pixels >= 128 are inverted
    solar = _colour_op("solarize", x, torch.tensor([128.0]), plus).flatten()
    assert solar.tolist() == pytest.approx([0.2, 0.4, 100 / 255])
    # posterize to 4 bits: 100 = 0b01100100 -> 0b01100000 = 96
    post = _colour_op("posterize", x, torch.tensor([4.0]), plus).flatten()
    assert post[2].item() == pytest.approx(96 / 255)
    # brightness factor 1 - 0.45 against a black image
    bright = _colour_op("brightness", x, torch.tensor([0.45]), minus).flatten()
    assert bright.tolist() == pytest.approx((x.flatten() * 0.55).tolist())
    # colour factor 0: the grey image 0.299 R + 0.587 G + 0.114 B in every channel
    grey = 0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 100 / 255
    assert _colour_op("color", x, torch.tensor([1.0]), minus).flatten().tolist() == pytest.approx([grey] * 3)
    assert _colour_op("invert", x, plus, plus).flatten().tolist() == pytest.approx((1 - x.flatten()).tolist())


def test_equalize_and_sharpness_by_hand() -> None:
    # one channel, 4 pixels with values 0, 0, 10, 200: histogram h[0] = 2, h[10] = 1, h[200] = 1;
    # step = (4 - h[200]) // 255 = 0 -> PIL leaves the channel unchanged
    small = torch.tensor([0.0, 0.0, 10.0, 200.0]).view(1, 1, 2, 2) / 255
    assert torch.equal(_colour_op("equalize", small, torch.zeros(1), torch.ones(1)), small)
    # 600 pixels: 300 at 0, 200 at 7, 100 at 9. step = (600 - 100) // 255 = 1; lut[i] = pixels below i:
    # lut[0] = 0, lut[7] = 300 and lut[9] = 500, both clipped to 255
    vals = torch.cat([torch.zeros(300), torch.full((200,), 7.0), torch.full((100,), 9.0)]).view(1, 1, 20, 30)
    out = _colour_op("equalize", vals / 255, torch.zeros(1), torch.ones(1)) * 255
    assert torch.allclose(out, torch.where(vals == 0, 0.0, 255.0))
    # sharpness factor 0 = PIL SMOOTH: interior (5 * centre + 8 neighbours) / 13, border kept
    img = torch.zeros(1, 1, 3, 3)
    img[0, 0, 1, 1] = 13 / 255
    smooth = _colour_op("sharpness", img, torch.tensor([1.0]), torch.tensor([-1.0]))
    assert smooth[0, 0, 1, 1].item() == pytest.approx(5 / 255) and smooth[0, 0, 0, 0].item() == 0.0


def test_autoaugment_policy_table() -> None:
    # the 25 CIFAR-10 sub-policies, magnitudes on the paper's 10-level grid
    assert len(CIFAR10_POLICY) == 25 and CIFAR10_POLICY[0] == (0.1, "invert", 7, 0.2, "contrast", 6)
    assert MAGNITUDES["posterize"] == [8.0, 8.0, 7.0, 7.0, 6.0, 6.0, 5.0, 5.0, 4.0, 4.0]
    assert MAGNITUDES["solarize"][0] == 256 and MAGNITUDES["solarize"][9] == 0
    assert MAGNITUDES["translateX"][9] == pytest.approx(150 / 331)


def test_strong_view_deterministic_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
    idx = torch.arange(100, 108)
    a = strong_view(images, idx, epoch=2, seed=1, padding=2)
    sub = torch.tensor([5, 2])
    b = strong_view(images[sub], idx[sub], epoch=2, seed=1, padding=2)
    assert torch.equal(a[sub], b)               # a view depends on (seed, epoch, index) only
    assert not torch.equal(a, strong_view(images, idx, epoch=3, seed=1, padding=2))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == (8, 3, 16, 16)
    # Cutout of side 8 zeroes at least a 4 x 4 corner of each view
    assert bool(((a == 0).all(dim=1).flatten(1).sum(dim=1) >= 16).all())


# -- training module ---------------------------------------------------------------------


def _config(**method_args: object) -> object:
    args = "{" + ", ".join(f"{k}: {v}" for k, v in method_args.items()) + "}"
    return load_config(None, [
        "data.name=procedural_cifar_lt",
        "data.args={imbalance_factor: 10, num_train: 120, num_test: 40, num_classes: 4, num_superclasses: 4, "
        "image_size: 8, cache: false}",
        "data.batch_size=16", "data.augment.crop_padding=1", "student.name=resnet8", "method.name=mdcs",
        f"method.args={args}", "trainer.epochs=1", "trainer.tensorboard=false", "trainer.progress=false",
        "trainer.device=cpu", "optim.lr=0.05", "schedule.name=constant"])


def _module(cfg: object) -> tuple[MDCS, object]:
    from kdforge.train.build import build_distiller, load_data

    data = load_data(cfg.data, 0)
    torch.manual_seed(0)
    module = build_distiller(cfg, data)
    module.setup(torch.zeros(2, 3, 8, 8), len(data.train))
    return module, data


def test_module_losses_match_pure_functions() -> None:
    assert METHODS.get("mdcs") is MDCS
    module, data = _module(_config(cs_ramp_epochs=4))
    # IF 10 from 30 per class: 30, 30 * 10^(-1/3) = 13.9, 30 * 10^(-2/3) = 6.46, 3
    assert module.class_counts.tolist() == [30.0, 13.0, 6.0, 3.0]
    idx = torch.arange(16)
    images = (data.train.images[idx].float() / 255 - 0.5) / 0.25
    batch = Batch(images=images, target=data.train.labels[idx], index=idx, epoch=1)
    module.eval()   # BN in eval mode so two forwards agree
    step = module(batch)
    logits = module.student(module.views(batch))
    dl, cs, _ = mdcs_losses(logits, batch.target, module.class_counts, [-0.5, 1.0, 2.5])
    assert step.losses["diversity"].item() == pytest.approx(dl.item(), rel=1e-5)
    assert step.losses["consistency"].item() == pytest.approx(0.6 * 0.5 * cs.item(), rel=1e-5, abs=1e-7)
    assert step.groups == {"diversity": "task", "consistency": "distill"}
    assert torch.allclose(step.outputs, logits[:16].mean(dim=1), atol=1e-5)
    assert torch.allclose(module.eval_model()(images), module.student(images).mean(dim=1), atol=1e-5)
    keys = module.checkpoint_state()
    assert "class_counts" in keys and not any("train_images" in k for k in keys)


def test_plain_baseline_is_sum_of_expert_ce() -> None:
    module, data = _module(_config(lambdas="[0.0, 0.0, 0.0]", cs_weight=0.0, two_views="false"))
    idx = torch.arange(8)
    images = (data.train.images[idx].float() / 255 - 0.5) / 0.25
    batch = Batch(images=images, target=data.train.labels[idx], index=idx, epoch=0)
    module.eval()
    step = module(batch)
    assert set(step.losses) == {"diversity"}
    logits = module.student(module.views(batch))
    assert logits.shape[0] == 8
    expected = sum(F.cross_entropy(logits[:, k], batch.target).item() for k in range(3))
    assert step.losses["diversity"].item() == pytest.approx(expected, rel=1e-5)


def test_module_errors() -> None:
    with pytest.raises(KdforgeError, match="one per expert"):
        _module(_config(lambdas="[1.0, 2.0]"))
    with pytest.raises(KdforgeError, match="two_views"):
        _module(_config(two_views="false"))


def test_trainer_run_evaluates_expert_average(tmp_path: Path) -> None:
    from kdforge.train.trainer import Trainer

    cfg = _config(cs_ramp_epochs=1)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    result = trainer.fit()
    test = trainer.data.test
    x = (test.images.float() / 255 - torch.tensor(test.mean).view(1, 3, 1, 1)) / torch.tensor(test.std).view(1, 3, 1, 1)
    net = trainer.distiller.student.eval()
    with torch.no_grad():
        pred = net(x).mean(dim=1).argmax(dim=1)
    assert result["test_top1"] == pytest.approx(100.0 * float((pred == test.labels).float().mean()))


def test_shipped_config_matches_the_card() -> None:
    import inspect

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "methods" / "mdcs.yaml")
    args = cfg.method.args
    accepted = set(inspect.signature(MDCS.build_module).parameters) | set(inspect.signature(MDCS).parameters)
    assert set(args) <= accepted
    assert args["lambdas"] == [-0.5, 1.0, 2.5] and args["cs_weight"] == 0.6 and args["temperature"] == 1.0
    assert cfg.data.name == "procedural_cifar_lt" and cfg.data.args["imbalance_factor"] == 100
    assert (cfg.optim.lr, cfg.optim.nesterov, cfg.schedule.milestones) == (0.1, True, [200, 320, 380])
