"""PointDC (Chen et al., ICCV 2023): unsupervised point segmentation by cross-modal KD + super-voxel clustering.

No label is used in training. The paper's two stages (card p28, official `pointdc_mk/`):

    CMD   t_p = the 2D teacher's dense feature at p's pixel, averaged over every view that sees p
          (depth-tested), then within the point's super-voxel (as the released feature files are)
          L_CMD = mean_{p: |t_p|_1 > 0, d} ( n(A f_p)_d - n(t_p)_d )^2         n = L2-normalise, A: 1x1 align
    SVC   v_s = n( mean_{p in s} n(f_p) ) over super-voxels s of all training scenes
          {mu_k} = k-means_cos({v_s}, K);  yhat_p = argmax_k <v_{s(p)}, mu_k>    (pseudo-labels)
          logits_p = scale * < n(f_p), n(W_k) >;  L_SVC = CE(logits_p, yhat_p)
          warm-up: W learnable (initialised to mu); then W := mu fixed, re-clustered every `recluster_every` epochs

Evaluation (official `eval_by_cluster`): k-means with K = number of classes on the trained
features of the training scenes (point level, or super-voxel means), every test point gets the
nearest centroid (its own or its super-voxel's), clusters are matched to classes by the Hungarian
algorithm (`kdforge.tasks.pointcloud.clusters.hungarian_miou`), metric mIoU (%).

Here (CPU demo on the procedural LiDAR scenes of `kdforge.tasks.pointcloud.scenes`; classes
ground, car, pedestrian, cyclist, clutter): every scene is rendered by a ring of pinhole cameras
at the sensor (`kdforge.tasks.pointcloud.cameras`), the 2D teacher embeds the RGB views,
`cameras.visibility` gives each LiDAR point its pixel in every view with a z-buffer test, the
feature is sampled there (bilinear) in every view that sees the point and averaged over those views
(`back_project_views`: the plain mean of the raw features, as the paper's "averaged over the views";
no per-view normalisation, the CMD loss L2-normalises the mean; `data.views_average: false` takes the
first view that sees the point instead, the previous rounds' targets), then averaged over the point's
super-voxel (a 1 m voxel grid x intensity bins: `clusters.supervoxels`, the LiDAR stand-in for the
paper's mesh over-segmentation / colour-normal splits). The student is
`kdforge.tasks.pointcloud.segmentation.PointSegNet` (PointNet-lite with voxel / pillar context) on x, y, z,
intensity. Arms (`pointdc.mode`): `raw` (k-means on the
normalised x, y, z, intensity: the card's baseline; no training, one zero-loss step so the run
goes through the Trainer), `cmd` (CMD only, k-means on the student's point features) and `full`
(CMD, then SVC from the CMD weights; evaluated on super-voxel means as the official code).

2D teacher (`teacher.kind`), one interface `features(rgb (V, 3, H, W)) -> (V, C, H', W')`:
`autoencoder` (default): a small CNN trained here, without any label, as a denoising
auto-encoder on the training scenes' rendered RGB views; its encoder's (C, H/2, W/2) map is the
feature. `prototype` (the card's stand-in, NOT a 2D network): a fixed random unit embedding per
class read from the rendered semantic map, plus Gaussian noise (`teacher.noise`).

Evidence (configs/experiments/pointdc.yaml, 5 paired seeds, view-averaged targets): CMD + SVC 36.7 mIoU vs
k-means on the raw points 14.3 (+22.4 [16.8, 28.0], holds); CMD alone 31.1; SVC adds +5.5 [1.3, 9.8] over its
CMD start; the teacher's targets reach 46.6 (premise); with the paper's unscaled logits SVC is inconclusive
(31.9). With first-view targets (the previous round): 36.8 vs 14.3, +22.6 [17.2, 28.0]; teacher 46.4. On the
development draw (data.seed 7) the view average did not improve the targets (teacher k-means 41.8 vs 42.6
first-view); 13.6 % of the points are seen by two cameras.

Deviations: no elastic distortion (rotation about z and scaling only). The teacher is a small
auto-encoder, not STEGO / DINO. `pointdc.scale` multiplies the cosine logits: the recipe uses 10
(chosen on a development draw, data.seed 7: SVC after CMD gave 38.7 mIoU with the paper's scale 1,
whose CE gradients are weak, and 44.6 with 10); `pointdc.scale=1` is the paper's no-temperature
logits (an experiment arm). The SVC k-means uses K = `pointdc.primitives` (default: the number of
classes; 10 primitives gave 45.0 on the development draw). K-means is scikit-learn's (Euclidean
on L2-normalised rows = cosine), not faiss; the k-means fits for pseudo-labels / evaluation use the
training scenes' features (subsampled to `eval.fit_points` points for the point-level fit). The
SVC stage also reports `train_pseudo_agree` (% of points whose classifier argmax is their
pseudo-label). Results report `target_fraction` (points with a target after the super-voxel
fill), `target_fraction_visible` (points seen by a camera), `target_fraction_point` (seen, before
the fill), `target_fraction_multiview` (points seen by two or more cameras: those the view
average changes), `teacher_miou` (k-means on the teacher's targets; the premise) and
`raw_miou_targeted` (k-means on the raw inputs, the same points).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.base import SampledTask, TaskModule, seeded_generator
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.pointcloud.clusters import assign_cosine, hungarian_miou, kmeans_cosine, segment_mean, supervoxels
from kdforge.tasks.pointcloud.scenes import Scene, SceneSpec, procedural_scenes, semantic_names
from kdforge.tasks.pointcloud.segmentation import PointSegConfig, PointSegNet
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["AutoencoderTeacher", "PointDCArgs", "PointDCData", "PointDCModule", "PointDCRecipe", "PointDCTask",
           "PrototypeTeacher", "TeacherSpec", "back_project", "build_data", "cmd_loss", "cosine_logits",
           "pseudo_labels", "run_pointdc"]


# ------------------------------------------------------------------------------------- recipe


@dataclass
class PointDCData:
    num_train: int = 60
    num_test: int = 30
    categories: list[str] = field(default_factory=lambda: ["car", "pedestrian", "cyclist"])
    extent: float = 16.0
    min_objects: int = 4
    max_objects: int = 10
    clutter: int = 4
    noise: float = 0.03
    dropout: float = 0.1
    seed: int = 0
    cameras: int = 6                      # pinhole ring at the sensor
    fov: float = 70.0
    width: int = 96
    height: int = 48
    pitch: float = 5.0
    tolerance: float = 0.3                # depth test (m) of cameras.visibility
    views_average: bool = True            # target = mean over every view that sees the point (false: first view)

    def spec(self) -> SceneSpec:
        return SceneSpec(categories=list(self.categories), extent=self.extent, min_objects=self.min_objects,
                         max_objects=self.max_objects, clutter=self.clutter, noise=self.noise, dropout=self.dropout)


@dataclass
class TeacherSpec:
    kind: str = "autoencoder"             # autoencoder (a 2D CNN trained label-free) | prototype (card stand-in)
    dim: int = 16                         # feature channels C
    steps: int = 300                      # autoencoder training steps
    batch_size: int = 16
    lr: float = 2e-3
    noise: float = 0.5                    # prototype: Gaussian noise std per pixel (unit class embeddings)
    seed: int = 100


@dataclass
class SuperVoxelSpec:
    voxel: float = 1.0                    # grid side (m)
    bins: int = 4                         # intensity bins intersected with the grid


@dataclass
class PointDCArgs:
    mode: str = "full"                    # raw | cmd | full
    supervoxel: SuperVoxelSpec = field(default_factory=SuperVoxelSpec)
    target_sv_mean: bool = True           # average the teacher targets within super-voxels (released features)
    primitives: int = 0                   # K of the SVC k-means (0: the number of classes)
    warmup_epochs: int = 3                # SVC epochs with learnable prototypes
    recluster_every: int = 2              # SVC: re-cluster every this many epochs after the warm-up
    scale: float = 10.0                   # cosine-logit scale (1 = the paper's no-temperature logits)
    augment: bool = True                  # rotation about z (+-pi) and scale 0.9-1.1 per training scene
    cmd_run: str | None = None            # full: a finished `mode: cmd` run whose student starts SVC


@dataclass
class EvalSpec:
    level: str = "auto"                   # point | supervoxel | auto (full: supervoxel, else point)
    fit_points: int = 20000               # training points the point-level k-means is fitted on
    kmeans_init: int = 5


def _loop(epochs: int, lr: float) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=4, optim=OptimConfig(name="adamw", lr=lr, weight_decay=1e-4),
                      schedule=ScheduleConfig(name="cosine"), grad_clip=10.0)


@dataclass
class PointDCRecipe:
    method: str = "pointdc"
    seed: int = 0
    data: PointDCData = field(default_factory=PointDCData)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    model: PointSegConfig = field(default_factory=PointSegConfig)
    cmd: LoopConfig = field(default_factory=lambda: _loop(15, 2e-3))
    svc: LoopConfig = field(default_factory=lambda: _loop(10, 1e-3))
    pointdc: PointDCArgs = field(default_factory=PointDCArgs)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def check(self, source: str) -> None:
        a, d, t = self.pointdc, self.data, self.teacher
        if a.mode not in ("raw", "cmd", "full"):
            raise ConfigError(f"{source}: pointdc.mode must be raw, cmd or full, got {a.mode!r}")
        if t.kind not in ("autoencoder", "prototype"):
            raise ConfigError(f"{source}: teacher.kind must be autoencoder or prototype, got {t.kind!r}")
        if t.dim < 2 or t.steps < 0 or t.batch_size < 1 or t.lr <= 0 or t.noise < 0:
            raise ConfigError(f"{source}: teacher needs dim >= 2, steps >= 0, batch_size >= 1, lr > 0, noise >= 0")
        if d.num_train < 2 or d.num_test < 1 or d.cameras < 1 or d.width < 8 or d.height < 8 or d.tolerance <= 0:
            raise ConfigError(f"{source}: data needs num_train >= 2, num_test >= 1, cameras >= 1, width/height >= 8 "
                              "and tolerance > 0")
        if a.supervoxel.voxel <= 0 or a.supervoxel.bins < 1:
            raise ConfigError(f"{source}: pointdc.supervoxel needs voxel > 0 and bins >= 1, got "
                              f"{a.supervoxel.voxel} and {a.supervoxel.bins}")
        if a.primitives < 0 or a.warmup_epochs < 0 or a.recluster_every < 1 or a.scale <= 0:
            raise ConfigError(f"{source}: pointdc needs primitives >= 0, warmup_epochs >= 0, recluster_every >= 1 "
                              f"and scale > 0")
        if a.cmd_run and a.mode != "full":
            raise ConfigError(f"{source}: pointdc.cmd_run is only read by mode full (got mode {a.mode})")
        if self.eval.level not in ("auto", "point", "supervoxel") or self.eval.fit_points < 100:
            raise ConfigError(f"{source}: eval.level must be auto, point or supervoxel and eval.fit_points >= 100")
        try:
            d.spec().check()
            self.model.check("model")
        except KdforgeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        self.cmd.check(f"{source}: cmd")
        self.svc.check(f"{source}: svc")


# ------------------------------------------------------------------------------------- 2D teachers


class AutoencoderTeacher(nn.Module):
    """A small 2D CNN: encoder (3 -> C at half resolution) trained as a denoising auto-encoder, no labels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(32, dim, 3, padding=1))
        self.decoder = nn.Sequential(nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                                     nn.Conv2d(dim, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 3, 3, padding=1))

    def fit(self, views: Tensor, spec: TeacherSpec) -> list[float]:
        """Train on RGB views (M, 3, H, W): reconstruct the clean view from a noisy one (seeded). Returns losses."""
        g = seeded_generator(spec.seed, 17)
        opt = torch.optim.Adam(self.parameters(), lr=spec.lr)
        losses = []
        self.train()
        for _ in range(spec.steps):
            idx = torch.randint(0, len(views), (min(spec.batch_size, len(views)),), generator=g)
            clean = views[idx]
            noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
            loss = F.mse_loss(self.decoder(self.encoder(noisy)), clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.eval()
        return losses

    @torch.no_grad()
    def features(self, rgb: Tensor, semantic: Tensor | None = None) -> Tensor:
        return self.encoder(rgb.float())


class PrototypeTeacher:
    """The card's stand-in (not a 2D network): a fixed random unit embedding per class + noise, via the semantic map."""

    def __init__(self, num_classes: int, spec: TeacherSpec) -> None:
        g = seeded_generator(spec.seed, 29)
        self.protos = F.normalize(torch.randn(num_classes, spec.dim, generator=g), dim=1)
        self.noise, self.seed, self.calls = spec.noise, spec.seed, 0

    def features(self, rgb: Tensor, semantic: Tensor | None = None) -> Tensor:
        if semantic is None:
            raise KdforgeError("the prototype teacher needs the rendered semantic map")
        self.calls += 1
        g = seeded_generator(self.seed, 31, self.calls)
        out = self.protos[semantic.clamp_min(0)].permute(0, 3, 1, 2).clone()       # (V, C, H, W)
        out = out + self.noise * torch.randn(out.shape, generator=g)
        return out * (semantic >= 0)[:, None].float()                               # sky: no feature


def back_project_views(feats: Tensor, uv: Tensor, visible: Tensor, height: int, width: int,
                       average: bool = True) -> tuple[Tensor, Tensor]:
    """(targets (N, C), views (N,)): a point's feature averaged over every view that sees it (`average`), or the
    feature in the first (lowest-index) view that sees it; `views` counts the views averaged (0: no target).
    uv (V, N, 2) and visible (V, N) as `cameras.visibility`.

    A view counts when the point is visible in it and its sampled feature is non-zero (zero = no feature, e.g. the
    prototype teacher's sky). The raw features are averaged (no per-view normalisation; the CMD loss normalises the
    mean). Points no view sees get zeros and 0 views."""
    V, N = visible.shape
    total = feats.new_zeros(N, feats.shape[1]).float()
    count = torch.zeros(N, dtype=torch.long)
    earlier = torch.zeros(N, dtype=torch.bool)                     # first-view mode: a lower view sees the point
    for v in range(V):
        if not bool(visible[v].any()):
            continue
        vals = back_project(feats, torch.full((N,), v, dtype=torch.long), uv[v], visible[v], height, width)
        has = visible[v] & (vals.abs().sum(1) > 0)
        if not average:
            has &= ~earlier
            earlier |= visible[v]
        total += vals * has[:, None]
        count += has.long()
    return total / count.clamp_min(1)[:, None], count


def back_project(feats: Tensor, view: Tensor, uv: Tensor, visible: Tensor, height: int, width: int) -> Tensor:
    """(N, C) features of the points at their pixel (bilinear in the (V, C, H', W') map); zeros where not visible."""
    out = feats.new_zeros(len(view), feats.shape[1])
    if not bool(visible.any()):
        return out
    v, p = view[visible], uv[visible].float()
    gx = (p[:, 0] + 0.5) / width * 2 - 1
    gy = (p[:, 1] + 0.5) / height * 2 - 1
    grid = torch.stack([gx, gy], 1)
    vals = torch.zeros(len(v), feats.shape[1])
    for i in v.unique().tolist():
        sel = v == i
        s = F.grid_sample(feats[i:i + 1].float(), grid[sel][None, :, None], mode="bilinear", padding_mode="border",
                          align_corners=False)
        vals[sel] = s[0, :, :, 0].T
    out[visible] = vals
    return out


# ------------------------------------------------------------------------------------- data


@dataclass
class SceneData:
    points: list[Tensor]          # (N_i, 4)
    labels: list[Tensor]          # (N_i,) semantic labels (evaluation only)
    sv: list[Tensor]              # (N_i,) super-voxel ids within the scene
    targets: list[Tensor]         # (N_i, C) teacher targets (zeros: none)
    visible: list[Tensor]         # (N_i,) seen by a camera (cameras.visibility)
    seen: list[Tensor]            # (N_i,) visible and its pixel has a feature (before the super-voxel fill)
    views: list[Tensor] = field(default_factory=list)    # (N_i,) number of views that see the point

    def __len__(self) -> int:
        return len(self.points)


_DATA_CACHE: dict[str, tuple[SceneData, SceneData, dict[str, Any]]] = {}


def z_range(spec: SceneSpec) -> tuple[float, float]:
    return (-spec.sensor_height - 0.5, 2.0)


def _box(d: PointDCData, spec: SceneSpec) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    lo, hi = z_range(spec)
    e = d.extent * math.sqrt(2) + 0.5          # rotated training scenes stay inside
    return (-e, -e, lo), (e, e, hi)


def build_data(d: PointDCData, t: TeacherSpec, sv: SuperVoxelSpec, sv_mean: bool) -> tuple[SceneData, SceneData,
                                                                                            dict[str, Any]]:
    """(train, test, info): scenes, super-voxels and the 2D teacher's back-projected targets (cached per process)."""
    key = json.dumps([asdict(d), asdict(t), asdict(sv), sv_mean], sort_keys=True)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    from kdforge.tasks.pointcloud.cameras import camera_rig, render_views, visibility

    spec = d.spec()
    cams = camera_rig(d.cameras, d.fov, d.width, d.height, d.pitch)
    train = procedural_scenes(spec, d.num_train, d.seed)
    test = procedural_scenes(spec, d.num_test, d.seed, d.num_train)
    views = [render_views(s, cams, spec, seed=d.seed * 100003 + i) for i, s in enumerate(train + test)]
    info: dict[str, Any] = {}
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)
        if t.kind == "autoencoder":
            teacher: Any = AutoencoderTeacher(t.dim)
            losses = teacher.fit(torch.cat([v.rgb for v in views[:len(train)]]), t)
            info["teacher_loss_first"] = losses[0] if losses else None
            info["teacher_loss_last"] = losses[-1] if losses else None
        else:
            teacher = PrototypeTeacher(len(semantic_names(spec)), t)
    lo, hi = _box(d, spec)

    def split(scenes: list[Scene], vs: list[Any]) -> SceneData:
        out = SceneData([], [], [], [], [], [])
        for s, v in zip(scenes, vs, strict=True):
            pts = s.points.float()
            uv, in_view = visibility(pts, v, d.tolerance)          # (V, N, 2), (V, N)
            vis = in_view.any(0)
            feats = teacher.features(v.rgb, v.semantic)
            tgt, nviews = back_project_views(feats, uv, in_view, d.height, d.width, d.views_average)
            ids = supervoxels(pts, None, sv.voxel, sv.bins, lo, hi)
            seen = nviews > 0                                      # a visible point with a feature in some view
            out.seen.append(seen)
            out.views.append(in_view.sum(0))
            if sv_mean:
                num = int(ids.max()) + 1
                has = torch.zeros(num, dtype=torch.bool)
                has[ids[seen & (ids >= 0)]] = True
                mean = segment_mean(tgt[seen], ids[seen], num)
                filled = (ids >= 0) & has[ids.clamp_min(0)]
                tgt = torch.where(filled[:, None], mean[ids.clamp_min(0)], tgt)
            out.points.append(pts)
            out.labels.append(s.point_labels.long())
            out.sv.append(ids)
            out.targets.append(tgt)
            out.visible.append(vis)
        return out

    tr, te = split(train, views[:len(train)]), split(test, views[len(train):])
    n = sum(len(p) for p in tr.points)
    info["target_fraction"] = sum(int((t_.abs().sum(1) > 0).sum()) for t_ in tr.targets) / max(1, n)
    info["target_fraction_visible"] = sum(int(v.sum()) for v in tr.visible) / max(1, n)
    info["target_fraction_point"] = sum(int(v.sum()) for v in tr.seen) / max(1, n)
    info["target_fraction_multiview"] = sum(int((c > 1).sum()) for c in tr.views) / max(1, n)
    _DATA_CACHE.clear()
    _DATA_CACHE[key] = (tr, te, info)
    return tr, te, info


