"""Pinhole multi-camera renderings of the procedural point-cloud scenes (RGB, depth, labels), by ray casting.

Cross-modal methods (camera students of a LiDAR teacher, 2D features distilled onto points) need
images of the same world the points sample. Every pixel's ray is intersected with the scene's
analytic geometry -- the ground plane z = -sensor_height, each oriented box (slab test in the box
frame) and each clutter pole (a vertical cylinder with its top cap) -- and the nearest hit gives

* `depth`: distance along the optical axis (the ray direction has camera z = 1, so the ray
  parameter is the depth), 0 where nothing is hit within `max_depth` (sky);
* `semantic` (the `semantic_names(spec)` index, -1 for sky) and `instance` (the box index, -1 else);
* `rgb`: a category colour (jittered per instance, the same in every view of a scene) times
  Lambert shading from a fixed sun direction, a checker texture on the ground (so its perspective
  carries depth), a sky gradient, plus seeded Gaussian pixel noise.

Cameras (`CameraSpec`) sit in the lidar frame: yaw of the optical axis about +z from +x, pitch
downwards, a position, a horizontal field of view and an image size. `intrinsics` / `extrinsics`
give K and the camera-from-lidar T in OpenCV convention (x right, y down, z forward), exactly what
`geometry.project` / `geometry.unproject` take; pixel (col, row) covers [col, col + 1) x [row, row + 1).
`visibility` tells which lidar points each camera actually sees (a z-buffer test against the
rendered depth), so 2D features can be back-projected onto visible points only (averaged over the
views that see a point); `point_pixels` gives the first view that sees each point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.pointcloud.geometry import project
from kdforge.tasks.pointcloud.scenes import Scene, SceneSpec

__all__ = ["CameraSpec", "MultiView", "camera_rig", "extrinsics", "intrinsics", "point_pixels", "render_views",
           "rig_from_spec", "visibility"]

_CATEGORY_COLOURS = {"car": (0.78, 0.16, 0.14), "pedestrian": (0.20, 0.36, 0.82), "cyclist": (0.88, 0.72, 0.12)}
_FALLBACK_COLOUR = (0.6, 0.3, 0.7)
_CLUTTER_COLOUR = (0.22, 0.55, 0.20)
_GROUND_COLOURS = (0.40, 0.47)               # the two checker tones of the ground (1 m squares)
_SKY_TOP, _SKY_HORIZON = (0.55, 0.72, 0.95), (0.82, 0.88, 0.96)
_SUN = (-0.35, -0.25, 0.90)                  # direction towards the light (normalised below)


@dataclass
class CameraSpec:
    yaw: float = 0.0                                      # degrees, optical axis heading about +z from +x
    pitch: float = 5.0                                    # degrees, positive looks down
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)   # camera centre in the lidar frame (m)
    fov: float = 70.0                                     # horizontal field of view (degrees)
    width: int = 96                                       # pixels
    height: int = 48

    def check(self) -> None:
        if not 1.0 <= self.fov < 179.0 or self.width < 2 or self.height < 2 or len(self.position) != 3:
            raise KdforgeError(f"camera: need 1 <= fov < 179, width and height >= 2 and a 3-d position, got {self}")
        if abs(self.pitch) >= 89.0:
            raise KdforgeError(f"camera: |pitch| must be < 89 degrees, got {self.pitch}")


def camera_rig(n: int = 6, fov: float = 70.0, width: int = 96, height: int = 48, pitch: float = 5.0,
               first_yaw: float = 0.0) -> list[CameraSpec]:
    """`n` cameras at the lidar origin, yaws first_yaw + k * 360 / n (n = 6, fov 70: all round, overlapping)."""
    if n < 1:
        raise KdforgeError(f"camera rig: need at least one camera, got {n}")
    return [CameraSpec(yaw=first_yaw + k * 360.0 / n, pitch=pitch, fov=fov, width=width, height=height)
            for k in range(n)]


def rig_from_spec(spec: SceneSpec) -> list[CameraSpec]:
    """The cameras a scene description lists (`SceneSpec.cameras`, CameraSpec fields each); one-line errors."""
    names = {f.name for f in fields(CameraSpec)}
    cams = []
    for i, entry in enumerate(spec.cameras):
        unknown = sorted(set(entry) - names)
        if unknown:
            raise KdforgeError(f"scene cameras[{i}]: unknown field(s) {unknown}; known: {sorted(names)}")
        cam = CameraSpec(**{**entry, **({"position": tuple(entry["position"])} if "position" in entry else {})})
        cam.check()
        cams.append(cam)
    return cams


def intrinsics(cam: CameraSpec) -> Tensor:
    """(3, 3) pinhole K: square pixels, principal point at the image centre."""
    cam.check()
    f = 0.5 * cam.width / math.tan(math.radians(cam.fov) / 2)
    return torch.tensor([[f, 0.0, cam.width / 2], [0.0, f, cam.height / 2], [0.0, 0.0, 1.0]])


def _rotation(cam: CameraSpec) -> Tensor:
    """Rows: the camera's right, down and forward axes in the lidar frame (camera-from-lidar rotation)."""
    yaw, pitch = math.radians(cam.yaw), math.radians(cam.pitch)
    forward = torch.tensor([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), -math.sin(pitch)],
                           dtype=torch.float64)
    right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0], dtype=torch.float64)
    down = torch.linalg.cross(forward, right)
    return torch.stack([right, down, forward])


