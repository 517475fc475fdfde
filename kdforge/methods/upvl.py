"""UP-VL (Najibi et al., ICCV 2023): unsupervised 3D perception with 2D vision-language distillation.

No 3D human label is used. Two kinds of auto-supervision come from multi-modal sequences (card p11):

    VL targets   f_2D(p) = VLM_dense(image)[proj(p)], L2-normalised, only for LiDAR points a camera sees
                 (`cameras.point_pixels`: z-buffer visibility in the rendered views)
    motion       per frame, non-ground points (z > ground + ground_clear) are clustered (DBSCAN, eps) and
                 the key frame's clusters are tracked through the sequence (Hungarian association of
                 centroids, constant-velocity prediction, gate); a track's velocity is the least-squares
                 slope of its centroids; |v| > v_min and |v| > motion_snr * its standard error (sparse far
                 clusters jitter) over >= min_frames frames -> a moving object
    semantics    s(cluster) = mean_{p in cluster, p has a VL feature} s(p) over the key frame's points, with
                 s(p) = cos(f(p), e_generic), e_generic = the normalised mean of the category prompts' text
                 embeddings (a generic "traffic participant" prompt ensemble; synthetic teacher) or the
                 zero-shot margin against background prompts (clip teacher, below); s > sem_threshold with
                 >= min_visible such points -> an object, parked or not
    auto-labels  (a) `labels: motion`: moving tracks only (the paper's baseline, MI-UP-like);
                 (b) `labels: motion_semantic`: moving or semantic tracks (UP-VL)
    amodal box   a moving track's points of every frame moved back by -v * t * dt into the key frame
                 (temporal aggregation: the faces seen change as it moves), heading = its motion
                 direction; a parked object's key-frame points (the sensor is static here, so more frames
                 show the same faces), heading = the minimum-area rectangle's long axis (3 deg grid); z from
                 the ground to the highest point; sides at least min_size
    student      LiDAR-only pillar BEV detector (pointcloud/models.py), one class-agnostic heatmap + box
                 head, plus a feature head h: the detector's feature branch (models.py `feature_dim` = the
                 head width, per BEV cell) sampled bilinearly at each point, concatenated with the point's
                 height and intensity and mapped by a point MLP (Linear-ReLU-Linear) to the VL dimension, so
                 ground and object points of one pillar can differ (a per-cell embedding alone learned the
                 ground's vector: ov accuracy at chance on the development draw):
                 L = L_det(auto-labels) + feature_weight * L_feat,
                 L_feat = mean over scenes of mean_{p visible} (1 - cos(h(p), f_2D(p)))   (masked, not zeros)
    inference    s_q(p) = cos(h(p), e_text(q)); label(box) = argmax_q mean_{p in box} s_q(p)

`semantics: projected` scores clusters with the camera features only (inside the camera field of
view); `semantics: distilled` (the card's "distilled or projected") first trains the arm-(a) model
(motion labels + feature head) as the stage `features`, then scores every key-frame point with
the projected feature where a camera sees it and the distilled h(p) elsewhere, so parked objects
outside the cameras' view can be labelled too.

The 2D vision-language teacher (`upvl.vl.kind`):

* `clip` (the recipe's): kdforge's own small CLIP (`method: clip`'s InfoNCE training, `run_clip`)
  trained as the stage `vl_teacher` (or reused: `upvl.vl.run`, a finished run's `<run>/model`;
  `upvl.vl.teacher_only` trains only it) on image-caption pairs cut from the rendered camera views
  of the TRAINING sequences' key frames (`caption_crops`): a square around every visible object's
  instance-map bounding box (context margin) captioned "a photo of a <category>", plus random
  windows captioned by their centre pixel's class ("a photo of a road / pole", "a photo of the
  sky"), resized to the CLIP's 32 px input. The captions come from the renderer's semantic map, the
  analogue of CLIP's web captions; the 3D student never sees a label. Zero-shot accuracy is
  measured on crops of extra held-out scenes (never the 3D test split). Dense features: every
  stride x stride pixel block of a view gets the (normalised) image embedding of the window x
  window square centred on it (a sliding window, not MaskCLIP's patch tokens); prompts are
  embedded by the same CLIP's text tower. Its cosines are offset (every crop is fairly close to
  every category prompt), so the semantic score is the zero-shot margin
  s(p) = max_q cos(f(p), e_q) - max_b cos(f(p), e_b) over the category prompts q and the
  background prompts b (road, pole), sem_threshold on its cluster mean (set on the development draw).
* `synthetic` (the card's stand-in): a fixed random unit "text" vector e_c per semantic class
  (ground, each category, clutter; dim D, seeded), and the dense "camera VLM" returns
  normalise(e_c + noise * n / sqrt(D)) for the class c the rendered view shows at the point's pixel
  (`cameras.render_views` semantic map, so occlusion and rim errors of the projection are real);
  the text tower is that table; semantic score cos(f, e_generic) as above.

Evaluation on test sequences' key frames (GT boxes, never used in training; nothing selected on
them): `static_recall` (main: the fraction of parked objects matched one-to-one by a detection
with score >= recall_score at BEV IoU >= iou), `moving_recall`, `ap50` (class-agnostic BEV AP at
IoU iou, KITTI R40), `ov_acc_out` / `ov_acc_in` (open-vocabulary accuracy of the GT objects with
no / some camera-visible point: argmax over the category prompts of the mean cosine of h over the
object's points; `ov_acc_out` is the card's "outside the field of view"). `autolabel_*`: recall
(static / moving) and precision of the auto-labels on the training key frames.

Deviations (the paper's scale is Waymo; the card marks flow, clustering, thresholds and lambda
as unrecovered): flow is replaced by cluster-centroid tracking; the sensor does not move (no ego
motion), so parked objects are never seen from new sides; the student trains on the key frame
(frame 0) of each sequence only; one generic prompt ensemble selects semantic seeds and the
per-category prompts evaluate (the card's circularity warning: the ensemble is built from the
evaluation prompts); tracks are not kept beyond the key frame (no tracking metric); the
`distilled` recipe trains two models (the stage `features`, then the final one), twice the
training compute of the motion-only baseline (plus the CLIP teacher, shared by every arm). The
run-independent data (VL targets, test visibility, the motion and projected auto-labels) is cached
on disk (`upvl.cache`), keyed by its parameters and the VL teacher's weights hash.

Recipe (`configs/methods/upvl.yaml`): the pointcloud `BEVRecipe` (data, model, train, eval, seed) plus
`upvl: {labels, semantics, feature_weight, recall_score, iou, cache, sequence, vl, autolabel}`,
`vl: {kind, dim, noise, seed, cameras, clip: {model, loop, seed, crops, window, stride}, run, teacher_only}`
(`semantics` only matters with `labels: motion_semantic`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.clip import clip_loop
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.pointcloud.autolabel import AutoLabelConfig, auto_label, fit_box, track_clusters
from kdforge.tasks.pointcloud.models import BEVDetector, DetectorConfig, build_detector, centerpoint_loss
from kdforge.tasks.pointcloud.scenes import Scene, SceneSpec, semantic_names
from kdforge.tasks.pointcloud.sequences import MotionSpec, Sequence, make_sequence
from kdforge.tasks.pointcloud.task import BEVBatch, BEVDetectionTask, BEVDetectorModule, BEVRecipe
from kdforge.tasks.vision_language.models import ClipModelConfig, TowerSpec
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["AutoLabelConfig", "ClipTeacherConfig", "ClipVL", "CropConfig", "SequenceConfig", "SyntheticVL", "UPVLArgs",
           "UPVLModule", "UPVLRecipe", "UPVLTask", "VLConfig", "auto_label", "caption", "caption_crops", "crop_classes",
           "crop_pairs", "crop_views", "fit_box", "gather_point_features", "recall_flags", "run_upvl", "track_clusters"]


# ------------------------------------------------------------------------------------- recipe


@dataclass
class SequenceConfig:
    frames: int = 6
    dt: float = 0.2
    static_fraction: float = 0.5
    speeds: dict[str, list[float]] = field(default_factory=lambda: {"car": [4.0, 8.0], "cyclist": [2.0, 4.0],
                                                                    "pedestrian": [1.0, 2.0]})

    def motion(self) -> MotionSpec:
        return MotionSpec(self.static_fraction, self.dt, {k: list(v) for k, v in self.speeds.items()})


def _front_rig() -> list[dict[str, Any]]:
    return [{"yaw": -30.0, "fov": 65.0}, {"yaw": 30.0, "fov": 65.0}]      # about 125 deg to the front


def _clip_model() -> ClipModelConfig:
    return ClipModelConfig(vision=TowerSpec(layers=2, width=64, heads=2, mlp=128),
                           text=TowerSpec(layers=2, width=64, heads=2, mlp=128),
                           patch_size=8, projection_dim=32, context_length=8)


@dataclass
class CropConfig:
    """The CLIP's image-caption pairs cut from the rendered views (see `caption_crops`)."""

    size: int = 32                       # the CLIP's image size (crops are resized to it)
    margin: float = 0.5                  # object crops: side = (1 + margin) * the instance box's longer side
    min_side: int = 8                    # smallest crop side (pixels of the view)
    min_pixels: int = 4                  # an instance needs this many visible pixels to be cropped
    windows: int = 2                     # random windows per class present in a view (centre pixel's class)
    window_sides: list[int] = field(default_factory=lambda: [8, 24])     # their side range (pixels)
    num_val: int = 20                    # held-out scenes (indices after the train and test sequences)
    num_test: int = 40