# ------------------------------------------------------------------------------------- losses


def cmd_loss(student: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(masked normalised MSE, number of points with a target): mean over targeted points and channels."""
    has = target.abs().sum(1) > 0
    s, t = F.normalize(student, dim=1), F.normalize(target, dim=1)
    if not bool(has.any()):
        return student.sum() * 0.0, has.sum()
    return ((s[has] - t[has]) ** 2).mean(), has.sum()


def cosine_logits(features: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    return scale * F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T


def pseudo_labels(features: Tensor, sv: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """SVC: (per-point pseudo-labels, centroids (k, C)) from k-means over the super-voxel means of n(features).

    `sv` holds globally unique super-voxel ids (>= 0) of the points."""
    v = F.normalize(segment_mean(F.normalize(features, dim=1), sv), dim=1)
    used = torch.bincount(sv, minlength=len(v)) > 0
    centroids = kmeans_cosine(v[used], k, seed)
    return assign_cosine(v, centroids)[sv], centroids


# ------------------------------------------------------------------------------------- module and task


@dataclass
class PointBatch:
    points: Tensor
    batch: Tensor
    targets: Tensor
    pseudo: Tensor
    size: int


class PointDCModule(TaskModule):
    """The 3D student + 1x1 align (CMD) + cosine classifier (SVC: learnable prototypes, then fixed centroids)."""

    def __init__(self, net: PointSegNet, teacher_dim: int, k: int, stage: str, scale: float) -> None:
        super().__init__()
        self.net, self.stage, self.scale = net, stage, scale
        self.align = nn.Linear(net.out_dim, teacher_dim)
        self.prototypes = nn.Parameter(torch.randn(k, net.out_dim) * 0.1)
        self.register_buffer("centroids", torch.zeros(k, net.out_dim))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool))

    def eval_model(self) -> nn.Module:
        return self.net

    def forward(self, batch: PointBatch) -> Step:
        out = self.net(batch.points, batch.batch)
        f = out["features"]
        extras: dict[str, Tensor] = {}
        if self.stage == "cmd":
            loss, n = cmd_loss(self.align(f), batch.targets)
            losses, groups = {"cmd": loss}, {"cmd": "distill"}
            extras = {"targeted": n.float(), "points": torch.tensor(float(len(f)))}
        elif self.stage == "svc":
            w = self.centroids if bool(self.fixed) else self.prototypes
            logits = cosine_logits(f, w, self.scale)
            losses, groups = {"svc": F.cross_entropy(logits, batch.pseudo)}, {"svc": "task"}
            extras = {"agree": (logits.argmax(1) == batch.pseudo).sum().float(),
                      "points": torch.tensor(float(len(f)))}
        else:     # raw: nothing is learnt (one zero-loss step so the run goes through the Trainer)
            losses, groups = {"none": f.sum() * 0.0}, {"none": "task"}
        return Step(outputs=f.detach(), losses=losses, groups=groups, extras=extras)


def _augment(points: Tensor, g: torch.Generator) -> Tensor:
    a = float(2 * math.pi * torch.rand((), generator=g) - math.pi)
    s = float(0.9 + 0.2 * torch.rand((), generator=g))
    c, n = math.cos(a), math.sin(a)
    rot = torch.tensor([[c, -n], [n, c]], dtype=points.dtype)
    out = points.clone()
    out[:, :2] = points[:, :2] @ rot.T * s
    out[:, 2] = (points[:, 2] - points[:, 2].min()) * s + points[:, 2].min() if len(points) else points[:, 2]
    return out


class PointDCTask(SampledTask):
    name = "pointcloud_unsup_seg"
    stream = 41
    ddp_note = ("the per-point losses are averaged per process and the k-means pseudo-labels / evaluation run on "
                "the whole training set; untested under torchrun")

    def __init__(self, module: PointDCModule, train: SceneData, test: SceneData, names: list[str], args: PointDCArgs,
                 ev: EvalSpec, batch_size: int, seed: int, extra: dict[str, Any] | None = None) -> None:
        self.module, self.train, self.test, self.names = module, train, test, list(names)
        self.args, self.ev, self.batch_size, self.seed = args, ev, batch_size, seed
        self.extra = dict(extra or {})
        self.k = args.primitives or len(names)
        offsets = [0]
        for s in train.sv:
            offsets.append(offsets[-1] + int(s.max()) + 1)
        self.sv_global = torch.cat([s + o for s, o in zip(train.sv, offsets, strict=False)])   # all ids >= 0 inside
        self.sizes = [len(p) for p in train.points]
        self.pseudo = torch.zeros(sum(self.sizes), dtype=torch.long)
        self.clustered_epoch = -1
        self.device = torch.device("cpu")

    # -- training
    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return self.module.to(device)

    def steps_per_epoch(self) -> int:
        return 1 if self.module.stage == "raw" else super().steps_per_epoch()

    def batch(self, epoch: int, step: int, env: DistEnv) -> PointBatch:
        k = epoch * self.steps_per_epoch() + step
        idx = self.batch_index(epoch, step, env).tolist()
        g = seeded_generator(self.seed, 43, k)
        starts = torch.tensor([0, *self.sizes]).cumsum(0)
        pts, tg, ps, bt = [], [], [], []
        for j, i in enumerate(idx):
            p = self.train.points[i]
            pts.append(_augment(p, g) if self.args.augment else p)
            tg.append(self.train.targets[i])
            ps.append(self.pseudo[int(starts[i]):int(starts[i + 1])])
            bt.append(torch.full((len(p),), j, dtype=torch.long))
        d = self.device
        return PointBatch(torch.cat(pts).to(d), torch.cat(bt).to(d), torch.cat(tg).to(d), torch.cat(ps).to(d),
                          len(idx))

    def train_counts(self, out: Step, batch: PointBatch) -> dict[str, Tensor]:
        return {k: v.detach().double() for k, v in out.extras.items()}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        n = max(1.0, counts.get("points", 0.0))
        out = {}
        if "targeted" in counts:
            out["train_target_fraction"] = counts["targeted"] / n
        if "agree" in counts:
            out["train_pseudo_agree"] = 100.0 * counts["agree"] / n
        return out

    @torch.no_grad()
    def point_features(self, split: SceneData, raw: bool = False) -> list[Tensor]:
        net = self.module.net
        was = net.training
        net.eval()
        out = []
        for p in split.points:
            out.append(net.normalised_inputs(p.to(self.device)).cpu() if raw
                       else net(p.to(self.device))["features"].cpu())
        net.train(was)
        return out

    def on_epoch_start(self, module: nn.Module, epoch: int) -> None:
        """SVC: cluster at epoch 0 (prototypes := centroids), then fixed centroids re-clustered every r epochs."""
        if self.module.stage != "svc" or self.clustered_epoch == epoch:
            return
        a = self.args
        warm = epoch < a.warmup_epochs
        due = epoch == 0 or (not warm and (epoch - a.warmup_epochs) % a.recluster_every == 0)
        if not due:
            return
        feats = torch.cat(self.point_features(self.train))
        self.pseudo, centroids = pseudo_labels(feats, self.sv_global, self.k, self.seed * 1000 + epoch)
        m = self.module
        with torch.no_grad():
            m.centroids.copy_(centroids.to(m.centroids.device))
            if epoch == 0:
                m.prototypes.copy_(centroids.to(m.prototypes.device))
            m.fixed.fill_(not warm)
        self.clustered_epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"pseudo": self.pseudo.clone(), "clustered_epoch": self.clustered_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.pseudo = state["pseudo"].clone()
            self.clustered_epoch = int(state["clustered_epoch"])

    # -- evaluation
    def _level(self) -> str:
        if self.ev.level != "auto":
            return self.ev.level
        return "supervoxel" if self.module.stage == "svc" else "point"

    def cluster_predictions(self, train_f: list[Tensor], test_f: list[Tensor], level: str, cosine: bool,
                            train_keep: list[Tensor] | None = None) -> list[Tensor]:
        """K-means (K = classes) fitted on training features (points or super-voxel means), applied to test scenes."""
        from sklearn.cluster import KMeans

        k = len(self.names)
        prep = (lambda x: F.normalize(x.double(), dim=1)) if cosine else (lambda x: x.double())
        if level == "supervoxel":
            fit = torch.cat([segment_mean(prep(f)[keep] if train_keep else prep(f), sv[keep] if train_keep else sv)
                             for f, sv, keep in zip(train_f, self.train.sv, train_keep or train_f, strict=True)])
            fit = fit[fit.abs().sum(1) > 0]
        else:
            fit = torch.cat([prep(f)[keep] if train_keep else prep(f)
                             for f, keep in zip(train_f, train_keep or train_f, strict=True)])
            if len(fit) > self.ev.fit_points:
                fit = fit[torch.randperm(len(fit), generator=seeded_generator(self.seed, 47))[:self.ev.fit_points]]
        if cosine:
            fit = F.normalize(fit, dim=1)
        km = KMeans(n_clusters=k, n_init=self.ev.kmeans_init, random_state=self.seed).fit(fit.numpy())
        preds = []
        for f, sv in zip(test_f, self.test.sv, strict=True):
            x = prep(f)
            if level == "supervoxel":
                m = segment_mean(x, sv.clamp_min(0), int(sv.max()) + 1)
                m = F.normalize(m, dim=1) if cosine else m
                lab = torch.from_numpy(km.predict(m.numpy())).long()[sv.clamp_min(0)]
            else:
                x = F.normalize(x, dim=1) if cosine else x
                lab = torch.from_numpy(km.predict(x.numpy())).long()
            preds.append(lab)
        return preds

    def _miou(self, preds: list[Tensor], labels: list[Tensor]) -> dict[str, Any]:
        return hungarian_miou(torch.cat(preds), torch.cat(labels), len(self.names), len(self.names))

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        if split != "test":
            raise KdforgeError(f"pointdc evaluates the test split, not {split!r}")
        raw = self.module.stage == "raw"
        tr, te = self.point_features(self.train, raw), self.point_features(self.test, raw)
        out: dict[str, float] = {}
        for level in ("point", "supervoxel"):
            r = self._miou(self.cluster_predictions(tr, te, level, cosine=not raw), self.test.labels)
            out[f"miou_{level}"] = r["miou"]
            if level == self._level():
                out["miou"], out["oacc"] = r["miou"], r["oacc"]
                out.update({f"iou_{n}": v for n, v in zip(self.names, r["ious"], strict=True)})
        return out

    def premise(self) -> dict[str, float]:
        """k-means on the teacher's targets vs on the raw inputs, fitted on training points with a target, scored on
        the test points with a target (the same points for both)."""
        tr_keep = [t.abs().sum(1) > 0 for t in self.train.targets]
        te_keep = [t.abs().sum(1) > 0 for t in self.test.targets]
        labels = [lab[k] for lab, k in zip(self.test.labels, te_keep, strict=True)]
        sub = PointDCTask.__new__(PointDCTask)
        sub.__dict__.update(self.__dict__)
        sub.test = SceneData([p[k] for p, k in zip(self.test.points, te_keep, strict=True)], labels,
                             [s[k] for s, k in zip(self.test.sv, te_keep, strict=True)], [], [], [])
        net = self.module.net
        raw_tr = [net.normalised_inputs(p.to(self.device)).cpu() for p in self.train.points]
        raw_te = [net.normalised_inputs(p.to(self.device)).cpu() for p in sub.test.points]
        t_te = [t[k] for t, k in zip(self.test.targets, te_keep, strict=True)]
        teach = sub._miou(sub.cluster_predictions(self.train.targets, t_te, "point", True, tr_keep), labels)
        rawm = sub._miou(sub.cluster_predictions(raw_tr, raw_te, "point", False, tr_keep), labels)
        return {"teacher_miou": teach["miou"], "raw_miou_targeted": rawm["miou"],
                **{f"teacher_iou_{n}": v for n, v in zip(self.names, teach["ious"], strict=True)}}

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        return {**out, **self.premise(), **self.extra}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "stage": self.module.stage, "train_scenes": len(self.train.points),
                "test_scenes": len(self.test.points), "classes": self.names, "clusters_svc": self.k}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """BEV of three test scenes: clusters (coloured by their Hungarian-matched class) above the ground truth."""
        from kdforge.plotting import pyplot, save_png

        raw = self.module.stage == "raw"
        level = self._level()
        preds = self.cluster_predictions(self.point_features(self.train, raw), self.point_features(self.test, raw),
                                         level, cosine=not raw)
        r = self._miou(preds, self.test.labels)
        colour_of = {c: i for i, c in enumerate(r["match"]) if c >= 0}
        palette = ["0.75", "tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink"]
        plt = pyplot()
        pick = list(range(min(3, len(self.test.points))))
        fig, axes = plt.subplots(2, len(pick), figsize=(3.2 * len(pick), 6.6), squeeze=False)
        for col, i in enumerate(pick):
            p = self.test.points[i]
            for row, lab in enumerate((preds[i].apply_(lambda c: colour_of.get(c, len(self.names))),
                                       self.test.labels[i])):
                ax = axes[row, col]
                order = torch.argsort((lab != 0).long())          # ground first, objects on top
                cols = [palette[int(c) % len(palette)] for c in lab[order].tolist()]
                ax.scatter(p[order, 0], p[order, 1], s=[0.6 if c == 0 else 2.5 for c in lab[order].tolist()],
                           c=cols, linewidths=0)
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"test scene {i}: " + ("clusters (matched)" if row == 0 else "ground truth"), fontsize=8)
        handles = [plt.Line2D([], [], marker="o", ls="", color=palette[c], label=n) for c, n in enumerate(self.names)]
        fig.legend(handles=handles, loc="lower center", ncol=len(self.names), fontsize=7)
        fig.suptitle(f"pointdc mode {self.args.mode} ({level} k-means): test mIoU {r['miou']:.1f}", fontsize=9)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        save_png(fig, path, dpi=80)
        return True


# ------------------------------------------------------------------------------------- runner


def _cmd_identity(cfg: PointDCRecipe) -> dict[str, Any]:
    """What defines a CMD stage (a `pointdc.cmd_run` must match it)."""
    a = cfg.pointdc
    return {"seed": cfg.seed, "data": asdict(cfg.data), "teacher": asdict(cfg.teacher), "model": asdict(cfg.model),
            "cmd": asdict(cfg.cmd), "supervoxel": asdict(a.supervoxel), "target_sv_mean": a.target_sv_mean,
            "augment": a.augment}


def run_pointdc(cfg: PointDCRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """mode raw / cmd: one run in `run_dir`; full: stage `cmd` (or `pointdc.cmd_run`), then SVC in `run_dir`."""
    a = cfg.pointdc
    spec = cfg.data.spec()
    names = semantic_names(spec)
    train, test, info = build_data(cfg.data, cfg.teacher, a.supervoxel, a.target_sv_mean)
    k = a.primitives or len(names)
    lo, hi = _box(cfg.data, spec)

    def make(stage: str, loop: LoopConfig) -> PointDCTask:
        torch.manual_seed(cfg.seed)
        net = PointSegNet(cfg.model, max(abs(v) for v in lo[:2]), (lo[2], hi[2]))
        module = PointDCModule(net, cfg.teacher.dim, k if stage == "svc" else len(names), stage, a.scale)
        return PointDCTask(module, train, test, names, a, cfg.eval, loop.batch_size, cfg.seed,
                           {**info, "teacher_kind": cfg.teacher.kind})

    if a.mode == "raw":
        one = LoopConfig(epochs=1, batch_size=1, optim=cfg.cmd.optim, schedule=cfg.cmd.schedule)
        return run_stage(run_dir, None, loop_settings(one, cfg.seed, trainer), make("raw", one), config_text).result
    if a.mode == "cmd":
        return run_stage(run_dir, None, loop_settings(cfg.cmd, cfg.seed, trainer), make("cmd", cfg.cmd),
                         config_text).result
    if a.cmd_run:
        stage = reuse_stage(a.cmd_run, PointDCRecipe, cfg, _cmd_identity, "pointdc", "pointdc.cmd_run",
                            loop_settings(cfg.cmd, cfg.seed, trainer), make("cmd", cfg.cmd), "pointdc.mode=cmd")
    else:
        stage = run_stage(run_dir, "cmd", loop_settings(cfg.cmd, cfg.seed, trainer), make("cmd", cfg.cmd),
                          config_text)
        if stage.stopped:
            return stage.result
    task = make("svc", cfg.svc)
    task.module.net.load_state_dict(stage.module.net.state_dict())
    task.extra.update({f"cmd_{k_}": v for k_, v in stage.result.items() if k_.startswith("test_miou")})
    return run_stage(run_dir, None, loop_settings(cfg.svc, cfg.seed, trainer), task, config_text).result


class PointDC:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, PointDCRecipe, method="pointdc")
        cfg.check(source)
        return run_pointdc(cfg, run_dir, trainer, text)


METHODS.register(
    "pointdc", PointDC, family="point-cloud",
    paper="PointDC: Unsupervised Semantic Segmentation of 3D Point Clouds via Cross-modal Distillation and "
          "Super-Voxel Clustering (ICCV 2023)",
    summary="2D features of multi-view renderings back-projected (z-buffer) onto the points distil into a point "
            "network (masked normalised MSE); then k-means over super-voxel features gives pseudo-labels for a "
            "cosine classifier (fixed centroids, re-clustered); Hungarian-matched mIoU", task="pointcloud")
