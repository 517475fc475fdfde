"""A camera-only BEV detector (Lift-Splat-Shoot / BEVDepth style) on multi-view renderings of the procedural scenes.

Camera student (`CameraBEVDetector`): the LiDAR `BEVDetector` with its pillar encoder replaced by a view
transformer (`LiftSplat`), so the BEV CNN, the CenterPoint heads, `decode` and the AP metrics are the
LiDAR detector's own:

* lift: a small image CNN (GroupNorm, stride `camera.stride`) per view predicts, per feature pixel, a
  softmax over `depth_bins` depth bins (centres depth_min + (k + 1/2) step) and `model.pfn` context
  channels; their outer product is a feature per frustum point. With `camera_aware` the CNN also sees
  each pixel's ray direction ((u - c_x) / f, (v - c_y) / f): BEVDepth's camera-aware depth net, reduced
  to the two numbers a fixed rig varies (with a pitched camera the image row fixes the ground depth);
* splat: every frustum point (feature pixel centre at depth bin centre) is unprojected with the view's
  K and camera-from-lidar T (`geometry.unproject`) and sum-pooled (`splat: sum`, LSS / BEVDepth voxel
  pooling; `mean` divides by the frustum points per cell) into the BEV grid of `model.voxel` cells over
  [-extent, extent]^2, rows y and columns x -- exactly the LiDAR pillar grid's range and axis order,
  so teacher and student features of a BEV place sit in the same cell (tests/test_camera_bev.py);
  points outside `model.z_range` are dropped as the pillar encoder drops them;
* shoot: the BEV CNN (`model.width` x `model.depth`, first block stride `model.stride`), resized to the
  head grid (`model.cell`), and the heads. Taps: `lss` (the splatted BEV), `block1..depth` (the BEV
  CNN blocks), `neck`, `heatmap`, `reg`, and `depth` (the depth logits (B, V, D, h, w)).

Depth supervision (recipe `camera.depth_weight` > 0): cross-entropy of the depth logits against the bin
of each feature pixel's depth, from the scene's LiDAR points projected into the views (`depth_source:
lidar`, BEVDepth's supervision: the nearest point per feature pixel) or from the rendered depth map
(`rendered`: the nearest rendered depth in the pixel's stride x stride patch, dense); pixels with no
depth or one outside the bins are ignored. BEVDepth uses a binary cross-entropy on the softmaxed bins
with weight 3; the multi-class cross-entropy here is the same target with the standard loss (a
deviation).

Data: every scene of the split is rendered once from the rig (`cameras.render_views`, the scene index
as its noise seed; cached in memory for the process) when the task is built. `CameraBEVTask` is the
LiDAR `BEVDetectionTask` with camera inputs (the LiDAR points stay in the batch for a LiDAR teacher and
in the BEV pictures).
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
from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.cameras import MultiView, camera_rig, render_views
from kdforge.tasks.pointcloud.geometry import project, unproject
from kdforge.tasks.pointcloud.metrics import detection_ap
from kdforge.tasks.pointcloud.models import BEVDetector, DetectorConfig, centerpoint_loss
from kdforge.tasks.pointcloud.scenes import Scene, SceneSpec
from kdforge.tasks.pointcloud.task import BEVBatch, BEVDetectionTask, BEVDetectorModule, EvalConfig, SceneSplit
from kdforge.train.distributed import DistEnv

__all__ = ["CameraBEVBatch", "CameraBEVDetector", "CameraBEVModule", "CameraBEVTask", "CameraConfig", "CameraSplit",
           "LiftSplat", "bev_taps", "centre_distance_ap", "depth_loss", "depth_targets", "frustum_cells",
           "lidar_taps", "render_split"]


@dataclass
class CameraConfig:
    """The rig, its renderings and the camera student's image side (the BEV side is the recipe's `model`)."""

    views: int = 6                   # cameras at the lidar origin, yaws 0, 360/n, ...
    fov: float = 70.0
    width: int = 64
    height: int = 32
    pitch: float = 5.0
    noise: float = 0.02              # rendered pixel noise (std)
    image_width: int = 16            # image CNN channels
    image_depth: int = 3             # image CNN conv blocks (the first log2(stride) stride 2)
    stride: int = 4                  # image feature stride: 1, 2, 4 or 8
    depth_min: float = 1.0           # depth bins (m along the optical axis)
    depth_max: float = 25.0
    depth_bins: int = 16
    camera_aware: bool = True        # the CNN sees each pixel's ray direction
    splat: str = "sum"               # sum (LSS) | mean
    depth_weight: float = 0.0        # depth supervision (0: off)
    depth_source: str = "lidar"      # lidar (BEVDepth) | rendered

    def check(self, where: str) -> None:
        if self.views < 1 or self.width < 2 or self.height < 2 or not 1 <= self.fov < 179:
            raise KdforgeError(f"{where}: need views >= 1, width and height >= 2 and 1 <= fov < 179")
        if self.stride not in (1, 2, 4, 8) or self.width % self.stride or self.height % self.stride:
            raise KdforgeError(f"{where}: stride must be 1, 2, 4 or 8 and divide width {self.width} and height "
                               f"{self.height}, got {self.stride}")
        if self.image_depth < int(math.log2(self.stride)) or self.image_depth < 1 or self.image_width < 1:
            raise KdforgeError(f"{where}: image_depth must be >= max(1, log2(stride)) and image_width >= 1")
        if not 0 < self.depth_min < self.depth_max or self.depth_bins < 2:
            raise KdforgeError(f"{where}: need 0 < depth_min < depth_max and depth_bins >= 2, got {self.depth_min}, "
                               f"{self.depth_max}, {self.depth_bins}")
        if self.splat not in ("sum", "mean") or self.depth_source not in ("lidar", "rendered"):
            raise KdforgeError(f"{where}: splat must be sum or mean and depth_source lidar or rendered, got "
                               f"{self.splat!r}, {self.depth_source!r}")
        if self.depth_weight < 0 or self.noise < 0:
            raise KdforgeError(f"{where}: depth_weight and noise must be >= 0")

    def rig(self):
        return camera_rig(self.views, self.fov, self.width, self.height, self.pitch)

    def bin_centres(self) -> Tensor:
        step = (self.depth_max - self.depth_min) / self.depth_bins
        return self.depth_min + (torch.arange(self.depth_bins, dtype=torch.float32) + 0.5) * step


# ------------------------------------------------------------------------------------- geometry


def frustum_cells(K: Tensor, T: Tensor, cam: CameraConfig, extent: float, voxel: float, z_range: list[float]
                  ) -> Tensor:
    """(V * D * h * w,) long: the BEV cell (iy * n + ix) of every frustum point, -1 outside the grid / height range.

    Frustum point (v, k, i, j): feature pixel (i, j) of view v, centre ((j + 1/2) s, (i + 1/2) s) in image
    pixels (pixel (c, r) covers [c, c + 1) x [r, r + 1)), at depth bin centre k, unprojected with K[v], T[v].
    """
    s, d = cam.stride, cam.bin_centres().double()
    h, w = cam.height // s, cam.width // s
    n = int(round(2 * extent / voxel))
    rows, cols = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) * s,
                                (torch.arange(w, dtype=torch.float64) + 0.5) * s, indexing="ij")
    uv = torch.stack([cols, rows], -1).reshape(1, h * w, 2).expand(len(d), -1, -1).reshape(-1, 2)
    depth = d[:, None].expand(-1, h * w).reshape(-1)
    out = []
    for v in range(len(K)):
        xyz = unproject(uv, depth, K[v].double(), T[v].double())
        ix = torch.floor((xyz[:, 0] + extent) / voxel).long()
        iy = torch.floor((xyz[:, 1] + extent) / voxel).long()
        ok = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (xyz[:, 2] >= z_range[0]) & (xyz[:, 2] < z_range[1])
        out.append(torch.where(ok, iy * n + ix, torch.full_like(ix, -1)))
    return torch.cat(out)


def depth_targets(views: MultiView, points: Tensor, cam: CameraConfig) -> Tensor:
    """(V, h, w) long depth-bin target of every feature pixel, -1 where unknown or outside the bins."""
    V, H, W = views.depth.shape
    s = cam.stride
    h, w = H // s, W // s
    if cam.depth_source == "rendered":
        far = torch.where(views.depth > 0, views.depth, torch.full_like(views.depth, math.inf))
        near = -F.max_pool2d(-far[:, None], s, s)[:, 0]
    else:
        near = torch.full((V, h * w), math.inf)
        for v in range(V):
            uv, dep = project(points[:, :3].float(), views.K[v], views.T[v])
            col, row = (uv[:, 0] / s).floor().long(), (uv[:, 1] / s).floor().long()
            ok = (dep > 1e-3) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
            near[v] = near[v].scatter_reduce(0, (row * w + col)[ok], dep[ok], reduce="amin")
        near = near.view(V, h, w)
    step = (cam.depth_max - cam.depth_min) / cam.depth_bins
    k = torch.floor((near - cam.depth_min) / step)
    ok = torch.isfinite(near) & (k >= 0) & (k < cam.depth_bins)
    return torch.where(ok, k, torch.full_like(k, -1)).long()


# ------------------------------------------------------------------------------------- model


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(max(1, c_out // 8), c_out), nn.ReLU()]


class LiftSplat(nn.Module):
    """Images (B, V, 3, H, W) + K, T (B, V, ...) -> (BEV (B, C, n, n), depth logits (B, V, D, h, w))."""

    def __init__(self, cam: CameraConfig, channels: int, extent: float, voxel: float, z_range: list[float]) -> None:
        super().__init__()
        self.cam, self.channels, self.extent, self.voxel, self.z_range = cam, channels, extent, voxel, list(z_range)
        self.n = int(round(2 * extent / voxel))
        downs = int(math.log2(cam.stride))
        layers: list[nn.Module] = []
        c_in = 3 + (2 if cam.camera_aware else 0)
        for i in range(cam.image_depth):
            layers += _block(c_in, cam.image_width, 2 if i < downs else 1)
            c_in = cam.image_width
        self.image = nn.Sequential(*layers)
        self.out = nn.Conv2d(cam.image_width, cam.depth_bins + channels, 1)
        self._geometry: tuple[Tensor, Tensor, Tensor, Tensor] | None = None      # (K, T, cells, counts)

    def cells(self, K: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
        """Frustum cells (V*D*h*w,) and frustum points per BEV cell (n*n,) of one rig, computed once per rig."""
        g = self._geometry
        if g is None or not (torch.equal(g[0], K.cpu()) and torch.equal(g[1], T.cpu())):
            cells = frustum_cells(K.cpu(), T.cpu(), self.cam, self.extent, self.voxel, self.z_range)
            counts = torch.bincount(cells[cells >= 0], minlength=self.n * self.n)
            self._geometry = g = (K.cpu().clone(), T.cpu().clone(), cells, counts)
        return g[2].to(K.device), g[3].to(K.device)

    def rays(self, K: Tensor, h: int, w: int) -> Tensor:
        """(B, V, 2, H, W) ray-direction channels ((u - c_x) / f_x, (v - c_y) / f_y) at pixel centres."""
        rows, cols = torch.meshgrid(torch.arange(h, dtype=K.dtype, device=K.device) + 0.5,
                                    torch.arange(w, dtype=K.dtype, device=K.device) + 0.5, indexing="ij")
        x = (cols - K[..., 0, 2, None, None]) / K[..., 0, 0, None, None]
        y = (rows - K[..., 1, 2, None, None]) / K[..., 1, 1, None, None]
        return torch.stack([x, y], 2)

    def splat(self, depth: Tensor, context: Tensor, cells: Tensor, counts: Tensor) -> Tensor:
        """Sum-pool (or mean-pool) the frustum features depth (B, V, D, h, w) x context (B, V, C, h, w) into
        (B, C, n, n); only the frustum points inside the grid are formed."""
        B, V, D, h, w = depth.shape
        C = context.shape[2]
        keep = torch.nonzero(cells >= 0)[:, 0]
        pix = (keep // (D * h * w)) * (h * w) + keep % (h * w)                        # (v, i, j) of each point
        weight = depth.reshape(B, -1)[:, keep]                                        # (B, P)
        ctx = context.permute(0, 1, 3, 4, 2).reshape(B, V * h * w, C)[:, pix]        # (B, P, C)
        nn_ = self.n * self.n
        bev = ctx.new_zeros(B, nn_, C).index_add_(1, cells[keep], weight[..., None] * ctx)
        if self.cam.splat == "mean":
            bev = bev / counts.clamp_min(1).to(bev.dtype)[None, :, None]
        return bev.reshape(B, self.n, self.n, C).permute(0, 3, 1, 2)

    def forward(self, images: Tensor, K: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
        B, V, _, H, W = images.shape
        if not (torch.equal(K, K[:1].expand_as(K)) and torch.equal(T, T[:1].expand_as(T))):
            raise KdforgeError("camera student: every scene of a batch must share one camera rig")
        x = images
        if self.cam.camera_aware:
            x = torch.cat([x, self.rays(K, H, W).to(x.dtype)], 2)
        y = self.out(self.image(x.flatten(0, 1)))
        D = self.cam.depth_bins
        h, w = y.shape[-2:]
        logits = y[:, :D].reshape(B, V, D, h, w)
        context = y[:, D:].reshape(B, V, -1, h, w)
        cells, counts = self.cells(K[0], T[0])
        return self.splat(logits.softmax(2), context, cells, counts), logits


def bev_taps(det: BEVDetector, x: Tensor) -> dict[str, Tensor]:
    """The BEV CNN and heads of `det` on a BEV map x: block1..depth (after each conv block), neck, heatmap, reg."""
    out: dict[str, Tensor] = {}
    k = 0
    for layer in det.backbone:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            k += 1
            out[f"block{k}"] = x
    if x.shape[-1] != det.grid:
        x = F.interpolate(x, size=(det.grid, det.grid), mode="bilinear", align_corners=False)
    h = det.shared(x)
    out.update({"neck": x, "heatmap": det.heatmap(h), "reg": det.reg(h)})
    if getattr(det, "feature_dim", 0) > 0:
        out["feature"] = det.feature(x)
    return out


def lidar_taps(det: BEVDetector, points: Tensor, batch: Tensor, batch_size: int) -> dict[str, Tensor]:
    """A LiDAR detector's taps (`bev_taps` after its pillar encoder; neck / heatmap / reg equal its forward)."""
    return bev_taps(det, det.encoder(points, batch, batch_size))