@dataclass
class ClipTeacherConfig:
    model: ClipModelConfig = field(default_factory=_clip_model)
    loop: LoopConfig = field(default_factory=lambda: clip_loop(12))
    seed: int = 100
    crops: CropConfig = field(default_factory=CropConfig)
    window: int = 12                     # dense map: a window of this side around every stride x stride block
    stride: int = 4


@dataclass
class VLConfig:
    kind: str = "synthetic"              # synthetic (the card's stand-in) | clip (kdforge's CLIP on rendered crops)
    dim: int = 16                        # synthetic only (clip: the CLIP's projection_dim)
    noise: float = 1.0                   # synthetic: per-point noise norm relative to the unit class vector
    seed: int = 0
    cameras: list[dict[str, Any]] = field(default_factory=_front_rig)     # cameras.CameraSpec fields each
    clip: ClipTeacherConfig = field(default_factory=ClipTeacherConfig)
    run: str | None = None               # clip: a finished teacher (its run dir: <run>/model) instead of training one
    teacher_only: bool = False           # clip: train (only) the CLIP teacher into the run directory


@dataclass
class UPVLArgs:
    labels: str = "motion_semantic"      # motion (baseline) | motion_semantic (UP-VL)
    semantics: str = "distilled"         # distilled (stage `features` first) | projected
    feature_weight: float = 1.0          # lambda of L_feat
    recall_score: float = 0.3            # detections at least this confident count for recall
    iou: float = 0.5                     # BEV IoU of a match (recall, AP)
    cache: bool = True                   # keep the run-independent data (VL targets, auto-labels) on disk
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    vl: VLConfig = field(default_factory=VLConfig)
    autolabel: AutoLabelConfig = field(default_factory=AutoLabelConfig)


def _model() -> DetectorConfig:
    return DetectorConfig(voxel=0.5, cell=1.0, pfn=16, width=32, depth=3, stride=2, head=32)


@dataclass
class UPVLRecipe(BEVRecipe):
    method: str = "upvl"
    model: DetectorConfig = field(default_factory=_model)
    upvl: UPVLArgs = field(default_factory=UPVLArgs)


