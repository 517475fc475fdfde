"""GiftNet: the relation distillation against plain-math loops, the global guided transform and L_rec against
hand computations, the real-image branch inside a training step, the harmonization task end to end (resume,
iHarmony4 folders, picture) and the recipe's one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.losses import relation_distill_loss
from kdforge.losses.giftnet import level_mask, relation_gap
from kdforge.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/giftnet.yaml"
TINY = ["data.size=16", "data.num_train=8", "data.num_test=4", "model.width=2", "train.epochs=2",
        "train.batch_size=4", "giftnet.layers=[enc2, enc3]", "giftnet.transform_layers=[enc2, enc3]",
        "trainer.threads=1"]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-12)


def _loop_relation(feat: torch.Tensor, fg: list[bool]) -> list[list[float]]:
    """Plain-python fg x bg cosine matrix of one (C, h, w) feature map (no pooling: h w <= pool^2)."""
    vecs = [feat[:, p // feat.shape[2], p % feat.shape[2]].tolist() for p in range(feat.shape[1] * feat.shape[2])]
    fgs = [p for p, f in enumerate(fg) if f]
    bgs = [p for p, f in enumerate(fg) if not f]
    return [[_cos(vecs[i], vecs[j]) for j in bgs] for i in fgs]


def _loop_loss(s: torch.Tensor, t: torch.Tensor, masks: list[list[bool]], distance: str, tau: float) -> float:
    per_image = []
    for b, fg in enumerate(masks):
        if all(fg) or not any(fg):
            continue                                   # no background / no foreground: skipped
        rs, rt = _loop_relation(s[b], fg), _loop_relation(t[b], fg)
        if distance == "l1":
            vals = [abs(x - y) for rows in zip(rs, rt) for x, y in zip(*rows)]
            per_image.append(sum(vals) / len(vals))
        else:
            rows = []
            for a, c in zip(rs, rt):
                zs = sum(math.exp(x / tau) for x in a)
                zt = sum(math.exp(y / tau) for y in c)
                rows.append(sum(math.exp(y / tau) / zt * (y / tau - math.log(zt) - x / tau + math.log(zs))
                                for x, y in zip(a, c)))
            per_image.append(sum(rows) / len(rows))
    return sum(per_image) / len(per_image)


def _masks() -> torch.Tensor:
    m = torch.zeros(4, 1, 8, 8)
    m[0, :, 2:6, 2:5] = 1              # at 4 x 4: 2x2-cell means > 0.5 where >= 3 of 4 pixels are inside
    m[1, :, 0:3, 0:8] = 1
    m[2, :, 0, 0] = 1                  # no level-2 foreground position: skipped
    m[3] = 1                           # no background: skipped
    return m


def test_level_mask_is_avgpool_over_half() -> None:
    fg = level_mask(_masks(), (4, 4))
    want0 = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]    # rows 2-5, cols 2-4: only col-block 1 full
    assert fg[0].view(4, 4).int().tolist() == want0
    assert fg[1].view(4, 4).int().tolist() == [[1] * 4, [0] * 4, [0] * 4, [0] * 4]   # row block 1 is half: > 0.5 fails
    assert not fg[2].any() and fg[3].all()


@pytest.mark.parametrize("distance", ["l1", "kl"])
def test_relation_loss_matches_a_plain_math_loop(distance: str) -> None:
    s, t = torch.randn(4, 5, 4, 4, generator=_g(1)), torch.randn(4, 5, 4, 4, generator=_g(2))
    masks = _masks()
    fg = level_mask(masks, (4, 4)).tolist()
    want = _loop_loss(s, t, fg, distance, 0.5)
    got = relation_distill_loss([s], [t], masks, distance, tau=0.5)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # two levels add; sampling more positions than exist is the full computation (the per-image path)
    assert float(relation_distill_loss([s, s], [t, t], masks, distance, 0.5)) == pytest.approx(2 * want, rel=1e-5)
    sampled = relation_distill_loss([s], [t], masks, distance, 0.5, sample=100, generator=_g(3))
    assert float(sampled) == pytest.approx(want, rel=1e-5)
    assert float(relation_distill_loss([t], [t], masks, distance, 0.5)) == pytest.approx(0.0, abs=1e-5)


def test_relation_loss_pools_samples_detaches_and_guards() -> None:
    s = torch.randn(2, 3, 8, 8, generator=_g(4), requires_grad=True)
    t = torch.randn(2, 3, 8, 8, generator=_g(5), requires_grad=True)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, :4] = 1
    pooled = torch.nn.functional.avg_pool2d
    want = _loop_loss(pooled(s, 2).detach(), pooled(t, 2).detach(), level_mask(m, (4, 4)).tolist(), "l1", 1.0)
    loss = relation_distill_loss([s], [t], m, pool=4)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None     # no gradient to the teacher
    a = relation_distill_loss([s], [t], m, sample=3, generator=_g(6))
    b = relation_distill_loss([s], [t], m, sample=3, generator=_g(6))
    assert a.item() == b.item() != pytest.approx(loss.item(), rel=1e-3)          # seeded subset, not all pairs
    empty = torch.zeros(2, 1, 8, 8)
    z = relation_distill_loss([s], [t], empty)
    assert z.item() == 0.0 and z.requires_grad                                    # no usable image: 0, graph kept
    for kwargs, message in (({"distance": "l2"}, "distance must be"), ({"tau": 0}, "tau must be")):
        with pytest.raises(KdforgeError, match=message):
            relation_distill_loss([s], [t], m, **kwargs)
    with pytest.raises(KdforgeError, match="mask for 2 images"):
        relation_distill_loss([s], [t], m[:1])
    gap = relation_gap([s.detach()], [t.detach()], m, pool=4)
    assert gap[0][1] == 2 and gap[0][0] / 2 == pytest.approx(want, rel=1e-5)


def test_global_guided_transform_by_hand() -> None:
    from kdforge.tasks.dense.harmonize import GlobalGuidedTransform

    x = torch.randn(2, 3, 4, 4, generator=_g(7))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :4] = 1                               # at 4 x 4: the top-left 2 x 2 cells, area 1
    mask[1, :, 4, 4] = 1                                 # one pixel: a cell of area 1/4
    gft = GlobalGuidedTransform(3, "both")
    assert torch.equal(gft(x, mask), x)                 # zero-initialised: the identity
    torch.nn.init.normal_(gft.mlp[2].weight, generator=_g(8))
    torch.nn.init.normal_(gft.mlp[2].bias, generator=_g(9))
    with torch.no_grad():
        out = gft(x, mask)
    for b in range(2):
        m = [[0.0] * 4 for _ in range(4)]
        for i in range(8):
            for j in range(8):
                m[i // 2][j // 2] += float(mask[b, 0, i, j]) / 4
        w_bg = sum(1 - m[i][j] for i in range(4) for j in range(4))
        w_fg = sum(m[i][j] for i in range(4) for j in range(4))
        g_bg = [sum(float(x[b, c, i, j]) * (1 - m[i][j]) for i in range(4) for j in range(4)) / w_bg for c in range(3)]
        g_fg = [sum(float(x[b, c, i, j]) * m[i][j] for i in range(4) for j in range(4)) / w_fg for c in range(3)]
        with torch.no_grad():
            p = gft.mlp(torch.tensor([g_bg + g_fg]))[0].tolist()
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    v = float(x[b, c, i, j])
                    want = m[i][j] * ((1 + p[c]) * v + p[3 + c]) + (1 - m[i][j]) * v
                    assert float(out[b, c, i, j]) == pytest.approx(want, abs=1e-5)
    with pytest.raises(KdforgeError, match="guidance must be"):
        GlobalGuidedTransform(3, "global")


def test_fn_mse_by_hand() -> None:
    from kdforge.tasks.dense.harmonize import fn_mse

    pred, target = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    pred[0, :, 0, 0] = 2.0                           # sum of squares 12
    pred[1, 1, 3, 3] = 1.0                           # sum 1
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2, :2] = 1                           # area 4
    mask[1, :, 0, 0] = 1                             # area 1 < min area 0.125 * 16 = 2
    assert float(fn_mse(pred, target, mask, 0.125)) == pytest.approx((12 / (3 * 4) + 1 / (3 * 2)) / 2)


def _tiny_data(n: int = 6, seed: int = 1):
    from kdforge.tasks.dense.composites import procedural_composites

    return procedural_composites(n, seed=seed, size=16)


def test_step_relation_term_uses_the_real_image_branch_without_touching_bn_statistics() -> None:
    from kdforge.tasks.dense.harmonize import HarmonizationModule, HarmonizationNet, HarmonizationTask, fn_mse

    data = _tiny_data()
    torch.manual_seed(0)
    net = HarmonizationNet(2, 3, ["enc2"], "background")
    module = HarmonizationModule(net, lambda_rd=0.7, layers=["enc2", "enc3"], min_area=0.01)
    task = HarmonizationTask(module, data, data, 4, flip=False)
    task.build(torch.device("cpu"), None)
    batch = task.batch(0, 0, type("Env", (), {"enabled": False})())
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    module.train()
    step = module(batch)
    # independent: the student branch alone in a copy, the real branch with batch statistics in another
    import copy

    a, b = copy.deepcopy(net), copy.deepcopy(net)
    a.load_state_dict(reference)
    b.load_state_dict(reference)
    pred, fc = a.train().run(batch.composite, batch.mask)
    for mod in b.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = 0.0                       # batch statistics, running ones unchanged
    with torch.no_grad():
        _, fr = b.train().run(batch.real, batch.mask)
    want_rd = relation_distill_loss([fc[1], fc[2]], [fr[1], fr[2]], batch.mask)
    got = {k: v.item() for k, v in step.losses.items()}
    assert got["rec"] == pytest.approx(fn_mse(pred, batch.real, batch.mask, 0.01).item(), rel=1e-5)
    assert got["relation"] == pytest.approx(0.7 * want_rd.item(), rel=1e-4)
    assert step.groups == {"rec": "task", "relation": "distill"} and got["relation"] > 0
    # running statistics moved exactly as one student forward moves them (the real branch left them alone)
    for k, v in a.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    step.total().backward()
    assert net.transforms["enc2"].mlp[2].weight.grad.abs().sum() > 0
    # the untrained network returns the composite; outside the mask it always does
    with torch.no_grad():
        out = net.eval()(batch.composite, batch.mask)
    torch.testing.assert_close(out, batch.composite)
    net.head.body[2].bias.data.fill_(0.3)
    with torch.no_grad():
        out = net(batch.composite, batch.mask)
    assert torch.equal(out[batch.mask.expand_as(out) == 0], batch.composite[batch.mask.expand_as(out) == 0])


def test_split_metrics_bin_by_foreground_ratio() -> None:
    from kdforge.tasks.dense.composites import HarmonizationData
    from kdforge.tasks.dense.harmonize import harmony_split_metrics

    real = torch.zeros(3, 3, 10, 10, dtype=torch.uint8)
    mask = torch.zeros(3, 1, 10, 10, dtype=torch.uint8)
    mask[0, :, 0, :3] = 1            # 3 %
    mask[1, :, 0, :10] = 1           # 10 %
    mask[2, :, :5, :] = 1            # 50 %
    pred = torch.zeros(3, 3, 10, 10)
    pred[0] += 2.0                   # fMSE 4
    pred[1] += 3.0                   # 9
    pred[2] += 4.0                   # 16
    out = harmony_split_metrics(pred, HarmonizationData(real, real, mask))
    assert (out["fmse_fg0_5"], out["fmse_fg5_15"], out["fmse_fg15_100"]) == (4.0, 9.0, 16.0)
    assert out["fmse"] == pytest.approx(29 / 3) and out["n_fg5_15"] == 1.0
    assert out["mse"] == pytest.approx(29 / 3)


def test_giftnet_is_registered() -> None:
    import kdforge.methods.giftnet  # noqa: F401
    from kdforge.methods.catalog import SEED_METHODS

    assert "giftnet" in SEED_METHODS and "giftnet" in METHODS


def test_recipe_runs_resumes_exactly_and_draws(tmp_path: Path) -> None:
    from recipe_checks import assert_resume_exact

    result = assert_resume_exact(RECIPE, TINY, tmp_path, stop_after=3)
    for key in ("test_fmse", "test_mse", "test_psnr", "test_relation_gap", "test_input_fmse", "test_fmse_fg5_15",
                "test_fmse_vs_input"):
        assert key in result
    assert result["steps"] == 4 and (tmp_path / "full/predictions.png").stat().st_size > 1000
    assert result["test_input_fmse"] > 0 and math.isfinite(result["test_fmse"])


def _iharmony(root: Path, n: int = 6, size: int = 16) -> None:
    for sub in ("composite_images", "masks", "real_images"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(n):
        real = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[2:8, 3:9 + k % 3] = 255
        comp = real.copy()
        comp[mask > 0] = (comp[mask > 0] * 0.6).astype(np.uint8)
        Image.fromarray(real).save(root / "real_images" / f"i{k}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"i{k}_1.png")
        Image.fromarray(comp).save(root / "composite_images" / f"i{k}_1_1.jpg", quality=95)
        names.append(f"composite_images/i{k}_1_1.jpg")
    (root / f"{root.name}_train.txt").write_text("\n".join(names[:4]) + "\n")
    (root / f"{root.name}_test.txt").write_text("\n".join(names[4:]) + "\n")


def test_iharmony4_folder_from_the_recipe(tmp_path: Path) -> None:
    root = tmp_path / "HFlickr"
    _iharmony(root)
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), *TINY, "data.format=iharmony4", f"data.root={root}", "data.num_train=0",
                 "data.num_test=0", "data.num_val=1", "train.epochs=1", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["train_images"] == 3 and result["test_images"] == 2 and "val_fmse" in result


def test_bad_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    broken = tmp_path / "HCOCO"
    broken.mkdir()
    for override, message in (("data.format=folder", "data.format must be procedural or iharmony4"),
                              ("data.format=iharmony4", "needs data.root"),
                              (f"data.format=iharmony4 data.root={broken}", "composite_images not found"),
                              ("giftnet.layers=[enc5]", "giftnet level 'enc5'"),
                              ("giftnet.transform_layers=[dec]", "giftnet level 'dec'"),
                              ("giftnet.guidance=global", "guidance must be one of"),
                              ("giftnet.distance=l2", "distance must be one of"),
                              ("giftnet.lambda_rd=-1", "lambda_rd >= 0"),
                              ("data.size=20", "divisible by 8"),
                              ("giftnet.transform_layers=[]", "needs giftnet.transform_layers"),
                              ("data.illuminant=-1", "data.illuminant and data.bias must be >= 0"),
                              ("data.strength=0", "needs data.illuminant > 0"),
                              ("data.bias=0.1", "needs data.illuminant > 0")):
        assert main(["train", str(RECIPE), *TINY, *override.split(), "--out", str(out)]) == 2, override
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()


def test_recipe_illuminant_reaches_the_composites() -> None:
    from kdforge.methods.giftnet import GiftNetRecipe, HarmonyDataConfig, _data
    from kdforge.tasks.dense.composites import procedural_composites

    data = HarmonyDataConfig(size=16, num_train=3, num_test=2, seed=4, illuminant=0.7, strength=0.2, bias=0.05)
    train, test, val = _data(GiftNetRecipe(data=data))
    assert val is None and train.illuminants.shape == (3, 2, 3) and test.illuminants.shape == (2, 2, 3)
    hand = procedural_composites(2, 4 * 3 + 1, 16, 1, 4, 0.2, 0.01, noise=0.02, illuminant=0.7, bias=0.05)
    assert torch.equal(test.composite, hand.composite) and torch.equal(test.real, hand.real)
    plain, _, _ = _data(GiftNetRecipe(data=HarmonyDataConfig(size=16, num_train=3, num_test=2, seed=4)))
    assert plain.illuminants is None