def extrinsics(cam: CameraSpec) -> Tensor:
    """(4, 4) camera-from-lidar transform (OpenCV camera frame: x right, y down, z forward)."""
    cam.check()
    R = _rotation(cam)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R
    T[:3, 3] = -R @ torch.tensor(cam.position, dtype=torch.float64)
    return T.float()


@dataclass
class MultiView:
    """V rendered views of one scene."""

    rgb: Tensor        # (V, 3, H, W) float32 in [0, 1]
    depth: Tensor      # (V, H, W) float32, metres along the optical axis, 0 = nothing hit
    semantic: Tensor   # (V, H, W) long, semantic_names index, -1 sky
    instance: Tensor   # (V, H, W) long, box index, -1 ground / clutter / sky
    K: Tensor          # (V, 3, 3)
    T: Tensor          # (V, 4, 4) camera-from-lidar


def _rays(cam: CameraSpec) -> tuple[Tensor, Tensor]:
    """Origin (3,) and directions (H*W, 3) in the lidar frame; each direction has camera z = 1."""
    K = intrinsics(cam).double()
    rows, cols = torch.meshgrid(torch.arange(cam.height, dtype=torch.float64) + 0.5,
                                torch.arange(cam.width, dtype=torch.float64) + 0.5, indexing="ij")
    d_cam = torch.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], torch.ones_like(cols)], -1)
    return torch.tensor(cam.position, dtype=torch.float64), d_cam.reshape(-1, 3) @ _rotation(cam)


