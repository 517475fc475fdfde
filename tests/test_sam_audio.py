"""SAM (vision -> audio dense distillation): the loose triplet loss and the SAM block against hand loops, berHu and
delta < 1.25 on hand-worked cases, the training module's losses, the recipe on the one Trainer (tiny run, exact
resume, teacher reuse) and one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.losses.sam_audio import adjacent_negatives, loose_triplet_feature_kd
from kdforge.registry import METHODS
from kdforge.tasks.dense.audio import AudioDenseNet, SAMBlock, berhu, depth_delta

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/sam_audio.yaml"
TINY = ["data.size=16", "data.num_train=8", "data.num_test=4", "model.width=4", "teacher.model.width=4",
        "train.epochs=1", "train.batch_size=4", "teacher.loop.epochs=1", "teacher.loop.batch_size=4",
        "sam_audio.k=4", "sam_audio.heads=2", "trainer.threads=1"]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _triplet_loop(v: torch.Tensor, a: torch.Tensor, m: float) -> float:
    """The card's formula with plain Python: per sample, per teacher position, a sum over the other audio positions."""
    total = 0.0
    for n in range(v.shape[0]):
        per = 0.0
        for j in range(v.shape[1]):
            sims = [_cos(v[n, j].tolist(), a[n, k].tolist()) for k in range(a.shape[1])]
            best = max(range(len(sims)), key=lambda k: sims[k])
            per += sum(max(0.0, m - sims[best] + sims[k]) for k in range(len(sims)) if k != best)
        total += per / v.shape[1]
    return total / v.shape[0]


def test_loose_triplet_all_negatives_matches_a_loop() -> None:
    v, a = torch.randn(2, 5, 3, generator=_g(1)), torch.randn(2, 7, 3, generator=_g(2))
    assert float(loose_triplet_feature_kd(v, a, 0.3)) == pytest.approx(_triplet_loop(v, a, 0.3), abs=1e-5)
    assert float(loose_triplet_feature_kd(v, a, 1.5)) == pytest.approx(_triplet_loop(v, a, 1.5), abs=1e-5)
    # hand case: one teacher vector, audio = itself (positive), its opposite and an orthogonal vector
    v1 = torch.tensor([[[1.0, 0.0]]])
    a1 = torch.tensor([[[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]]])
    # hinges: max(0, .3 - 1 - 1) = 0 and max(0, .3 - 1 + 0) = 0; with margin 1.2: 0 and 0.2
    assert float(loose_triplet_feature_kd(v1, a1, 0.3)) == pytest.approx(0.0)
    assert float(loose_triplet_feature_kd(v1, a1, 1.2)) == pytest.approx(0.2, abs=1e-6)
    # gradients reach the audio side only (the teacher is detached)
    v2, a2 = v.clone().requires_grad_(), a.clone().requires_grad_()
    loose_triplet_feature_kd(v2, a2, 1.0).backward()
    assert v2.grad is None and a2.grad is not None and a2.grad.abs().sum() > 0