def check_args(cfg: UPVLRecipe, source: str) -> None:
    a = cfg.upvl
    if cfg.teacher_only or cfg.teacher.run:
        raise ConfigError(f"{source}: upvl trains no detector teacher (teacher_only / teacher.run are not used)")
    if a.labels not in ("motion", "motion_semantic"):
        raise ConfigError(f"{source}: upvl.labels must be motion or motion_semantic, got {a.labels!r}")
    if a.semantics not in ("projected", "distilled"):
        raise ConfigError(f"{source}: upvl.semantics must be projected or distilled, got {a.semantics!r}")
    if a.labels == "motion_semantic" and a.semantics == "distilled" and a.feature_weight <= 0:
        raise ConfigError(f"{source}: upvl.semantics=distilled needs feature_weight > 0 (the distilled features)")
    if a.feature_weight < 0 or not 0 <= a.recall_score < 1 or not 0 < a.iou <= 1:
        raise ConfigError(f"{source}: need upvl.feature_weight >= 0, 0 <= upvl.recall_score < 1, 0 < upvl.iou <= 1")
    if a.vl.kind not in ("synthetic", "clip"):
        raise ConfigError(f"{source}: upvl.vl.kind must be synthetic (the card's stand-in) or clip, got {a.vl.kind!r}")
    if a.vl.kind != "clip" and (a.vl.run or a.vl.teacher_only):
        raise ConfigError(f"{source}: upvl.vl.run / upvl.vl.teacher_only need upvl.vl.kind=clip")
    if a.vl.run and a.vl.teacher_only:
        raise ConfigError(f"{source}: upvl.vl.teacher_only=true with upvl.vl.run: there is no teacher to train")
    if a.vl.kind == "clip":
        c = a.vl.clip
        lo, hi = (c.crops.window_sides + [0, 0])[:2]
        if len(c.crops.window_sides) != 2 or not 2 <= lo <= hi or c.crops.margin < 0 or c.crops.min_side < 2 \
                or c.crops.min_pixels < 1 or c.crops.windows < 0 or min(c.crops.num_val, c.crops.num_test) < 1:
            raise ConfigError(f"{source}: upvl.vl.clip.crops needs window_sides [lo, hi] with 2 <= lo <= hi, "
                              "margin >= 0, min_side >= 2, min_pixels >= 1, windows >= 0, num_val and num_test >= 1")
        if c.window < 2 or c.window % 2 or c.stride < 2 or c.stride % 2:
            raise ConfigError(f"{source}: upvl.vl.clip.window and stride must be even and >= 2, got {c.window}, "
                              f"{c.stride}")
        if any(int(cam.get("width", 96)) % c.stride or int(cam.get("height", 48)) % c.stride for cam in a.vl.cameras):
            raise ConfigError(f"{source}: upvl.vl.clip.stride {c.stride} must divide every camera's width and height")
        if not c.model.local_dir:
            c.model.check(f"{source}: upvl.vl.clip.model")
        c.loop.check(f"{source}: upvl.vl.clip.loop")
    if a.vl.dim < 2 or a.vl.noise < 0 or not a.vl.cameras:
        raise ConfigError(f"{source}: need upvl.vl.dim >= 2, upvl.vl.noise >= 0 and at least one upvl.vl.cameras")
    al = a.autolabel
    if a.sequence.frames < al.min_frames:
        raise ConfigError(f"{source}: upvl.sequence.frames must be >= upvl.autolabel.min_frames ({al.min_frames})")
    if min(al.eps, al.gate, al.v_min, al.min_size) <= 0 or al.motion_snr < 0 or al.min_points < 1 \
            or al.min_frames < 3 or al.min_visible < 1:
        raise ConfigError(f"{source}: upvl.autolabel needs eps, gate, v_min, min_size > 0, motion_snr >= 0, "
                          "min_points >= 1, min_frames >= 3, min_visible >= 1")
    if cfg.model.feature_dim != 0:
        raise ConfigError(f"{source}: model.feature_dim is set by upvl (the head width); got {cfg.model.feature_dim}")
    if cfg.data.format != "procedural":
        raise ConfigError(f"{source}: upvl needs procedural sequences (data.format procedural)")
    try:
        a.sequence.motion().check(list(cfg.data.categories))
        from kdforge.tasks.pointcloud.cameras import rig_from_spec

        rig_from_spec(SceneSpec(cameras=a.vl.cameras))
    except KdforgeError as exc:
        raise ConfigError(f"{source}: upvl: {exc}") from None


# ------------------------------------------------------------------------------------- the VL teacher


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


class SyntheticVL:
    """The card's stand-in for a dense 2D VLM and its text tower (see the module docstring)."""

    def __init__(self, class_names: list[str], dim: int, noise: float, seed: int) -> None:
        self.names, self.dim, self.noise, self.seed = list(class_names), dim, noise, seed
        g = torch.Generator().manual_seed(seed * 1_000_003 + 4099)
        self.table = _unit(torch.randn(len(self.names), dim, generator=g))

    @staticmethod
    def prompt(name: str) -> str:
        return f"a photo of a {name}"

    def text(self, prompts: list[str]) -> Tensor:
        """(Q, D) unit text embeddings of prompts 'a photo of a <class>'."""
        rows = []
        for p in prompts:
            name = p.removeprefix("a photo of a ").strip()
            if name not in self.names:
                raise KdforgeError(f"synthetic VL text tower knows {self.names}, not {p!r}")
            rows.append(self.table[self.names.index(name)])
        return torch.stack(rows)

    def dense(self, views: Any, view: Tensor, uv: Tensor, visible: Tensor, key: int) -> Tensor:
        """(N, D) unit features at the points' pixels (zeros where no camera sees the point)."""
        sem = views.semantic[view, uv[:, 1], uv[:, 0]]
        seen = visible & (sem >= 0)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 8191 * 7 + key)
        noise = torch.randn(len(sem), self.dim, generator=g) * (self.noise / math.sqrt(self.dim))
        feat = _unit(self.table[sem.clamp(min=0)] + noise)
        return torch.where(seen[:, None], feat, torch.zeros_like(feat))

    def point_features(self, scene: Scene, cams: list, spec: SceneSpec, key: int) -> tuple[Tensor, Tensor]:
        """(features (N, D), visible (N,)) of the scene's points: render, z-buffer project, read the dense map."""
        from kdforge.tasks.pointcloud.cameras import point_pixels, render_views

        views = render_views(scene, cams, spec, seed=key)
        view, uv, visible = point_pixels(scene.points, views)
        feat = self.dense(views, view, uv, visible, key)
        return feat, feat.abs().sum(1) > 0