def _hit_boxes(o: Tensor, d: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest entry t (P, M) of every ray into every box (inf where missed) and the entry normals (P, M, 3)."""
    P, M = len(d), len(boxes)
    if M == 0:
        return torch.full((P, 0), math.inf, dtype=d.dtype), torch.zeros(P, 0, 3, dtype=d.dtype)
    b = boxes.double()
    c, s = b[:, 6].cos(), b[:, 6].sin()
    rel = o[None] - b[:, :3]                                                      # (M, 3)
    o_box = torch.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)
    d_box = torch.stack([c[None] * d[:, :1] + s[None] * d[:, 1:2], -s[None] * d[:, :1] + c[None] * d[:, 1:2],
                         d[:, 2:3].expand(P, M)], -1)                             # (P, M, 3)
    d_safe = torch.where(d_box.abs() < 1e-12, torch.full_like(d_box, 1e-12), d_box)
    half = b[:, 3:6] / 2
    t1, t2 = (-half - o_box) / d_safe, (half - o_box) / d_safe
    t_lo, t_hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = t_lo.max(-1)
    t_far = t_hi.min(-1).values
    hit = (t_far >= t_near) & (t_near > 1e-6)
    t = torch.where(hit, t_near, torch.full_like(t_near, math.inf))
    sign = -torch.sign(d_box.gather(-1, axis[..., None]))[..., 0]
    n_box = F.one_hot(axis, 3).double() * sign[..., None]                         # in the box frame
    normals = torch.stack([c * n_box[..., 0] - s * n_box[..., 1], s * n_box[..., 0] + c * n_box[..., 1],
                           n_box[..., 2]], -1)
    return t, normals


def _hit_poles(o: Tensor, d: Tensor, poles: Tensor, ground_z: float) -> tuple[Tensor, Tensor]:
    """Nearest hit t (P,) of every ray on any clutter pole (side or top cap; inf where missed) and its normal."""
    P = len(d)
    best = torch.full((P,), math.inf, dtype=d.dtype)
    normal = torch.zeros(P, 3, dtype=d.dtype)
    for x, y, r, h in poles.double().tolist():
        p = o[:2] - torch.tensor([x, y], dtype=d.dtype)
        a = (d[:, :2] ** 2).sum(1).clamp_min(1e-12)
        b = 2 * (d[:, :2] @ p)
        disc = b ** 2 - 4 * a * (p @ p - r * r)
        t_side = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
        z = o[2] + t_side * d[:, 2]
        side = (disc >= 0) & (t_side > 1e-6) & (z >= ground_z) & (z <= ground_z + h)
        t_side = torch.where(side, t_side, torch.full_like(t_side, math.inf))
        t_cap = (ground_z + h - o[2]) / torch.where(d[:, 2].abs() < 1e-12, torch.full_like(d[:, 2], 1e-12), d[:, 2])
        xy = o[:2] + t_cap[:, None] * d[:, :2]
        cap = (t_cap > 1e-6) & (((xy - torch.tensor([x, y], dtype=d.dtype)) ** 2).sum(1) <= r * r)
        t_cap = torch.where(cap, t_cap, torch.full_like(t_cap, math.inf))
        side_n = torch.cat([(o[:2] + t_side[:, None] * d[:, :2] - torch.tensor([x, y], dtype=d.dtype)) / r,
                            torch.zeros(P, 1, dtype=d.dtype)], 1)
        cap_n = torch.tensor([0.0, 0.0, 1.0], dtype=d.dtype).expand(P, 3)
        t_pole = torch.minimum(t_side, t_cap)
        n_pole = torch.where((t_cap < t_side)[:, None], cap_n, side_n)
        closer = t_pole < best
        best = torch.where(closer, t_pole, best)
        normal = torch.where(closer[:, None], n_pole, normal)
    return best, normal


def _instance_colours(scene: Scene, spec: SceneSpec, seed: int) -> Tensor:
    """(M, 3) per-box colours: the category colour with a seeded per-instance jitter (same in every view)."""
    g = seeded_generator(seed, 977, 31)
    base = torch.tensor([_CATEGORY_COLOURS.get(spec.categories[int(c)], _FALLBACK_COLOUR) for c in scene.labels],
                        dtype=torch.float64).reshape(-1, 3)
    jitter = 1 + 0.15 * (2 * torch.rand(len(base), 3, generator=g, dtype=torch.float64) - 1)
    return (base * jitter).clamp(0, 1)


def _render_one(scene: Scene, spec: SceneSpec, cam: CameraSpec, colours: Tensor, max_depth: float,
                g: torch.Generator, noise: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    o, d = _rays(cam)
    P, k = len(d), len(spec.categories)
    ground_z = -spec.sensor_height
    t_ground = torch.where(d[:, 2] < -1e-12, (ground_z - o[2]) / d[:, 2].clamp(max=-1e-12),
                           torch.full((P,), math.inf, dtype=d.dtype))
    t_box, n_box = _hit_boxes(o, d, scene.boxes)
    t_pole, n_pole = _hit_poles(o, d, scene.clutter, ground_z)
    if t_box.shape[1]:
        t_obj, which = t_box.min(1)
        n_obj = n_box[torch.arange(P), which]
    else:
        t_obj, which, n_obj = torch.full((P,), math.inf, dtype=d.dtype), torch.zeros(P, dtype=torch.long), n_pole
    t_all = torch.stack([t_ground, t_obj, t_pole], 1)
    t, kind = t_all.min(1)                                    # 0 ground, 1 box, 2 pole
    hit = t <= max_depth
    point = o + t.clamp(max=max_depth)[:, None] * d
    normal = torch.where((kind == 1)[:, None], n_obj, torch.where((kind == 2)[:, None], n_pole,
                                                                  torch.tensor([0.0, 0.0, 1.0], dtype=d.dtype)))
    sun = torch.tensor(_SUN, dtype=d.dtype)
    shade = 0.4 + 0.6 * (normal @ (sun / sun.norm())).clamp(min=0)
    checker = ((point[:, 0].floor() + point[:, 1].floor()) % 2)[:, None]
    ground_rgb = (_GROUND_COLOURS[0] + (_GROUND_COLOURS[1] - _GROUND_COLOURS[0]) * checker).expand(P, 3)
    box_rgb = colours[which] if len(colours) else torch.zeros(P, 3, dtype=d.dtype)
    surface = torch.where((kind == 1)[:, None], box_rgb,
                          torch.where((kind == 2)[:, None], torch.tensor(_CLUTTER_COLOUR, dtype=d.dtype),
                                      ground_rgb))
    elevation = (d[:, 2] / d.norm(dim=1)).clamp(0, 1)[:, None].pow(0.5)
    sky = torch.tensor(_SKY_HORIZON, dtype=d.dtype) + elevation * (
        torch.tensor(_SKY_TOP, dtype=d.dtype) - torch.tensor(_SKY_HORIZON, dtype=d.dtype))
    rgb = torch.where(hit[:, None], surface * shade[:, None], sky)
    rgb = (rgb + noise * torch.randn(P, 3, generator=g, dtype=d.dtype)).clamp(0, 1)
    semantic = torch.where(kind == 0, 0, torch.where(kind == 2, k + 1, 1 + scene.labels[which] if len(scene.labels)
                                                     else torch.zeros(P, dtype=torch.long)))
    semantic = torch.where(hit, semantic, -1)
    instance = torch.where(hit & (kind == 1), which, -1)
    depth = torch.where(hit, t, torch.zeros_like(t))
    H, W = cam.height, cam.width
    return (rgb.T.reshape(3, H, W).float(), depth.reshape(H, W).float(), semantic.reshape(H, W).long(),
            instance.reshape(H, W).long())


def render_views(scene: Scene, cams: list[CameraSpec], spec: SceneSpec, seed: int = 0, noise: float = 0.02,
                 max_depth: float | None = None) -> MultiView:
    """Render `scene` from every camera (same image size for all); a pure function of (scene, cams, seed).

    Give each scene its own `seed` (e.g. its index) so pixel noise and instance colours differ
    between scenes; `max_depth` defaults to twice the scene's extent.
    """
    if not cams:
        raise KdforgeError("render_views: no cameras given")
    sizes = {(c.width, c.height) for c in cams}
    if len(sizes) != 1:
        raise KdforgeError(f"render_views: all cameras need one image size, got {sorted(sizes)}")
    colours = _instance_colours(scene, spec, seed)
    limit = 2 * spec.extent if max_depth is None else max_depth
    out = [_render_one(scene, spec, cam, colours, limit, seeded_generator(seed, 977, 32 + v), noise)
           for v, cam in enumerate(cams)]
    rgb, depth, semantic, instance = (torch.stack(parts) for parts in zip(*out, strict=True))
    return MultiView(rgb, depth, semantic, instance, torch.stack([intrinsics(c) for c in cams]),
                     torch.stack([extrinsics(c) for c in cams]))


def visibility(points: Tensor, views: MultiView, tolerance: float = 0.3) -> tuple[Tensor, Tensor]:
    """Every view's pixel of each lidar point and whether it sees it: (uv (V, N, 2) as (col, row), visible (V, N)).

    A point is visible in a view when it projects inside the image in front of the camera and no
    rendered surface lies more than `tolerance` metres in front of it in the pixel's 3x3
    neighbourhood (the farthest of the nine depths counts, so grazing ground, whose depth changes
    by metres within one pixel, is not mistaken for an occluder; an occluder's one-pixel rim may
    leak). Use it to average a point's 2D features over all the views that see it.
    """
    if points.dim() != 2 or points.shape[1] < 3:
        raise KdforgeError(f"point visibility: points must be (N, >= 3), got {tuple(points.shape)}")
    V, H, W = views.depth.shape
    far = torch.where(views.depth > 0, views.depth, torch.full_like(views.depth, math.inf))
    far = F.max_pool2d(far[:, None], 3, stride=1, padding=1)[:, 0]
    uvs, seen = [], []
    for v in range(V):
        pix, depth = project(points[:, :3].float(), views.K[v], views.T[v])
        col, row = pix[:, 0].floor().long(), pix[:, 1].floor().long()
        inside = (depth > 1e-3) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        c, r = col.clamp(0, W - 1), row.clamp(0, H - 1)
        ok = inside & (depth <= far[v, r, c] + tolerance)
        uvs.append(torch.where(ok[:, None], torch.stack([c, r], 1), 0))
        seen.append(ok)
    return torch.stack(uvs), torch.stack(seen)


def point_pixels(points: Tensor, views: MultiView, tolerance: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """Which pixel of which view sees each lidar point: (view (N,), uv (N, 2) as (col, row), visible (N,)).

    `visibility`'s test; the first view (lowest index) that sees a point wins; unseen points get
    view 0, uv (0, 0).
    """
    uv, seen = visibility(points, views, tolerance)
    visible = seen.any(0)
    view = torch.where(visible, seen.float().argmax(0), 0)
    return view, uv[view, torch.arange(len(view))], visible
