"""UP-VL: tracking, amodal box fitting, auto-labels (motion vs motion + semantics), the synthetic VL teacher, the
masked feature loss and point sampling against hand computations, the detector's feature-head option, the CLIP
teacher (crop / caption builder, sliding-window dense map against encode_images of the same crop, zero-shot margin
score), the recipe on the one Trainer (tiny run with the distilled stage, exact resume; a tiny clip-teacher run, its
teacher reused and the prep cache keyed by it) and one-line config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recipe_checks import assert_resume_exact

from kdforge.cli import main
from kdforge.methods.upvl import (
    AutoLabelConfig,
    ClipVL,
    CropConfig,
    SyntheticVL,
    auto_label,
    caption_crops,
    feature_loss,
    fit_box,
    gather_point_features,
    recall_flags,
    semantic_score,
    track_clusters,
)
from kdforge.tasks.pointcloud.iou import bev_iou
from kdforge.tasks.pointcloud.models import DetectorConfig, build_detector
from kdforge.tasks.pointcloud.scenes import SceneSpec, semantic_names
from kdforge.tasks.pointcloud.sequences import make_sequence

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/upvl.yaml"
TINY = ["data.num_train=4", "data.num_test=3", "data.max_objects=4", "upvl.sequence.frames=3",
        "model={voxel: 1.0, cell: 1.0, pfn: 4, width: 8, depth: 2, stride: 1, head: 8}", "train.epochs=2",
        "train.batch_size=2", "upvl.vl.cameras=[{yaw: 0.0, fov: 90.0, width: 48, height: 24}]", "upvl.cache=false",
        "trainer.threads=1", "upvl.vl.kind=synthetic", "upvl.autolabel.sem_threshold=0.3"]


def test_track_clusters_follows_constant_velocity_and_skips_distractors() -> None:
    # key-frame clusters: A at (0, 0) moving +1.5 m per frame in x, B parked at (5, 5); frame 2 loses B,
    # a distractor appears 3 m from everything
    c = [torch.tensor([[0.0, 0.0], [5.0, 5.0]]), torch.tensor([[5.1, 5.0], [1.5, 0.1]]),
         torch.tensor([[3.0, 0.0], [10.0, -10.0]]), torch.tensor([[4.4, 0.0], [5.0, 4.9]])]
    match = track_clusters(c, dt=0.1, gate=2.0)
    assert match.tolist() == [[0, 1, 0, 0], [1, 0, -1, 1]]


def test_fit_box_recovers_a_corner_seen_box_and_a_given_heading() -> None:
    yaw, (x, y, l, w) = math.radians(30), (6.0, 4.0, 4.0, 1.6)
    c, s = math.cos(yaw), math.sin(yaw)
    u = torch.linspace(-l / 2, l / 2, 40)
    v = torch.linspace(-w / 2, w / 2, 20)
    # the two faces facing the sensor at the origin (the -u face and the -v face) + a top point for the height
    local = torch.cat([torch.stack([u, torch.full_like(u, -w / 2)], 1),
                       torch.stack([torch.full_like(v, -l / 2), v], 1)])
    world = torch.stack([x + local[:, 0] * c - local[:, 1] * s, y + local[:, 0] * s + local[:, 1] * c], 1)
    pts = torch.cat([world, torch.full((len(world), 1), -1.7)], 1)
    pts[0, 2] = -0.2                                    # the highest return: h = 1.5 above the ground
    box = fit_box(pts, ground_z=-1.7, heading=None, min_size=0.4)
    assert box[:2].tolist() == pytest.approx([x, y], abs=0.1)
    assert box[3:6].tolist() == pytest.approx([l, w, 1.5], abs=0.15)
    assert math.cos(2 * (float(box[6]) - yaw)) > math.cos(math.radians(6))      # heading modulo pi, 3 deg grid
    given = fit_box(pts, -1.7, yaw + math.pi, 0.4)       # a motion heading: only its axis matters for the extent
    assert given[3:5].tolist() == pytest.approx([l, w], abs=0.02)
    thin = fit_box(pts[:40], -1.7, yaw, 0.4)            # one face seen: width clamped at min_size
    assert float(thin[4]) == pytest.approx(0.4)


def test_auto_labels_motion_misses_parked_objects_semantics_recovers_them() -> None:
    spec = SceneSpec(categories=["car"], extent=12.0, min_objects=5, max_objects=6, clutter=2, dropout=0.0)
    seq = make_sequence(spec, 11, 0, frames=5)
    cfg = AutoLabelConfig()
    gt, static = seq.frames[0].boxes, seq.static
    assert static.sum() >= 2 and (~static).sum() >= 2
    boxes, moving = auto_label(seq, -spec.sensor_height, cfg, None)
    assert moving.all() and len(boxes) == int((~static).sum())
    near = bev_iou(boxes, gt).max(0).values            # per GT box, the best auto-label overlap
    assert (near[static] < 0.1).all()                 # motion-only: no parked car is labelled
    assert (near[~static] > 0.7).all()                # moving cars: amodal boxes from the aggregated frames
    # oracle semantics: score 1 on object points, 0 elsewhere (clutter poles stay out) -> parked cars come in
    semantic = torch.where(seq.frames[0].point_track >= 0, 1.0, 0.0)
    boxes2, moving2 = auto_label(seq, -spec.sensor_height, cfg, semantic)
    near2 = bev_iou(boxes2, gt).max(0).values
    assert (near2 > 0.7).all() and len(boxes2) == len(gt) and int((~moving2).sum()) == int(static.sum())
    # unknown semantics (NaN: outside every camera) add nothing
    boxes3, _ = auto_label(seq, -spec.sensor_height, cfg, torch.full_like(semantic, math.nan))
    assert torch.equal(boxes3, boxes)


def test_synthetic_vl_features_text_and_visibility() -> None:
    from kdforge.tasks.pointcloud.cameras import CameraSpec

    spec = SceneSpec(min_objects=6, max_objects=8)
    seq = make_sequence(spec, 2, 0, frames=1)
    vl = SyntheticVL(semantic_names(spec), dim=16, noise=0.5, seed=0)
    feat, visible = vl.point_features(seq.scene(0), [CameraSpec(yaw=0.0, fov=90.0)], spec, key=5)
    pts = seq.frames[0].points
    angle = torch.atan2(pts[:, 1], pts[:, 0]).abs()
    assert not visible[angle > math.radians(46)].any() and visible.any()
    assert (feat[~visible] == 0).all() and torch.allclose(feat[visible].norm(dim=1), torch.ones(int(visible.sum())))
    text = vl.text([vl.prompt(n) for n in semantic_names(spec)])
    right = (feat[visible] @ text.T).argmax(1) == seq.frames[0].point_labels[visible]
    assert right.float().mean() > 0.85                  # noise 0.5, D 16: the class vector dominates
    again, _ = vl.point_features(seq.scene(0), [CameraSpec(yaw=0.0, fov=90.0)], spec, key=5)
    assert torch.equal(feat, again)
    with pytest.raises(Exception, match="knows"):
        vl.text(["a photo of a tree"])


def test_feature_loss_and_point_sampling_match_hand_computations() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    per_scene = []
    for b in range(3):
        vals = [1 - float(pred[i] @ target[i]) / float(pred[i].norm() * target[i].norm())
                for i in range(7) if batch[i] == b and mask[i]]
        per_scene.append(sum(vals) / len(vals) if vals else 0.0)
    assert float(feature_loss(pred, target, mask, batch, 3)) == pytest.approx(sum(per_scene) / 3, abs=1e-6)
    fmap = torch.randn(2, 3, 8, 8, generator=g)        # extent 4 m, 1 m cells: cell (iy, ix) centre at
    pts = torch.tensor([[-3.5, -3.5, 0.0], [0.5, -1.5, 0.0], [2.5, 3.5, 0.0], [-0.5, 0.5, 0.0]])   # x = ix - 3.5
    scene = torch.tensor([0, 0, 1, 1])
    out = gather_point_features(fmap, pts, scene, extent=4.0)
    hand = torch.stack([fmap[0, :, 0, 0], fmap[0, :, 2, 4], fmap[1, :, 7, 6], fmap[1, :, 4, 3]])
    assert torch.allclose(out, hand, atol=1e-6)
    mid = gather_point_features(fmap, torch.tensor([[0.0, 0.5, 0.0]]), torch.tensor([0]), 4.0)   # between x cells 3, 4
    assert torch.allclose(mid[0], (fmap[0, :, 4, 3] + fmap[0, :, 4, 4]) / 2, atol=1e-6)


def test_recall_flags_hand_case() -> None:
    gt = torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], [10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    det = torch.tensor([[0.2, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], [0.0, 0.1, 0.0, 4.0, 2.0, 1.5, 0.0],
                        [12.5, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    # IoU(det0, gt0) = 3.8*2 / (16 - 7.6) = 0.905; det1 would match gt0 too but it is used; det2 vs gt1: 1.5*2/13
    assert recall_flags(det, torch.tensor([0.9, 0.8, 0.7]), gt, 0.5).tolist() == [True, False]
    assert recall_flags(det, torch.tensor([0.9, 0.8, 0.7]), gt, 0.2).tolist() == [True, True]


def test_detector_feature_head_is_optional_and_backwards_compatible() -> None:
    torch.manual_seed(0)
    plain = build_detector(3, 8.0, DetectorConfig(voxel=1.0, pfn=4, width=8, depth=2, head=8))
    torch.manual_seed(0)
    with_feat = build_detector(3, 8.0, DetectorConfig(voxel=1.0, pfn=4, width=8, depth=2, head=8, feature_dim=5))
    extra = set(with_feat.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("feature.") for k in extra)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, with_feat.state_dict()[k])      # same initialisation of everything else
    pts = torch.tensor([[1.0, 2.0, -1.0, 0.5], [-3.0, 1.0, -1.5, 0.2]])
    a, b = plain(pts, torch.tensor([0, 0]), 1), with_feat(pts, torch.tensor([0, 0]), 1)
    assert set(a) == {"neck", "heatmap", "reg"} and b["feature"].shape == (1, 5, 16, 16)
    assert torch.equal(a["heatmap"], b["heatmap"]) and torch.equal(a["reg"], b["reg"])


def test_upvl_recipe_distilled_stage_trains_and_resumes(tmp_path: Path) -> None:
    result = assert_resume_exact(RECIPE, [*TINY, "upvl.semantics=distilled"], tmp_path, stop_after=3)
    assert (tmp_path / "full/stages/features/result.json").is_file()
    assert {"test_static_recall", "test_moving_recall", "test_ap50", "test_ov_acc_out", "autolabel_static_recall",
            "features_autolabel_static_recall", "features_test_static_recall"} <= set(result)
    assert (tmp_path / "full/predictions.png").is_file()
    header = (tmp_path / "full/metrics.csv").read_text().splitlines()[0]
    assert "train_upvl_feat" in header
    from kdforge.registry import METHODS

    assert "upvl" in METHODS


@pytest.mark.parametrize(("override", "message"), [
    ("upvl.labels=semantic", "upvl.labels must be motion or motion_semantic"),
    ("upvl.semantics=lidar", "upvl.semantics must be projected or distilled"),
    ("upvl.vl.kind=blip", "upvl.vl.kind must be synthetic (the card's stand-in) or clip"),
    ("upvl.vl.run=/nowhere", "need upvl.vl.kind=clip"),
    ("upvl.vl.kind=clip|upvl.vl.clip.stride=10", "must divide every camera's width and height"),
    ("upvl.vl.kind=clip|upvl.vl.clip.window=7", "window and stride must be even"),
    ("upvl.vl.kind=clip|upvl.vl.clip.crops.window_sides=[9]", "window_sides [lo, hi]"),
    ("upvl.vl.kind=clip|upvl.vl.run=/nowhere", "no finished CLIP teacher there"),
    ("upvl.vl.cameras=[{yaw: 0.0, zoom: 2.0}]", "unknown field"),
    ("upvl.sequence.frames=2", "frames must be >= upvl.autolabel.min_frames"),
    ("upvl.sequence.speeds={car: [1.0, 2.0]}", "speeds"),
    ("model.feature_dim=7", "model.feature_dim is set by upvl"),
    ("teacher_only=true", "upvl trains no detector teacher"),
])
def test_bad_upvl_recipes_fail_in_one_line(tmp_path: Path, capsys, override: str, message: str) -> None:
    assert main(["train", str(RECIPE), *TINY, *override.split("|"), "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _views(rgb: torch.Tensor, semantic: torch.Tensor, instance: torch.Tensor):
    from kdforge.tasks.pointcloud.cameras import MultiView

    V = rgb.shape[0]
    return MultiView(rgb, torch.ones(semantic.shape), semantic, instance, torch.eye(3).expand(V, 3, 3),
                     torch.eye(4).expand(V, 4, 4))


def test_caption_crops_hand_case() -> None:
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(1, 3, 24, 40, generator=g)
    semantic = torch.zeros(1, 24, 40, dtype=torch.long)             # ground
    semantic[0, :3] = -1                                            # sky rows 0-2
    instance = torch.full((1, 24, 40), -1, dtype=torch.long)
    instance[0, 10:14, 20:28] = 0                                   # a cyclist (category 2): rows 10-13, cols 20-27
    semantic[0, 10:14, 20:28] = 3
    cats = ["car", "pedestrian", "cyclist"]
    crops = CropConfig(size=12, margin=0.5, min_side=4, min_pixels=4, windows=0)
    images, captions, labels, squares = caption_crops(_views(rgb, semantic, instance), cats, crops, g)
    # box 8 x 4 px centred at (col 24, row 12); side 1.5 * 8 = 12 -> the square cols 18-29, rows 6-17
    assert squares.tolist() == [[0, 18, 6, 12]] and captions == ["a photo of a cyclist"] and labels.tolist() == [2]
    assert torch.equal(images[0], (rgb[0, :, 6:18, 18:30] * 255).round().to(torch.uint8))     # no resize at 12 px
    crops.windows, crops.window_sides = 3, [4, 10]
    _, captions, labels, squares = caption_crops(_views(rgb, semantic, instance), cats, crops, g)
    names = {-1: "sky", 0: "road", 3: "cyclist"}
    assert len(captions) == 1 + 3 * 3                               # the object + 3 windows each of sky, road, cyclist
    for (v, x0, y0, side), cap in zip(squares[1:].tolist(), captions[1:], strict=True):
        centre = int(semantic[v, y0 + side // 2, x0 + side // 2])
        assert 4 <= side <= 10 and cap.endswith(names[centre])
    assert sorted(set(labels[1:].tolist())) == [2, 3, 5]            # cyclist, road, sky in crop_classes order


def _tiny_clip(tmp_path: Path) -> Path:
    from kdforge.methods.clip import save_model
    from kdforge.methods.upvl import caption_vocabulary
    from kdforge.tasks.vision_language.models import ClipModelConfig, TowerSpec, build_clip
    from kdforge.tasks.vision_language.tokenizer import build_tokenizer

    torch.manual_seed(0)
    vocab = caption_vocabulary(["car", "pedestrian", "cyclist"])
    cfg = ClipModelConfig(vision=TowerSpec(1, 16, 2, 32), text=TowerSpec(1, 16, 2, 32), patch_size=8, projection_dim=6,
                          context_length=8)
    save_model(build_clip(cfg, len(vocab), 16).eval(), build_tokenizer(vocab, 8), tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_dense_map_window_equals_encode_images_of_its_crop(tmp_path: Path) -> None:
    import torch.nn.functional as F

    from kdforge.tasks.vision_language.models import encode_images, pixels

    vl = ClipVL(_tiny_clip(tmp_path), ["car", "pedestrian", "cyclist"], window=8, stride=4)
    rgb = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(1))
    dense = vl.dense_map(rgb)
    assert dense.shape == (2, 6, 12, 20) and torch.allclose(dense.norm(dim=1), torch.ones(2, 12, 20), atol=1e-5)

    def hand(v: int, row: int, col: int) -> torch.Tensor:     # pixel -> its 4 x 4 block -> the 8 x 8 window around it
        r0, c0 = (row // 4) * 4 + 2 - 4, (col // 4) * 4 + 2 - 4
        rows, cols = (torch.arange(r0, r0 + 8).clamp(0, 11)), (torch.arange(c0, c0 + 8).clamp(0, 19))
        crop = rgb[v][:, rows][:, :, cols][None]
        img = (F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)
        with torch.no_grad():
            return F.normalize(encode_images(vl.clip, pixels(img))[0], dim=0)

    for v, row, col in ((0, 5, 9), (1, 6, 11), (0, 0, 0), (1, 11, 19)):     # interior and (replicated) corners
        assert torch.allclose(dense[v, :, row, col], hand(v, row, col), atol=1e-5)
    assert torch.equal(dense[0, :, 4, 8], dense[0, :, 7, 11])              # one block, one window
    text = vl.text([vl.prompt("car"), vl.prompt("ground"), vl.prompt("clutter")])
    assert text.shape == (3, 6) and vl.prompt("ground") == "a photo of a road"
    f = F.normalize(torch.randn(5, 6), dim=1)
    margin = semantic_score(text[:1], text[1:])(f)
    assert torch.allclose(margin, f @ text[0] - (f @ text[1:].T).max(1).values)


def test_upvl_recipe_with_a_clip_teacher_trains_reuses_and_keys_the_cache(tmp_path: Path, monkeypatch) -> None:
    import json

    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    clip = [o for o in TINY if o not in ("upvl.cache=false", "upvl.vl.kind=synthetic")] + [
        "upvl.vl.kind=clip", "upvl.vl.clip.loop.epochs=1", "upvl.vl.clip.crops.num_val=2",
        "upvl.vl.clip.crops.num_test=2", "upvl.semantics=projected", "upvl.autolabel.sem_threshold=0.0",
        "upvl.vl.clip.model={vision: {layers: 1, width: 16, heads: 2, mlp: 32}, "
        "text: {layers: 1, width: 16, heads: 2, mlp: 32}, patch_size: 8, projection_dim: 6, context_length: 8}"]
    assert main(["train", str(RECIPE), *clip, "--out", str(tmp_path / "a")]) == 0
    result = json.loads((tmp_path / "a/result.json").read_text())
    assert (tmp_path / "a/stages/vl_teacher/model/config.json").is_file()
    assert "vl_teacher_test_zeroshot_top1" in result and "test_static_recall" in result
    assert main(["train", str(RECIPE), *clip, "upvl.vl.teacher_only=true", "upvl.vl.clip.seed=5",
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t/model/config.json").is_file()
    assert main(["train", str(RECIPE), *clip, f"upvl.vl.run={tmp_path / 'a'}", "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b/result.json").read_text())
    assert again["test_static_recall"] == result["test_static_recall"]     # the same teacher, the cached prep
    assert main(["train", str(RECIPE), *clip, f"upvl.vl.run={tmp_path / 't'}", "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "cache").rglob("prep-*.pt"))) == 2        # another teacher: another prep file


CLIP_RESUME = [o for o in TINY if o != "upvl.vl.kind=synthetic"] + [
    "train.epochs=3", "trainer.progress=false", "upvl.vl.kind=clip", "upvl.vl.clip.loop.epochs=2",
    "upvl.vl.clip.loop.batch_size=12", "upvl.vl.clip.crops.num_val=2", "upvl.vl.clip.crops.num_test=2",
    "upvl.semantics=distilled", "upvl.autolabel.sem_threshold=0.0",
    "upvl.vl.clip.model={vision: {layers: 1, width: 16, heads: 2, mlp: 32}, "
    "text: {layers: 1, width: 16, heads: 2, mlp: 32}, patch_size: 8, projection_dim: 6, context_length: 8}"]


@pytest.mark.parametrize(("stop_after", "resumed"), [
    (3, "vl_teacher"),        # the CLIP stage (2 epochs x 2 steps), inside its second epoch
    (4, "vl_teacher"),        # its last step: stopped before result.json and the saved <stage>/model
    (5, "features"),          # the CLIP stage finished (4 < 5); the stage `features` (3 epochs x 2 steps) cut
])
def test_upvl_recipe_with_the_clip_stage_resumes_exactly(tmp_path: Path, capsys, stop_after: int,
                                                         resumed: str) -> None:
    """vl_teacher (CLIP, 4 steps) -> features (6 steps) -> final (6 steps), cut after `stop_after` steps of
    whichever stage reaches it first, resumed: every stage's weights and metrics rows and the result equal the
    uninterrupted run's; the CLIP saved for the later stages (<stage>/model) is the same file too."""
    result = assert_resume_exact(RECIPE, CLIP_RESUME, tmp_path, stop_after=stop_after)
    out = capsys.readouterr().out
    resumes = [line.split("/stages/")[1] for line in out.splitlines() if line.endswith("(resumed)")]
    assert resumes == [f"{resumed} (resumed)"], out        # the cut landed in that stage, and only there
    assert (tmp_path / "full/stages/vl_teacher/metrics.csv").read_text().count("\n") == 3     # header + 2 epochs
    assert (tmp_path / "full/stages/features/metrics.csv").read_text().count("\n") == 4
    model = Path("stages/vl_teacher/model/model.safetensors")
    assert (tmp_path / "full" / model).read_bytes() == (tmp_path / "cut" / model).read_bytes()
    assert "vl_teacher_test_zeroshot_top1" in result and "features_test_static_recall" in result