def test_adjacent_negatives_are_grid_neighbours_and_the_loss_uses_them() -> None:
    grid = (3, 4)
    pos = torch.arange(12).repeat(20)
    nb = adjacent_negatives(pos, grid, _g(3))
    for p, q in zip(pos.tolist(), nb.tolist()):
        assert abs(p // 4 - q // 4) + abs(p % 4 - q % 4) == 1, (p, q)       # a 4-neighbour inside the grid
    assert len(set(nb[pos == 5].tolist())) > 1                               # drawn, not fixed
    v, a = torch.randn(1, 2, 3, generator=_g(4)), torch.randn(1, 12, 3, generator=_g(5))
    got = float(loose_triplet_feature_kd(v, a, 0.3, "adjacent", grid, _g(6)))
    sims = F.normalize(v, dim=-1) @ F.normalize(a, dim=-1).transpose(1, 2)
    best = sims.argmax(-1)
    other = adjacent_negatives(best, grid, _g(6))
    hand = sum(max(0.0, 0.3 - float(sims[0, j, best[0, j]]) + float(sims[0, j, other[0, j]])) for j in range(2)) / 2
    assert got == pytest.approx(hand, abs=1e-6)
    with pytest.raises(KdforgeError, match="grid"):
        loose_triplet_feature_kd(v, a, 0.3, "adjacent", (2, 2))
    with pytest.raises(KdforgeError, match="neg must be"):
        loose_triplet_feature_kd(v, a, 0.3, "random")


def test_sam_block_matches_a_hand_computation_and_passes_gradients() -> None:
    torch.manual_seed(0)
    block = SAMBlock(k=3, positions=4, channels=4, heads=2)
    audio = torch.randn(2, 5, 4, generator=_g(7), requires_grad=True)
    p_bar, alpha = block(audio)
    p, W = block.embed.detach(), block.match.weight.detach()
    for n in range(2):
        x = audio.detach()
        wa = [[sum(float(W[c, d]) * float(x[n, j, d]) for d in range(4)) for c in range(4)] for j in range(5)]
        for pos in range(4):
            t = [max(sum(float(p[k, pos, c]) * float(wa[j][c]) for c in range(4)) for j in range(5)) for k in range(3)]
            e = [math.exp(x - max(t)) for x in t]
            w = [x / sum(e) for x in e]
            assert alpha[n, :, pos].tolist() == pytest.approx(w, abs=1e-5)
            p_hat = [sum(w[k] * float(p[k, pos, c]) for k in range(3)) for c in range(4)]
            # attention by hand from the module's projections: 2 heads of 2 channels
            wq, wk, wv = block.attn.in_proj_weight.detach().chunk(3)
            bq, bk, bv = block.attn.in_proj_bias.detach().chunk(3)
            q = wq @ torch.tensor(p_hat) + bq
            keys = audio[n].detach() @ wk.T + bk
            vals = audio[n].detach() @ wv.T + bv
            heads = []
            for h in range(2):
                sl = slice(2 * h, 2 * h + 2)
                att = torch.softmax(keys[:, sl] @ q[sl] / math.sqrt(2), 0)
                heads.append(att @ vals[:, sl])
            out = block.attn.out_proj.weight.detach() @ torch.cat(heads) + block.attn.out_proj.bias.detach()
            assert p_bar[n, pos].tolist() == pytest.approx((out + torch.tensor(p_hat)).tolist(), abs=1e-5)
    # the max over audio positions is non-smooth but still passes gradients to W, the embeddings and the audio
    p_bar.square().sum().backward()
    assert block.match.weight.grad.abs().sum() > 0 and block.embed.grad.abs().sum() > 0
    assert audio.grad.abs().sum() > 0
    # K = 1: the mixture is the single embedding whatever the audio
    one = SAMBlock(k=1, positions=4, channels=4, heads=1)
    scores_free = one(torch.randn(3, 5, 4))[1]
    assert torch.equal(scores_free, torch.ones_like(scores_free))


def test_berhu_and_delta_hand_cases() -> None:
    pred, target = torch.tensor([1.0, 2.0, 5.0, 0.0]), torch.tensor([1.5, 2.0, 1.0, 0.0])
    # errors 0.5, 0, 4 (the last pixel unmeasured); c = 0.8: 0.5, 0, (16 + 0.64) / 1.6
    assert float(berhu(pred, target, target > 0)) == pytest.approx((0.5 + 0 + 16.64 / 1.6) / 3)
    assert float(berhu(pred, pred)) == 0.0
    # ratios 1.5, 1.0, 5.0 on the measured pixels: 1 of 3 under 1.25
    assert depth_delta(pred, target) == pytest.approx(1 / 3)


def test_audio_net_shapes_bridges_and_bad_levels() -> None:
    levels = {3: (8, 4, 4), 4: (16, 2, 2)}
    x = torch.randn(2, 2, 33, 39)
    for bridge in ("resize", "sam"):
        net = AudioDenseNet({"depth": 1, "semseg": 6}, levels, 16, 2, 4, 4, bridge, {3: 2, 4: 8}, 2)
        out, projected, bridged = net.forward_features(x)
        assert out["depth"].shape == (2, 1, 16, 16) and out["semseg"].shape == (2, 6, 16, 16)
        assert projected[4].shape == (2, 16, 5, 5) and bridged[4].shape == (2, 16, 2, 2)
        assert bridged[3].shape == (2, 8, 4, 4)
    assert net.sam["4"].embed.shape == (8, 4, 16) and net.sam["3"].embed.shape == (2, 16, 8)
    with pytest.raises(KdforgeError, match="does not double up"):
        AudioDenseNet({"depth": 1}, {4: (8, 3, 3)}, 16)
    with pytest.raises(KdforgeError, match="needs K"):
        AudioDenseNet({"depth": 1}, {4: (8, 2, 2)}, 16, bridge="sam")


def test_training_module_losses_match_independent_computations() -> None:
    from kdforge.distill.distiller import Batch
    from kdforge.tasks.dense.audio import AudioDenseModule

    torch.manual_seed(1)
    net = AudioDenseNet({"depth": 1}, {4: (8, 2, 2)}, 16, 2, 4, 4, "sam", {4: 3}, 2)
    x, depth = torch.randn(3, 2, 33, 39), torch.rand(3, 16, 16) + 1
    feats = torch.randn(3, 8, 2, 2)
    batch = Batch(images=x, target={"depth": depth}, index=torch.arange(3),
                  teacher_outputs={"teacher": {"enc4": feats}})
    for feature in ("triplet", "mse"):
        module = AudioDenseModule(net, {4: "enc4"}, feature=feature, lam=0.5).eval()
        with torch.no_grad():
            step = module(batch)
            out, projected, _ = net.forward_features(x)
        assert float(step.losses["depth"]) == pytest.approx(float(berhu(out["depth"][:, 0], depth)), rel=1e-5)
        a = projected[4]
        if feature == "mse":
            want = F.mse_loss(F.interpolate(a, size=(2, 2), mode="bilinear", align_corners=False), feats)
        else:
            want = torch.tensor(_triplet_loop(feats.flatten(2).transpose(1, 2), a.flatten(2).transpose(1, 2), 0.3))
        assert float(step.losses[f"{feature}_enc4"]) == pytest.approx(0.5 * float(want), rel=1e-4)
        assert step.groups[f"{feature}_enc4"] == "distill" and step.groups["depth"] == "task"
    # the SAM embeddings are trained and saved with the student
    assert any(k.endswith("sam.4.embed") for k in module.checkpoint_state())


def test_pre_relu_teacher_features_oracle_bridge_and_warmup() -> None:
    from kdforge.distill.distiller import Batch
    from kdforge.tasks.dense.audio import AudioDenseModule, teacher_tap, teacher_targets
    from kdforge.tasks.dense.models import MultiTaskNet

    # pre_relu: the input of the stage's last (in-place) ReLU, kept intact; its ReLU is the post_relu tap
    torch.manual_seed(0)
    teacher = MultiTaskNet({"depth": 1}, "unet", 4, depth=4).eval()
    images = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    _, f = teacher_targets(teacher, images, [teacher_tap(3), teacher_tap(3, "pre_relu")], torch.device("cpu"))
    post, pre = f["enc3"], f["encoder.stages.2.5:input"]
    assert (pre < 0).any() and (post >= 0).all() and torch.equal(pre.clamp_min(0), post)
    # oracle: the decoder reads the given teacher features instead of the audio's
    net = AudioDenseNet({"depth": 1}, {4: (8, 2, 2)}, 16, 2, 4, 4, "oracle").eval()
    x, v = torch.randn(3, 2, 33, 39), torch.randn(3, 8, 2, 2)
    with torch.no_grad():
        a = net(x, {4: v})["depth"]
        b = net(x + 5.0, {4: v})["depth"]          # the audio does not reach the decoder on this bridge
        c = net(x, {4: v + 1.0})["depth"]
    assert torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(KdforgeError, match="bridge oracle needs"):
        net(x)
    # warm-up: no feature loss before warmup_steps, the full one after
    torch.manual_seed(1)
    net = AudioDenseNet({"depth": 1}, {4: (8, 2, 2)}, 16, 2, 4, 4, "sam", {4: 3}, 2)
    module = AudioDenseModule(net, {4: "enc4"}, feature="triplet", lam=0.5, warmup_steps=3).eval()
    losses = []
    for step in (2, 3):
        batch = Batch(images=x, target={"depth": torch.rand(3, 16, 16) + 1}, index=torch.arange(3), step=step,
                      teacher_outputs={"teacher": {"enc4": v}})
        with torch.no_grad():
            losses.append(float(module(batch).losses["triplet_enc4"]))
    assert losses[0] == 0.0 and losses[1] > 0.0


def test_sam_audio_is_registered() -> None:
    import kdforge.methods.sam_audio  # noqa: F401
    from kdforge.methods.catalog import SEED_METHODS

    assert "sam_audio" in SEED_METHODS and "sam_audio" in METHODS


def test_recipe_trains_on_pseudo_gt_reports_and_resumes_exactly(tmp_path: Path) -> None:
    from recipe_checks import assert_resume_exact

    result = assert_resume_exact(RECIPE, [*TINY, "train.epochs=2"], tmp_path, stop_after=3)
    for key in ("test_depth_rmse", "test_depth_absrel", "test_depth_delta1", "teacher_test_depth_rmse",
                "test_mean_map_depth_rmse"):
        assert math.isfinite(result[key]), key
    assert (tmp_path / "full/predictions.png").is_file()
    assert (tmp_path / "full/stages/teacher/result.json").is_file()


def test_shared_teacher_is_reused_and_arms_run(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    assert main(["train", str(RECIPE), *TINY, "teacher_only=true", "--out", str(teacher)]) == 0
    for i, arm in enumerate((["sam_audio.bridge=resize", "sam_audio.feature=none"],
                             ["sam_audio.bridge=resize", "sam_audio.feature=mse", "data.echo={channels: 2}"],
                             ["sam_audio.bridge=oracle", "sam_audio.feature=none",
                              "sam_audio.teacher_features=pre_relu"],
                             ["sam_audio.neg=adjacent", "data.tasks=[depth,semseg]"])):
        assert main(["train", str(RECIPE), *TINY, *arm, f"teacher.run={teacher}", "--out", str(tmp_path / f"a{i}")]) \
            == (0 if i < 3 else 2)      # other echoes do not reach the teacher; another task list is another teacher
    assert (tmp_path / "a2/predictions.png").is_file()
    assert not (tmp_path / "a0/stages").exists()
    assert main(["train", str(RECIPE), *TINY, "data.tasks=[depth,semseg]", "sam_audio.neg=adjacent",
                 "--out", str(tmp_path / "seg")]) == 0


def test_bad_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for override, message in (("sam_audio.bridge=linear", "sam_audio.bridge must be one of"),
                              ("sam_audio.feature=kl", "sam_audio.feature must be one of"),
                              ("sam_audio.layers=[enc5]", "sam_audio.layers must be"),
                              ("sam_audio.layers=[]", "sam_audio.layers must be"),
                              ("sam_audio.neg=random", "sam_audio.neg must be"),
                              ("sam_audio.k=0", "k, k_div, heads must be >= 1"),
                              ("sam_audio.teacher_features=logits", "teacher_features must be one of"),
                              ("sam_audio.warmup_epochs=-1", "warmup_epochs >= 0"),
                              ("data.tasks=[normals]", "unknown task normals"),
                              ("data.echo={scatter: rough}", "scatter must be one of"),
                              ("data.echo={mics: 3}", "unknown field(s) mics"),
                              ("data.size=20", "divisible by the teacher's stride"),
                              ("teacher.run=/nonexistent", "no finished run")):
        assert main(["train", str(RECIPE), *TINY, override, "--out", str(out)]) == 2, override
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