# ------------------------------------------------------------------------------------- the CLIP teacher

_CAPTION_WORD = {"ground": "road", "clutter": "pole"}


def crop_classes(categories: list[str]) -> list[str]:
    """The CLIP's caption classes: the categories, then road (ground), pole (clutter) and sky."""
    return [*categories, "road", "pole", "sky"]


def caption(word: str) -> str:
    return "a photo of the sky" if word == "sky" else f"a photo of a {word}"


def caption_vocabulary(categories: list[str]) -> list[str]:
    return ["<pad>", "<unk>", "<bos>", "<eos>", "a", "photo", "of", "the", *crop_classes(categories)]


def crop_views(rgb: Tensor, x0: Tensor, y0: Tensor, side: int, size: int) -> Tensor:
    """(N, 3, size, size) uint8 crops [y0, y0 + side) x [x0, x0 + side) of one view `rgb` (3, H, W) in [0, 1]
    (edge pixels replicated outside the image), bilinearly resized (antialiased) to `size`."""
    pad = side
    padded = F.pad(rgb[None], (pad, pad, pad, pad), mode="replicate")[0]
    rows = (y0.long() + pad)[:, None] + torch.arange(side)
    cols = (x0.long() + pad)[:, None] + torch.arange(side)
    crops = padded[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)      # (N, 3, side, side)
    return _to_uint8(crops, size)


def _to_uint8(crops: Tensor, size: int) -> Tensor:
    if crops.shape[-1] != size:
        crops = F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=crops.shape[-1] > size)
    return (crops.clamp(0, 1) * 255).round().to(torch.uint8)