class CameraBEVDetector(BEVDetector):
    """The BEV detector with a Lift-Splat view transformer instead of the pillar encoder."""

    feature_taps = ("lss", "neck", "heatmap", "reg", "depth")

    def __init__(self, num_classes: int, extent: float, cfg: DetectorConfig, cam: CameraConfig) -> None:
        super().__init__(num_classes, extent, cfg)
        cam.check("camera")
        self.cam = cam
        self.encoder = LiftSplat(cam, cfg.pfn, extent, cfg.voxel, cfg.z_range)

    def forward(self, images: Tensor, K: Tensor, T: Tensor) -> dict[str, Tensor]:     # type: ignore[override]
        bev, depth = self.encoder(images, K, T)
        return {"lss": bev, **bev_taps(self, bev), "depth": depth}


# ------------------------------------------------------------------------------------- data

_RENDERS: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = {}


def render_split(scenes: list[Scene], spec: SceneSpec, cam: CameraConfig, key: tuple | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(rgb (N, V, 3, H, W), K (N, V, 3, 3), T (N, V, 4, 4), depth targets (N, V, h, w), rendered depth (N, V, H, W))
    of every scene (scene i rendered with noise seed i); cached per process under `key` when given."""
    if key is not None and key in _RENDERS:
        return _RENDERS[key]
    rig = cam.rig()
    rgb, Ks, Ts, targets, depths = [], [], [], [], []
    for i, scene in enumerate(scenes):
        mv = render_views(scene, rig, spec, seed=i, noise=cam.noise)
        rgb.append(mv.rgb)
        Ks.append(mv.K)
        Ts.append(mv.T)
        depths.append(mv.depth)
        targets.append(depth_targets(mv, scene.points, cam))
    out = (torch.stack(rgb), torch.stack(Ks), torch.stack(Ts), torch.stack(targets), torch.stack(depths))
    if key is not None:
        if len(_RENDERS) >= 4:
            _RENDERS.pop(next(iter(_RENDERS)))
        _RENDERS[key] = out
    return out


class CameraSplit(SceneSplit):
    """A split's LiDAR points, boxes, CenterPoint targets and its camera renderings."""

    def __init__(self, scenes: list[Scene], num_classes: int, extent: float, cell: float, spec: SceneSpec,
                 cam: CameraConfig, key: tuple | None = None) -> None:
        super().__init__(scenes, num_classes, extent, cell)
        self.rgb, self.K, self.T, self.depth_target, self.depth = render_split(scenes, spec, cam, key)

    def camera_inputs(self, index: list[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.rgb[idx], self.K[idx], self.T[idx]


@dataclass
class CameraBEVBatch(BEVBatch):
    images: Tensor = field(default_factory=lambda: torch.zeros(0))
    K: Tensor = field(default_factory=lambda: torch.zeros(0))
    T: Tensor = field(default_factory=lambda: torch.zeros(0))
    depth: Tensor = field(default_factory=lambda: torch.zeros(0))     # (B, V, h, w) bin targets, -1 unknown
    boxes: list[Tensor] = field(default_factory=list)                 # ground-truth boxes (M, 7) of each scene
    progress: float = 0.0                                             # epochs done at this step (warm-ups)


# ------------------------------------------------------------------------------------- module and task


def depth_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the feature pixels with a known depth bin (0 when there is none)."""
    D = logits.shape[2]
    flat = logits.permute(0, 1, 3, 4, 2).reshape(-1, D)
    t = target.reshape(-1)
    if not (t >= 0).any():
        return logits.sum() * 0
    return F.cross_entropy(flat[t >= 0].float(), t[t >= 0])


class CameraBEVModule(BEVDetectorModule):
    """A camera student (trained) and an optional frozen LiDAR teacher; methods add `extra_losses`."""

    def __init__(self, student: CameraBEVDetector, teacher: BEVDetector | None = None) -> None:
        super().__init__(student, teacher)

    def teacher_keys(self) -> tuple[str, ...]:
        """The teacher taps a method reads (cached on the training scenes)."""
        return ("neck", "heatmap")

    def teacher_taps(self, points: Tensor, batch: Tensor, size: int) -> dict[str, Tensor]:
        """The frozen LiDAR teacher's taps a method reads (`teacher_keys`); cached on the training scenes."""
        out = lidar_taps(self.teacher, points, batch, size)
        return {k: out[k] for k in self.teacher_keys()}

    def forward(self, batch: CameraBEVBatch) -> Step:
        out = self.student(batch.images, batch.K, batch.T)
        losses = centerpoint_loss(out, batch.heat, batch.reg, batch.mask)
        w = self.student.cam.depth_weight
        if w > 0:
            losses["depth"] = w * depth_loss(out["depth"], batch.depth)
        groups = {k: "task" for k in losses}
        t_out = self.teacher_outputs(batch) if self.uses_teacher() else None
        extra = self.extra_losses(batch, out, t_out)
        losses.update(extra)
        groups.update({k: "distill" for k in extra})
        return Step(outputs=out["heatmap"].detach(), losses=losses, groups=groups)


class CameraBEVTask(BEVDetectionTask):
    """`BEVDetectionTask` with camera inputs: batches carry the views, the model sees images, K and T."""

    name = "pointcloud_camera_bev"

    def __init__(self, module: CameraBEVModule, train: list[Scene], test: list[Scene], class_names: list[str],
                 extent: float, batch_size: int, seed: int, eval_cfg: EvalConfig | None = None,
                 extra_result: dict[str, Any] | None = None, *, spec: SceneSpec, cam: CameraConfig,
                 data_key: tuple | None = None) -> None:
        self.spec, self.cam, self.data_key = spec, cam, data_key
        super().__init__(module, train, test, class_names, extent, batch_size, seed, eval_cfg, extra_result)
        k, cell = len(class_names), module.student.cell
        self.train = CameraSplit(train, k, extent, cell, spec, cam, None if data_key is None else (*data_key, "train"))
        self.test = CameraSplit(test, k, extent, cell, spec, cam, None if data_key is None else (*data_key, "test"))

    def batch(self, epoch: int, step: int, env: DistEnv) -> CameraBEVBatch:
        k = epoch * self.steps_per_epoch() + step
        idx = self.batch_index(epoch, step, env)
        points, batch = self.train.inputs(idx)
        images, K, T = self.train.camera_inputs(idx)
        d, s = self.device, self.train
        return CameraBEVBatch(points.to(d), batch.to(d), len(idx), s.heat[idx].to(d), s.reg[idx].to(d),
                              s.mask[idx].to(d), idx.to(d), images.to(d), K.to(d), T.to(d),
                              s.depth_target[idx].to(d), [s.boxes[i] for i in idx.tolist()],
                              k / self.steps_per_epoch())

    @torch.no_grad()
    def outputs(self, model: nn.Module, split: SceneSplit, index: list[int]) -> dict[str, Tensor]:
        was = model.training
        model.eval()
        if isinstance(model, CameraBEVDetector):
            images, K, T = split.camera_inputs(index)
            out = model(images.to(self.device), K.to(self.device), T.to(self.device))
        else:                                          # a LiDAR teacher
            points, batch = split.inputs(index)
            out = model(points.to(self.device), batch.to(self.device), len(index))
        model.train(was)
        return {k: v.cpu() for k, v in out.items()}

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        """The LiDAR task's metrics plus centre-distance AP (`cd_ap`, nuScenes' matching; per class `cd_ap_<c>`)."""
        out = super().evaluate(module, split, env, autocast)
        out.update(self.centre_ap(module.eval_model(), split))
        return out

    def centre_ap(self, model: nn.Module, split: str) -> dict[str, float]:
        data = self.split(split)
        cd = centre_distance_ap(self.predictions(model, data), list(zip(data.boxes, data.labels, strict=True)),
                                self.class_names)
        return {"cd_ap": cd.pop("mean"), **{f"cd_ap_{c}": v for c, v in cd.items()}}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "views": self.cam.views, "image": [self.cam.height, self.cam.width]}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """The LiDAR task's BEV picture (points for reference, ground truth, the camera student's predictions), then
        the first test scene's views underneath in a second file `<name>_views.png`."""
        super().draw(module, path)
        from kdforge.plotting import pyplot, save_png

        plt = pyplot()
        V = self.cam.views
        fig, axes = plt.subplots(1, V, figsize=(2.2 * V, 1.4), squeeze=False)
        for v, ax in enumerate(axes[0]):
            ax.imshow(self.test.rgb[0, v].permute(1, 2, 0).numpy())
            ax.set_title(f"view {v} (yaw {v * 360 / V:.0f})", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        save_png(fig, Path(path).with_name(Path(path).stem + "_views.png"), dpi=80)
        return True


# ------------------------------------------------------------------------------------- centre-distance AP


def centre_distance_ap(detections: list, ground_truth: list, class_names: list[str],
                       thresholds: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)) -> dict[str, float]:
    """nuScenes-style detection AP: a detection matches the nearest unmatched ground-truth centre of its class within
    d metres (BEV centre distance, greedy in score order), AP (KITTI R40 integration here) averaged over the
    thresholds d; {'<class>': %, 'mean': mean over classes with ground truth}."""
    def closeness(a: Tensor, b: Tensor) -> Tensor:          # in (0, 1], decreasing with the centre distance
        return 1.0 / (1.0 + torch.cdist(a[:, :2].double(), b[:, :2].double()))

    per = [detection_ap(detections, ground_truth, class_names, 1.0 / (1.0 + d) - 1e-12, closeness)
           for d in thresholds]
    out = {name: sum(p[name] for p in per) / len(per) for name in class_names if name in per[0]}
    out["mean"] = sum(out.values()) / len(out) if out else 0.0
    return out