def test_upvl_recipe_reusing_a_clip_teacher_resumes_exactly(tmp_path: Path, capsys) -> None:
    """A finished CLIP teacher run (`upvl.vl.teacher_only=true`) reused by `upvl.vl.run`: no vl_teacher stage, and
    features (6 steps) -> final (6 steps) cut inside `features` and resumed equals the uninterrupted run."""
    import json

    teacher = tmp_path / "teacher"
    assert main(["train", str(RECIPE), *CLIP_RESUME, "upvl.vl.teacher_only=true", "upvl.vl.clip.loop.epochs=1",
                 "--out", str(teacher)]) == 0
    assert (teacher / "model/model.safetensors").is_file()
    capsys.readouterr()
    reuse = [*CLIP_RESUME, f"upvl.vl.run={teacher}"]
    result = assert_resume_exact(RECIPE, reuse, tmp_path / "r", stop_after=3)
    out = capsys.readouterr().out
    resumes = [line.split("/stages/")[1] for line in out.splitlines() if line.endswith("(resumed)")]
    assert resumes == ["features (resumed)"], out         # the cut landed in `features`, and only there
    assert sorted(p.name for p in (tmp_path / "r/full/stages").iterdir()) == ["features"]
    assert (tmp_path / "r/full/stages/features/metrics.csv").read_text().count("\n") == 4     # header + 3 epochs
    own = json.loads((teacher / "result.json").read_text())                # the reused teacher's scores, reported
    assert result["vl_teacher_test_zeroshot_top1"] == own["test_zeroshot_top1"]
    assert "features_test_static_recall" in result