def caption_crops(views: Any, categories: list[str], crops: CropConfig, g: torch.Generator
                  ) -> tuple[Tensor, list[str], Tensor, Tensor]:
    """Image-caption pairs of one scene's rendered views: (uint8 images (N, 3, S, S), captions, class index into
    `crop_classes`, crop squares (N, 4) as (view, x0, y0, side)).

    Objects: every instance with >= min_pixels visible pixels, a square around its bounding box in the
    instance map (side (1 + margin) * the longer box side, at least min_side), captioned "a photo of a
    <category>". Context: per view and per class present (road, pole, sky, each category), `windows`
    random squares (side uniform in window_sides) centred on a random pixel of that class, captioned by
    the centre pixel's class (the way the dense map assigns a window to its centre). The captions come
    from the renderer's semantic map: the analogue of CLIP's web captions; the 3D student never sees them."""
    k = len(categories)
    rows: list[tuple[int, int, int, int, int]] = []        # view, x0, y0, side, class
    V, H, W = views.semantic.shape
    lo, hi = crops.window_sides
    for v in range(V):
        inst, sem = views.instance[v], views.semantic[v]
        for m in torch.unique(inst[inst >= 0]).tolist():
            ys, xs = torch.nonzero(inst == m, as_tuple=True)
            if len(ys) < crops.min_pixels:
                continue
            x_lo, x_hi, y_lo, y_hi = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
            side = max(crops.min_side, math.ceil((1 + crops.margin) * max(x_hi - x_lo, y_hi - y_lo)))
            cls = int(sem[ys[0], xs[0]]) - 1
            rows.append((v, round((x_lo + x_hi - side) / 2), round((y_lo + y_hi - side) / 2), side, cls))
        # context windows: the class of the centre pixel (semantic: 0 ground, 1..k categories, k+1 clutter, -1 sky)
        cls_map = torch.where(sem == 0, k, torch.where(sem == k + 1, k + 1, torch.where(sem < 0, k + 2, sem - 1)))
        for c in range(k + 3):
            ys, xs = torch.nonzero(cls_map == c, as_tuple=True)
            for _ in range(crops.windows if len(ys) else 0):
                j = int(torch.randint(len(ys), (1,), generator=g))
                side = int(torch.randint(lo, hi + 1, (1,), generator=g))
                rows.append((v, int(xs[j]) - side // 2, int(ys[j]) - side // 2, side, c))
    names = crop_classes(categories)
    images = [crop_views(views.rgb[v], torch.tensor([x0]), torch.tensor([y0]), side, crops.size)
              for v, x0, y0, side, _ in rows]
    out = torch.cat(images) if images else torch.zeros(0, 3, crops.size, crops.size, dtype=torch.uint8)
    return (out, [caption(names[r[4]]) for r in rows], torch.tensor([r[4] for r in rows], dtype=torch.long),
            torch.tensor([r[:4] for r in rows], dtype=torch.long).reshape(-1, 4))


def crop_pairs(scenes: list[Scene], cams: list, spec: SceneSpec, keys: list[int], crops: CropConfig, seed: int) -> Any:
    """`PairData` of the crops of every scene's rendered views (rendered with seed `keys[i]`, as the VL targets)."""
    from kdforge.tasks.pointcloud.cameras import render_views
    from kdforge.tasks.vision_language.data import PairData

    g = torch.Generator().manual_seed(seed)
    images, captions, labels = [], [], []
    for scene, key in zip(scenes, keys, strict=True):
        im, cap, lab, _ = caption_crops(render_views(scene, cams, spec, seed=key), list(spec.categories), crops, g)
        images.append(im)
        captions += cap
        labels.append(lab)
    return PairData(torch.cat(images), captions, torch.cat(labels))


class ClipVL:
    """kdforge's CLIP (trained on the rendered crops, frozen) as the dense 2D VLM and its text tower.

    Dense map: every stride x stride block of a view gets the image embedding of the window x window
    square centred on the block (edge pixels replicated), resized to the CLIP's input; text embeddings
    of the prompts come from the same CLIP's text tower. Both L2-normalised."""

    def __init__(self, model_dir: str | Path, categories: list[str], window: int, stride: int,
                 context_length: int = 8) -> None:
        from kdforge.methods.zeroseg import load_teacher

        self.clip, self.tokenizer, self.context = load_teacher(model_dir, context_length)
        self.categories, self.window, self.stride = list(categories), window, stride
        self.size = int(self.clip.config.vision_config.image_size)
        self.dim = int(self.clip.config.projection_dim)

    @staticmethod
    def prompt(name: str) -> str:
        return caption(_CAPTION_WORD.get(name, name))

    @torch.no_grad()
    def text(self, prompts: list[str]) -> Tensor:
        from kdforge.tasks.vision_language.models import encode_texts
        from kdforge.tasks.vision_language.tokenizer import encode

        ids, mask = encode(self.tokenizer, prompts, self.context)
        return _unit(encode_texts(self.clip, ids, mask).float())

    @torch.no_grad()
    def dense_map(self, rgb: Tensor, chunk: int = 512) -> Tensor:
        """(V, D, H, W) unit features of views `rgb` (V, 3, H, W): each stride block gets its window's embedding."""
        from kdforge.tasks.vision_language.models import encode_images, pixels

        V, _, H, W = rgb.shape
        s, w = self.stride, self.window
        ys, xs = torch.meshgrid(torch.arange(0, H, s), torch.arange(0, W, s), indexing="ij")
        x0, y0 = (xs + s // 2 - w // 2).flatten(), (ys + s // 2 - w // 2).flatten()
        out = []
        for v in range(V):
            crops = crop_views(rgb[v], x0, y0, w, self.size)
            emb = torch.cat([encode_images(self.clip, pixels(crops[i:i + chunk])) for i in range(0, len(crops), chunk)])
            grid = _unit(emb.float()).T.reshape(self.dim, *ys.shape)
            out.append(grid.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, :H, :W])
        return torch.stack(out)

    def point_features(self, scene: Scene, cams: list, spec: SceneSpec, key: int) -> tuple[Tensor, Tensor]:
        """(features (N, D), visible (N,)) of the scene's points: render, z-buffer project, read the dense map."""
        from kdforge.tasks.pointcloud.cameras import point_pixels, render_views

        views = render_views(scene, cams, spec, seed=key)
        view, uv, visible = point_pixels(scene.points, views)
        dense = self.dense_map(views.rgb)
        feat = dense[view, :, uv[:, 1], uv[:, 0]]
        return torch.where(visible[:, None], feat, torch.zeros_like(feat)), visible


def semantic_score(objects: Tensor, background: Tensor | None = None) -> Any:
    """The per-point object score of unit VL features f (N, D): with only the category prompts' embeddings
    `objects` (Q, D), cos(f, e_generic), e_generic = normalise(mean of them) (synthetic teacher); with
    `background` prompts (road, pole) too, the zero-shot margin max_q cos(f, e_q) - max_b cos(f, e_b) (clip)."""
    if background is None:
        generic = _unit(objects.mean(0))
        return lambda f: f @ generic
    return lambda f: (f @ objects.T).max(1).values - (f @ background.T).max(1).values


def _weights_hash(model_dir: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------- auto-labelling


# ------------------------------------------------------------------------------------- module, task


def gather_point_features(fmap: Tensor, points: Tensor, batch: Tensor, extent: float) -> Tensor:
    """(P, D) bilinear samples of per-scene BEV maps (B, D, G, G) (rows y, columns x) at the points' (x, y)."""
    out = fmap.new_zeros(len(points), fmap.shape[1])
    grid = (points[:, :2] / extent).to(fmap.dtype)
    for b in range(fmap.shape[0]):
        sel = batch == b
        if bool(sel.any()):
            g = grid[sel][None, None]
            out[sel] = F.grid_sample(fmap[b:b + 1], g, align_corners=False, padding_mode="border")[0, :, 0].T
    return out


def feature_loss(pred: Tensor, target: Tensor, mask: Tensor, batch: Tensor, scenes: int) -> Tensor:
    """mean over scenes of mean_{p in scene, mask} (1 - cos(pred, target)); scenes without a target add 0."""
    per = 1 - F.cosine_similarity(pred, target, dim=1)
    m = mask.to(per.dtype)
    num = torch.zeros(scenes, dtype=per.dtype, device=per.device).index_add(0, batch, per * m)
    den = torch.zeros(scenes, dtype=per.dtype, device=per.device).index_add(0, batch, m)
    return (num / den.clamp_min(1)).mean()


class UPVLModule(BEVDetectorModule):
    """Class-agnostic detector on auto-labels + the point feature head and the masked VL distillation term."""

    def __init__(self, student: BEVDetector, targets: list[Tensor], masks: list[Tensor], weight: float,
                 dim: int) -> None:
        super().__init__(student)
        self.targets, self.masks, self.weight = targets, masks, weight
        hidden = student.feature_dim
        self.point_head = nn.Sequential(nn.Linear(hidden + 2, hidden), nn.ReLU(), nn.Linear(hidden, dim)) \
            if hidden > 0 else None

    def point_embeddings(self, out: dict[str, Tensor], points: Tensor, batch: Tensor) -> Tensor:
        """(P, D) h(p): the BEV feature branch sampled at the points + their height and intensity -> point MLP."""
        cell = gather_point_features(out["feature"], points, batch, self.student.extent)
        return self.point_head(torch.cat([cell, points[:, 2:4]], 1))

    def forward(self, batch: BEVBatch) -> Step:
        out = self.student(batch.points, batch.batch, batch.size)
        losses = centerpoint_loss(out, batch.heat, batch.reg, batch.mask)
        groups = {k: "task" for k in losses}
        if self.weight > 0:
            idx = batch.index.tolist()
            d = batch.points.device
            tgt = torch.cat([self.targets[i] for i in idx]).to(d)
            mask = torch.cat([self.masks[i] for i in idx]).to(d)
            pred = self.point_embeddings(out, batch.points, batch.batch)
            losses["upvl_feat"] = self.weight * feature_loss(pred, tgt, mask, batch.batch, batch.size)
            groups["upvl_feat"] = "distill"
        return Step(outputs=out["heatmap"].detach(), losses=losses, groups=groups)


def recall_flags(boxes: Tensor, scores: Tensor, gt: Tensor, threshold: float) -> Tensor:
    """(M,) bool: GT boxes matched one-to-one by detections (greedy in score order, BEV IoU >= threshold)."""
    from kdforge.tasks.pointcloud.iou import bev_iou
    from kdforge.tasks.pointcloud.metrics import greedy_match

    return greedy_match(boxes, scores, gt, threshold, bev_iou)[1]


@dataclass
class TestTruth:
    static: list[Tensor]          # per scene (M,) bool
    categories: list[Tensor]      # per scene (M,) long
    point_track: list[Tensor]     # per scene (N,) long, -1 not an object point
    seen: list[Tensor]            # per scene (M,) bool: some point of the object is visible to a camera


class UPVLTask(BEVDetectionTask):
    name = "pointcloud_upvl"

    def __init__(self, module: UPVLModule, train: list[Scene], test: list[Scene], truth: TestTruth, text: Tensor,
                 extent: float, batch_size: int, seed: int, args: UPVLArgs, eval_cfg: Any = None,
                 extra_result: dict[str, Any] | None = None, cameras: list | None = None) -> None:
        super().__init__(module, train, test, ["object"], extent, batch_size, seed, eval_cfg, extra_result)
        self.truth, self.text, self.args, self.cameras = truth, text, args, list(cameras or [])

    def evaluate(self, module: Any, split: str, env: Any, autocast: Any = None) -> dict[str, float]:
        from kdforge.tasks.pointcloud.metrics import detection_ap

        data = self.split(split)
        model = module.eval_model()
        dets = self.predictions(model, data)
        a = self.args
        out = {"ap50": detection_ap(dets, [(b, torch.zeros(len(b), dtype=torch.long)) for b in data.boxes],
                                    ["object"], a.iou, "bev")["mean"]}
        if split != "test":
            return out
        hits = [recall_flags(b[s >= a.recall_score], s[s >= a.recall_score], gt, a.iou)
                for (b, s, _), gt in zip(dets, data.boxes, strict=True)]
        hit, static = torch.cat(hits), torch.cat(self.truth.static)
        out["static_recall"] = 100.0 * float(hit[static].double().mean()) if static.any() else 0.0
        out["moving_recall"] = 100.0 * float(hit[~static].double().mean()) if (~static).any() else 0.0
        if getattr(module, "point_head", None) is not None:
            right_in, n_in, right_out, n_out = self._open_vocab(module, data)
            out["ov_acc_in"] = 100.0 * right_in / max(1, n_in)
            out["ov_acc_out"] = 100.0 * right_out / max(1, n_out)
            out["ov_objects_out"] = float(n_out)
        return out

    def _open_vocab(self, module: Any, data: Any) -> tuple[int, int, int, int]:
        right_in = n_in = right_out = n_out = 0
        for start in range(0, len(data), 32):
            idx = list(range(start, min(start + 32, len(data))))
            out = self.outputs(module.eval_model(), data, idx)
            points, batch = data.inputs(idx)
            with torch.no_grad():
                feats = _unit(module.point_embeddings(out, points.to(self.device), batch.to(self.device))).cpu()
            offset = 0
            for i in idx:
                n = len(data.points[i])
                f, track = feats[offset:offset + n], self.truth.point_track[i]
                offset += n
                for m in range(len(self.truth.categories[i])):
                    sel = track == m
                    if not bool(sel.any()):
                        continue
                    score = (f[sel] @ self.text.T).mean(0)
                    right = int(int(score.argmax()) == int(self.truth.categories[i][m]))
                    if bool(self.truth.seen[i][m]):
                        right_in, n_in = right_in + right, n_in + 1
                    else:
                        right_out, n_out = right_out + right, n_out + 1
        return right_in, n_in, right_out, n_out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "task": self.name, "labels": self.args.labels,
                "semantics": self.args.semantics}

    def draw(self, module: Any, path: Path) -> bool:
        """BEV of six test key frames: points, parked GT (blue), moving GT (green), detections >= recall_score (red),
        the cameras' field of view (dashed)."""
        from kdforge.plotting import pyplot, save_png
        from kdforge.tasks.pointcloud.iou import bev_corners
        from kdforge.tasks.pointcloud.models import decode

        pick = list(range(min(6, len(self.test))))
        dets = decode(self.outputs(module.eval_model(), self.test, pick), self.extent, self.cell,
                      self.eval_cfg.top_k, self.eval_cfg.score_threshold)
        plt = pyplot()
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.2), squeeze=False)
        e = self.extent
        for ax, i, (boxes, scores, _) in zip(axes.flat, pick, dets, strict=False):
            pts, sem = self.test.points[i], self.test.scenes[i].point_labels
            ax.scatter(pts[sem <= 0, 0], pts[sem <= 0, 1], s=0.3, c="0.75", linewidths=0)
            ax.scatter(pts[sem > 0, 0], pts[sem > 0, 1], s=0.8, c="0.1", linewidths=0)
            for corner, st in zip(bev_corners(self.test.boxes[i]), self.truth.static[i].tolist(), strict=True):
                ax.fill(corner[:, 0], corner[:, 1], fill=False, ec="tab:blue" if st else "tab:green", lw=1.3)
            keep = scores >= self.args.recall_score
            for corner in bev_corners(boxes[keep]):
                ax.fill(corner[:, 0], corner[:, 1], fill=False, ec="tab:red", lw=0.9)
            for cam in self.cameras:
                for side in (-1, 1):
                    a = math.radians(cam.yaw + side * cam.fov / 2)
                    ax.plot([0, 2 * e * math.cos(a)], [0, 2 * e * math.sin(a)], ls="--", c="tab:orange", lw=0.6)
            ax.set_xlim(-e, e)
            ax.set_ylim(-e, e)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"test {i}: {int(self.truth.static[i].sum())} parked, "
                         f"{int((~self.truth.static[i]).sum())} moving", fontsize=8)
        what = self.args.labels + (f", {self.args.semantics}" if self.args.labels == "motion_semantic" else "")
        fig.suptitle(f"UP-VL ({what} labels): parked GT blue, moving GT green, detections >= "
                     f"{self.args.recall_score} red, camera FoV dashed", fontsize=8)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True


