"""ZeroSeg: both losses against naive loops (matching never sees the full image), the multi-scale
views against hand-cropped ones, mIoU / threshold choice / pixel labelling on hand-worked cases,
the canvases and the GroupViT student, and the recipe on the one Trainer (teacher stage, a saved
CLIP directory as the teacher, a saved GroupViT as the student, exact resume, one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.losses.zeroseg import multiscale_global_l1, segment_matching_l1
from kdforge.tasks.dense.metrics import miou
from kdforge.tasks.dense.zeroseg.canvases import make_canvases, num_classes
from kdforge.tasks.dense.zeroseg.student import (
    PooledGrouping,
    StudentSpec,
    ZeroSegStudent,
    build_groupvit,
    build_student,
)
from kdforge.tasks.dense.zeroseg.task import (
    NO_BACKGROUND,
    LossSwitches,
    ZeroSegBatch,
    ZeroSegModule,
    apply_threshold,
    choose_threshold,
    label_pixels,
)
from kdforge.tasks.dense.zeroseg.views import (
    crop_views,
    encode_views,
    grid_boxes,
    local_view_index,
    single_object_cells,
)
from kdforge.tasks.vision_language.data import _RGB, COLOURS, SHAPES, vocabulary
from kdforge.tasks.vision_language.models import ClipModelConfig, TowerSpec, build_clip, encode_images, pixels
from kdforge.tasks.vision_language.tokenizer import build_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/zeroseg.yaml"
STUDENT = ["model.width=16", "model.heads=2", "model.mlp=32", "model.encoder_layers=1", "model.group_layers=[1, 1]",
           "model.group_tokens=[4, 2]", "model.decoder_width=16"]
TINY = ["data.size=32", "data.num_train=8", "data.num_val=4", "data.num_test=4", "train.epochs=1",
        "train.batch_size=4", *STUDENT, "trainer.threads=1", "trainer.progress=false"]
TEACHER = ["teacher.model.vision={layers: 1, width: 16, heads: 2, mlp: 32}",
           "teacher.model.text={layers: 1, width: 16, heads: 2, mlp: 32}", "teacher.model.projection_dim=8",
           "teacher.data.num_train=32", "teacher.data.num_val=4", "teacher.data.num_test=4", "teacher.loop.epochs=1",
           "teacher.loop.batch_size=16"]


def _small_student() -> ZeroSegStudent:
    """A 32 px GroupViT student: 16 patches -> 4 groups -> 3 segments, projected to 8 dims."""
    spec = StudentSpec(width=16, heads=2, mlp=32, encoder_layers=1, group_layers=[1, 1], group_tokens=[4, 3])
    return ZeroSegStudent(build_groupvit(spec, 32), 8)


def _naive_global(z: torch.Tensor, v: torch.Tensor) -> float:
    total = 0.0
    for b in range(z.shape[0]):
        total += sum(float(sum(abs(float(z[b, d]) - float(v[b, j, d])) for d in range(z.shape[1])))
                     for j in range(v.shape[1])) / v.shape[1]
    return total / z.shape[0]


def _naive_matching(g: torch.Tensor, v: torch.Tensor) -> float:
    total = 0.0
    for b in range(g.shape[0]):
        for i in range(g.shape[1]):
            total += min(sum(abs(float(g[b, i, d]) - float(v[b, j, d])) for d in range(g.shape[2]))
                         for j in range(v.shape[1]))
    return total / g.shape[0]


def test_losses_match_naive_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    z, v, g = torch.randn(3, 5, generator=gen), torch.randn(3, 7, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    assert multiscale_global_l1(z, v).item() == pytest.approx(_naive_global(z, v), rel=1e-5)
    assert segment_matching_l1(g, v).item() == pytest.approx(_naive_matching(g, v), rel=1e-5)
    # hand case: one segment at distance 1 and 3 from two views -> 1; the other at 2 and 0 -> 0; sum 1
    g1 = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    v1 = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    assert segment_matching_l1(g1, v1).item() == pytest.approx(1.0)
    assert multiscale_global_l1(torch.tensor([[0.0, 0.0]]), v1).item() == pytest.approx((1 + 10) / 2)
    gg = g.clone().requires_grad_(True)
    segment_matching_l1(gg, v).backward()         # each segment is pulled toward its nearest view only
    nearest = (gg.detach().unsqueeze(2) - v.unsqueeze(1)).abs().sum(-1).argmin(2)
    want = torch.sign(gg.detach() - v[torch.arange(3).unsqueeze(1), nearest]) / 3
    assert torch.allclose(gg.grad, want)
    with pytest.raises(KdforgeError, match="segment_matching_l1"):
        segment_matching_l1(g, v[:, :, :3])


def test_views_equal_hand_cropped_cells() -> None:
    assert grid_boxes(64, [3])[:3] == [(0, 21, 0, 21), (0, 21, 21, 43), (0, 21, 43, 64)]
    boxes = grid_boxes(64, [1, 2, 3, 4])
    assert len(boxes) == 30 and boxes[0] == (0, 64, 0, 64) and boxes[1] == (0, 32, 0, 32)
    assert boxes[-1] == (48, 64, 48, 64)
    assert local_view_index([1, 2, 3, 4]).tolist() == list(range(1, 30))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    views = crop_views(x, [1, 2, 3, 4], 32)
    assert views.shape == (2, 30, 3, 32, 32)
    assert torch.equal(views[:, 1], x[:, :, :32, :32])                       # a 2x2 cell is already 32 px
    cell = x[:, :, 21:43, 43:64]                                              # 3x3 cell (row 1, column 2)
    assert torch.allclose(views[:, 5 + 3 + 2], F.interpolate(cell, size=(32, 32), mode="bilinear",
                                                             align_corners=False))
    full = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(views[:, 0], full)
    clip = _tiny_clip()
    images = (x * 255).round().to(torch.uint8)
    enc = encode_views(clip, images, [1, 2, 3, 4], chunk=1)
    hand = images[:, :, 48:64, 0:16].float() / 255                           # 4x4 cell (row 3, column 0)
    hand = F.interpolate(hand, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = F.normalize(encode_images(clip, pixels((hand * 255).round().to(torch.uint8))), dim=-1)
    assert torch.allclose(enc[:, 1 + 4 + 9 + 12], want, atol=1e-5)
    assert torch.allclose(enc.norm(dim=-1), torch.ones(2, 30))


def test_matching_in_the_module_excludes_the_full_image() -> None:
    torch.manual_seed(0)
    student = _small_student()
    module = ZeroSegModule(student, LossSwitches(rec_weight=0.0, mask_ratio=0.0, global_grids=[1, 2]),
                           [1, 2, 3, 4]).eval()
    assert module.match_index.tolist() == list(range(1, 30)) and module.global_index.tolist() == [0, 1, 2, 3, 4]
    x = torch.randn(2, 3, 32, 32)
    views = F.normalize(torch.randn(2, 30, 8), dim=-1)
    with torch.no_grad():
        views[:, 0] = F.normalize(student(x).segments, dim=-1)[:, 0]          # the full view sits on a segment
    step = module(ZeroSegBatch(x, views, None, torch.arange(2)))
    with torch.no_grad():
        out = student(x)
    g, z = F.normalize(out.segments, dim=-1), F.normalize(out.image, dim=-1)
    assert step.losses["match"].item() == pytest.approx(_naive_matching(g, views[:, 1:]), rel=1e-5)
    assert step.losses["global"].item() == pytest.approx(_naive_global(z, views[:, :5]), rel=1e-5)
    with pytest.raises(KdforgeError, match="full-image view"):
        ZeroSegModule(student, LossSwitches(rec_weight=0.0, match_grids=[1, 2]), [1, 2, 3, 4])


def test_miou_and_threshold_hand_cases() -> None:
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])
    # class 0: inter 2, union 4 -> 0.5; class 1: inter 3, union 4 -> 0.75; class 2: inter 1, union 2 -> 0.5
    assert miou(pred, target, 3) == pytest.approx(100 * (0.5 + 0.75 + 0.5) / 3)
    labels = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])                     # classes 0..C-1 (mask = 1 + class)
    scores = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.9, 0.9, 0.2, 0.2]])
    masks = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0]])
    assert apply_threshold(labels, scores, 0.5).tolist() == [[0, 0, 1, 1], [2, 2, 0, 0]]
    assert apply_threshold(labels, scores, NO_BACKGROUND).tolist() == [[1, 1, 1, 1], [2, 2, 2, 2]]
    theta, value = choose_threshold(labels, scores, masks, 3)
    assert 0.2 < theta <= 0.9 and value == pytest.approx(100.0)


def test_pixels_take_their_segments_label() -> None:
    torch.manual_seed(0)
    student = _small_student().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    labels, scores, owners = label_pixels(student, images, text, torch.device("cpu"))
    out = student(pixels(images))
    a1, a2 = out.assignments                                              # (B, 4, 16), (B, 3, 4)
    owner_of_patch = torch.tensor([[int(a2[b, :, int(a1[b, :, n].argmax())].argmax()) for n in range(16)]
                                   for b in range(2)])                    # patch -> its group -> its segment
    for b in range(2):
        for n in range(16):                                               # the centre pixels of each 8 px patch
            y, x = 8 * (n // 4) + 4, 8 * (n % 4) + 4
            assert int(owners[b, y, x]) == int(owner_of_patch[b, n])
    sims = (F.normalize(out.segments, dim=-1) @ text.T).detach()
    for b in range(2):
        for y, x in ((0, 0), (17, 5), (31, 31)):
            seg = int(owners[b, y, x])
            assert int(labels[b, y, x]) == int(sims[b, seg].argmax())
            assert float(scores[b, y, x]) == pytest.approx(float(sims[b, seg].max()), abs=1e-6)


def test_groupvit_student_starts_with_distinct_group_tokens_and_masks_patches() -> None:
    student = _small_student()
    vm = student.tower.vision_model
    for stage in vm.encoder.stages[1:3]:              # transformers leaves these at zero; GroupViT draws them
        tokens = stage.group_token[0].detach()
        assert 0.005 < float(tokens.std()) < 0.05 and not torch.allclose(tokens[0], tokens[1])
    assert float(vm.embeddings.position_embeddings.detach().std()) > 0.005
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 5, 9, 12], [1, 2, 7, 8, 15]])
    out = student.train()(x, keep)
    assert out.tokens.shape == (2, 5, 16) and out.assignments[0].shape == (2, 4, 5)
    assert out.segments.shape == (2, 3, 8) and out.image.shape == (2, 8)


def test_pooled_grouping_segment_is_the_mean_of_its_tokens() -> None:
    torch.manual_seed(0)
    block = PooledGrouping(width=8, heads=2, mlp=16, layers=1, groups=3, eps=1.0).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        seg, soft = block(x)
        h = block.layers[0](torch.cat([x, block.group_token.expand(2, -1, -1)], 1))
        xs, gs = h[:, :6], h[:, 6:]
        logits = block.q(block.norm_g(gs)) @ block.k(block.norm_x(xs)).transpose(1, 2) * 8 ** -0.5
        values = block.v(block.norm_x(xs))
    assert torch.allclose(soft, logits.softmax(1), atol=1e-6) and torch.allclose(soft.sum(1), torch.ones(2, 6))
    owner = logits.argmax(1)                                   # each token belongs to one group
    for b in range(2):
        for i in range(3):
            mine = [n for n in range(6) if owner[b, n] == i]
            pooled = sum((values[b, n] for n in mine), torch.zeros(8)) / (len(mine) + 1.0)
            want = block.out(pooled)
            want = want + block.mlp(block.norm_out(want))
            assert torch.allclose(seg[b, i], want, atol=1e-5)
    block.train()                                              # straight-through: the logits get gradients
    seg, _ = block(x)
    seg.sum().backward()
    assert block.q.weight.grad is not None and block.q.weight.grad.abs().sum() > 0
    student = build_student(StudentSpec(width=16, heads=2, mlp=32, encoder_layers=1, group_layers=[1, 1],
                                        group_tokens=[4, 3], grouping="pooled"), 32, 8, reconstruct=True).eval()
    assert student.head is not None and student.num_segments == 3
    labels, _, owners = label_pixels(student, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                                     torch.randn(5, 8), torch.device("cpu"))
    assert labels.shape == owners.shape == (2, 32, 32) and int(owners.max()) < 3


def test_canvases_and_single_object_cells() -> None:
    c = make_canvases(6, seed=3)
    again = make_canvases(6, seed=3)
    assert torch.equal(c.images, again.images) and torch.equal(c.masks, again.masks)
    assert num_classes() == 1 + len(COLOURS) * len(SHAPES)
    for i, objects in enumerate(c.objects):
        assert 2 <= len(objects) <= 4 and int(c.instances[i].max()) == len(objects)
        for k, (label, *_rest) in enumerate(objects):
            inside = c.instances[i] == k + 1
            assert (c.masks[i][inside] == label + 1).all()
            mean = c.images[i].float().div(255)[:, inside].mean(1)
            assert (mean - _RGB[label // len(SHAPES)]).abs().max() < 0.1       # painted in its class colour
    assert ((c.masks == 0) == (c.instances == 0)).all()
    inst = torch.zeros(1, 8, 8, dtype=torch.long)
    inst[0, 0:2, 0:2] = 1            # object 1 inside the top-left 2x2 cell
    inst[0, 5:8, 3:6] = 2            # object 2 over the bottom two cells
    masks = torch.where(inst == 1, 4, torch.where(inst == 2, 7, 0))
    s, v, lab = single_object_cells(inst, masks, [2], min_share=0.5, min_pixels=1)
    # top-left holds object 1 only; bottom-left holds 3 of 9 pixels of object 2 (< half), bottom-right 6 of 9
    assert s.tolist() == [0, 0] and v.tolist() == [0, 3] and lab.tolist() == [3, 6]


def _tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    spec = TowerSpec(layers=1, width=16, heads=2, mlp=32)
    return build_clip(ClipModelConfig(vision=spec, text=spec, projection_dim=8), len(vocabulary()), 32).eval()


def _saved_clip(path: Path) -> Path:
    clip = _tiny_clip()
    clip.save_pretrained(str(path))
    build_tokenizer(vocabulary(), 16).save_pretrained(str(path))
    return path


def test_saved_clip_and_groupvit_load(tmp_path: Path) -> None:
    clip_dir = _saved_clip(tmp_path / "clip")
    torch.manual_seed(1)
    tower = build_groupvit(StudentSpec(width=16, heads=2, mlp=32, encoder_layers=1, group_layers=[1, 1],
                                       group_tokens=[4, 2]), 32)
    tower.save_pretrained(str(tmp_path / "groupvit"))
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), *TINY, f"teacher.model.local_dir={clip_dir}",
                 f"model.local_dir={tmp_path / 'groupvit'}", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["teacher_dir"] == str(clip_dir) and not (out / "stages").exists()
    assert 0 <= result["test_miou"] <= 100 and result["teacher_cells"] >= 0
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train_global" in header and "train_match" in header and "train_rec" in header
    assert (out / "predictions.png").stat().st_size > 1000
    from kdforge.methods.zeroseg import class_embeddings, load_teacher

    clip, tok, ctx = load_teacher(clip_dir)
    assert torch.allclose(class_embeddings(clip, tok, ctx), class_embeddings(_tiny_clip(), tok, ctx), atol=1e-6)
    from kdforge.registry import METHODS

    assert "zeroseg" in METHODS


def test_stop_and_resume_is_bit_identical_with_the_teacher_stage(tmp_path: Path) -> None:
    result = assert_resume_exact(RECIPE, [*TINY, *TEACHER, "train.epochs=2"], tmp_path, stop_after=3)
    assert (tmp_path / "full/stages/teacher/model/config.json").is_file()
    assert result["steps"] == 4 and result["teacher_dir"] == "stages/teacher/model"


def test_bad_zeroseg_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for overrides, message in ((["zeroseg.match_grids=[1,2]"], "full-image view is never a matching candidate"),
                              (["zeroseg.grids=[2,3]"], "zeroseg.grids must be distinct grid sizes starting with 1"),
                              (["zeroseg.global_grids=[5]"], "not in zeroseg.grids"),
                              (["zeroseg.mask_ratio=0"], "rec_weight > 0 needs zeroseg.mask_ratio > 0"),
                              (["zeroseg.global_weight=0", "zeroseg.match_weight=0"], "global_weight or match_weight"),
                              (["model.group_tokens=[4]"], "one entry per grouping stage"),
                              ([f"teacher.model.local_dir={tmp_path / 'nothing'}"], "not a saved model directory"),
                              (["zeroseg.matchweight=1"], "matchweight")):
        assert main(["train", str(RECIPE), *TINY, *overrides, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (out / "config.yaml").exists()