# ------------------------------------------------------------------------------------- runner


def _iou_recall(auto: list[Tensor], gt: list[Tensor], static: list[Tensor], thr: float) -> dict[str, float]:
    from kdforge.tasks.pointcloud.iou import bev_iou

    hits, tp, n_auto = [], 0, 0
    for a, g in zip(auto, gt, strict=True):
        hits.append(recall_flags(a, torch.arange(len(a), 0, -1).float(), g, thr))
        n_auto += len(a)
        if len(a) and len(g):
            tp += int((bev_iou(a, g).max(1).values >= thr).sum())
    hit, st = torch.cat(hits), torch.cat(static)
    return {"autolabel_static_recall": 100.0 * float(hit[st].double().mean()) if st.any() else 0.0,
            "autolabel_moving_recall": 100.0 * float(hit[~st].double().mean()) if (~st).any() else 0.0,
            "autolabel_precision": 100.0 * tp / max(1, n_auto), "autolabel_boxes_per_scene": n_auto / max(1, len(auto))}


PREP_VERSION = 2


def _prepare(cfg: UPVLRecipe, spec: SceneSpec, cams: list, vl: SyntheticVL | ClipVL, score: Any,
             train_seqs: list[Sequence], test_seqs: list[Sequence], teacher: str = "") -> dict[str, Any]:
    """The run-independent data: VL targets of the training key frames, camera visibility of the test objects,
    the motion-only and motion + projected-semantics auto-labels (with their diagnostics); cached on disk
    (`upvl.cache`, kdforge's cache directory) keyed by every parameter that shapes them, the VL teacher's weights
    hash (`teacher`) included."""
    from dataclasses import asdict

    from kdforge.data.cache_dir import atomic_torch_save, cache_dir, cache_key, try_torch_load

    a, d = cfg.upvl, cfg.data
    vl_params = asdict(a.vl)
    for k in ("run", "teacher_only", "clip"):           # which teacher: its weights hash (`teacher`) says
        vl_params.pop(k)
    if a.vl.kind == "clip":
        vl_params.update(window=a.vl.clip.window, stride=a.vl.clip.stride)
    params = {"version": PREP_VERSION, "data": asdict(d), "sequence": asdict(a.sequence), "vl": vl_params,
              "autolabel": asdict(a.autolabel), "iou": a.iou, "teacher": teacher}
    path = cache_dir() / "upvl" / f"prep-{cache_key(params)}.pt"
    if a.cache:
        hit = try_torch_load(path)
        if hit is not None and len(hit.get("targets", [])) == d.num_train:
            return hit
    key = d.seed * 100_003
    ground_z = -spec.sensor_height
    train_vl = [vl.point_features(s.scene(0), cams, spec, key + i) for i, s in enumerate(train_seqs)]
    test_vis = [vl.point_features(s.scene(0), cams, spec, key + d.num_train + i)[1] for i, s in enumerate(test_seqs)]
    seen = []
    for v, s in zip(test_vis, test_seqs, strict=True):
        track = s.frames[0].point_track
        seen.append(torch.tensor([bool(v[track == m].any()) for m in range(len(s.labels))], dtype=torch.bool))
    targets, masks = [t[0] for t in train_vl], [t[1] for t in train_vl]
    projected = [torch.where(m, score(f), torch.full((len(f),), math.nan)) for f, m in train_vl]
    out: dict[str, Any] = {"targets": targets, "masks": masks, "seen": seen}
    for name, semantic in (("motion", None), ("projected", projected)):
        auto = [auto_label(s, ground_z, a.autolabel, None if semantic is None else semantic[i])[0]
                for i, s in enumerate(train_seqs)]
        out[f"labels_{name}"] = auto
        out[f"diag_{name}"] = _iou_recall(auto, [s.frames[0].boxes for s in train_seqs],
                                          [s.static for s in train_seqs], a.iou)
    if a.cache:
        try:
            atomic_torch_save(out, path)
        except KdforgeError:
            pass                    # an unwritable cache must not stop the run
    return out


def run_upvl(cfg: UPVLRecipe, run_dir: str | Path, trainer: Any, config_text: str) -> dict[str, Any]:
    from kdforge.extras import require
    from kdforge.tasks.pointcloud.cameras import rig_from_spec

    require("shapely", "pointcloud", "BEV AP needs shapely")
    a, d = cfg.upvl, cfg.data
    spec = d.spec()
    spec.cameras = [dict(c) for c in a.vl.cameras]
    cams = rig_from_spec(spec)
    motion = a.sequence.motion()
    ground_z = -spec.sensor_height
    train_seqs = [make_sequence(spec, d.seed, i, a.sequence.frames, motion) for i in range(d.num_train)]
    test_seqs = [make_sequence(spec, d.seed, d.num_train + i, 1, motion) for i in range(d.num_test)]
    vl: SyntheticVL | ClipVL
    teacher, teacher_result = "", {}
    if a.vl.kind == "clip":
        stage = _clip_teacher(cfg, run_dir, trainer, config_text, spec, cams, train_seqs)
        if stage.stopped or a.vl.teacher_only:
            return stage.result
        model_dir = stage.run_dir / "model"
        vl = ClipVL(model_dir, list(spec.categories), a.vl.clip.window, a.vl.clip.stride,
                    a.vl.clip.model.context_length)
        teacher = _weights_hash(model_dir)
        teacher_result = {f"vl_teacher_{k}": v for k, v in stage.result.items()
                          if k in ("test_zeroshot_top1", "test_i2t_r1", "test_t2i_r1")}
    else:
        vl = SyntheticVL(semantic_names(spec), a.vl.dim, a.vl.noise, a.vl.seed)
    text = vl.text([vl.prompt(c) for c in spec.categories])
    score = semantic_score(text, vl.text([vl.prompt("ground"), vl.prompt("clutter")]) if a.vl.kind == "clip" else None)
    prep = _prepare(cfg, spec, cams, vl, score, train_seqs, test_seqs, teacher)
    targets, masks = prep["targets"], prep["masks"]
    test_scenes = [Scene(s.frames[0].points, s.frames[0].point_labels, s.frames[0].boxes,
                         torch.zeros(len(s.labels), dtype=torch.long)) for s in test_seqs]
    truth = TestTruth([s.static for s in test_seqs], [s.labels for s in test_seqs],
                      [s.frames[0].point_track for s in test_seqs], prep["seen"])
    model_cfg = DetectorConfig(**{**cfg.model.__dict__, "feature_dim": cfg.model.head if a.feature_weight > 0 else 0})
    settings = loop_settings(cfg.train, cfg.seed, trainer)

    def scenes_of(auto: list[Tensor]) -> list[Scene]:
        return [Scene(s.frames[0].points, s.frames[0].point_labels, b, torch.zeros(len(b), dtype=torch.long))
                for s, b in zip(train_seqs, auto, strict=True)]

    def task(args: UPVLArgs, auto: list[Tensor], diag: dict[str, float], extra: dict[str, Any]) -> UPVLTask:
        torch.manual_seed(cfg.seed)
        det = build_detector(1, d.extent, model_cfg)
        module = UPVLModule(det, targets, masks, args.feature_weight, vl.dim)
        return UPVLTask(module, scenes_of(auto), test_scenes, truth, text, d.extent, cfg.train.batch_size, cfg.seed,
                        args, cfg.eval, {**diag, **extra, **teacher_result}, cams)

    if a.labels == "motion":
        auto, diag, extra = prep["labels_motion"], prep["diag_motion"], {}
    elif a.semantics == "projected":
        auto, diag, extra = prep["labels_projected"], prep["diag_projected"], {}
    else:
        from dataclasses import replace

        first = replace(a, labels="motion", semantics="projected")
        stage = run_stage(run_dir, "features", settings, task(first, prep["labels_motion"], prep["diag_motion"], {}),
                          config_text)
        if stage.stopped:
            return stage.result
        extra = {f"features_{k}": v for k, v in stage.result.items()
                 if k.startswith(("test_", "autolabel_")) and k != "test_scenes"}
        first_module = stage.module
        semantic = []
        with torch.no_grad():
            first_module.eval()
            for i, s in enumerate(train_seqs):
                pts, zero = s.frames[0].points, torch.zeros(len(s.frames[0].points), dtype=torch.long)
                h = _unit(first_module.point_embeddings(first_module.student(pts, zero, 1), pts, zero))
                semantic.append(torch.where(masks[i], score(targets[i]), score(h)))
        auto = [auto_label(s, ground_z, a.autolabel, semantic[i])[0] for i, s in enumerate(train_seqs)]
        diag = _iou_recall(auto, [s.frames[0].boxes for s in train_seqs], [s.static for s in train_seqs], a.iou)
    return run_stage(run_dir, None, settings, task(a, auto, diag, extra), config_text).result


def _clip_teacher(cfg: UPVLRecipe, run_dir: str | Path, trainer: Any, config_text: str, spec: SceneSpec, cams: list,
                  train_seqs: list[Sequence]) -> Any:
    """The CLIP teacher: a finished one (`upvl.vl.run`: its `<run>/model`), or trained on crops of the training
    sequences' key-frame views (val / test crops from extra held-out scenes) as the stage `vl_teacher`
    (into the run directory itself with `upvl.vl.teacher_only`)."""
    import json

    from kdforge.methods.clip import ClipRecipe, PairDataConfig, run_clip
    from kdforge.train.stages import StageRun

    a, d = cfg.upvl, cfg.data
    c = a.vl.clip
    if a.vl.run:
        where = Path(a.vl.run)
        where = where if (where / "model" / "config.json").is_file() else where / "stages" / "vl_teacher"
        if not (where / "model" / "config.json").is_file():
            raise KdforgeError(f"upvl.vl.run {a.vl.run}: no finished CLIP teacher there (<run>/model or "
                               "<run>/stages/vl_teacher/model); train one with upvl.vl.teacher_only=true")
        result = json.loads((where / "result.json").read_text()) if (where / "result.json").is_file() else {}
        return StageRun(None, result, where, stopped=False)
    from kdforge.tasks.pointcloud.sequences import make_sequence as _seq

    key = d.seed * 100_003
    extra = d.num_train + d.num_test
    held = [_seq(spec, d.seed, extra + i, 1, a.sequence.motion()).scene(0) for i in range(c.crops.num_val
                                                                                      + c.crops.num_test)]
    held_keys = [key + extra + i for i in range(len(held))]
    splits = {"train": crop_pairs([s.scene(0) for s in train_seqs], cams, spec, [key + i for i in range(d.num_train)],
                                  c.crops, c.seed),
              "val": crop_pairs(held[:c.crops.num_val], cams, spec, held_keys[:c.crops.num_val], c.crops, c.seed + 1),
              "test": crop_pairs(held[c.crops.num_val:], cams, spec, held_keys[c.crops.num_val:], c.crops, c.seed + 2)}
    names = crop_classes(list(spec.categories))
    recipe = ClipRecipe(seed=c.seed, data=PairDataConfig(size=c.crops.size), model=c.model, train=c.loop)
    return run_clip(recipe, run_dir, trainer, config_text, stage=None if a.vl.teacher_only else "vl_teacher",
                    splits=splits, vocab=caption_vocabulary(list(spec.categories)),
                    prompts=(names, [caption(n) for n in names]))


class UPVL:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, UPVLRecipe, method="upvl")
        check_args(cfg, source)
        cfg.check(source)
        return run_upvl(cfg, run_dir, trainer, text)


METHODS.register(
    "upvl", UPVL, family="3d-detection",
    paper="Unsupervised 3D Perception with 2D Vision-Language Distillation for Autonomous Driving (ICCV 2023)",
    summary="auto-labels from motion (tracked clusters) plus camera VL semantics for parked objects; a LiDAR-only "
            "class-agnostic detector with a distilled per-point VL feature head, open-vocabulary labels from text",
    task="pointcloud")
