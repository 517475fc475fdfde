"""Procedural LiDAR scenes from one scene description: ground, objects, clutter, boxes, point labels.

A `SceneSpec` describes the world (square BEV extent around the sensor, object categories with
their sizes and reflectivity, object counts, clutter, sensor noise and dropout); `make_scene(spec,
seed, index)` draws one `Scene`, a pure function of (seed, index), so a split grows without
changing its earlier scenes. Points mimic a spinning sensor at the origin: objects are sampled on
the faces of their oriented box that face the sensor (self-occlusion), with a density falling off
as 1/r^2 beyond `ref_range`, Gaussian range noise and random dropout; the ground plane thins out
the same way. Every point carries a semantic label (`semantic_names(spec)`: ground, the object
categories, clutter).

Boxes are (x, y, z, l, w, h, yaw) in metres / radians, z the box centre, yaw about +z from +x
(the lidar frame KITTI boxes are converted into). Clutter poles are vertical cylinders kept as
(x, y, radius, height) in `Scene.clutter`, so cameras (`cameras.render_views`) see the same world the
points sample; `SceneSpec.cameras` holds the rig (`cameras.CameraSpec` fields per camera).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["CATEGORIES", "CategorySpec", "Scene", "SceneSpec", "make_scene", "procedural_scenes", "semantic_names"]


@dataclass
class CategorySpec:
    name: str
    size: tuple[float, float, float]     # mean (l, w, h) in metres
    jitter: float = 0.1                  # relative size spread (uniform +-)
    points: int = 120                    # surface points at `ref_range` (before dropout)
    intensity: float = 0.5               # mean reflectivity in [0, 1]


CATEGORIES: dict[str, CategorySpec] = {
    "car": CategorySpec("car", (3.9, 1.6, 1.5), 0.1, 160, 0.6),
    "pedestrian": CategorySpec("pedestrian", (0.8, 0.6, 1.75), 0.15, 50, 0.3),
    "cyclist": CategorySpec("cyclist", (1.8, 0.6, 1.7), 0.1, 70, 0.45),
}


@dataclass
class SceneSpec:
    """What a procedural scene holds; defaults are a 32 m x 32 m patch around the sensor."""

    categories: list[str] = field(default_factory=lambda: ["car", "pedestrian", "cyclist"])
    extent: float = 16.0                 # scene covers x, y in [-extent, extent]
    min_objects: int = 2
    max_objects: int = 8
    clutter: int = 3                     # up to this many poles / bushes (hard negatives)
    ground_points: int = 1500
    sensor_height: float = 1.7           # the ground is the plane z = -sensor_height
    ref_range: float = 6.0               # full point density up to this range, 1/r^2 beyond
    noise: float = 0.03                  # range noise (std, metres)
    dropout: float = 0.1                 # fraction of returns lost
    cameras: list[dict] = field(default_factory=list)   # CameraSpec fields per camera (cameras.rig_from_spec)

    def check(self) -> None:
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown or not self.categories:
            raise KdforgeError(f"scene categories must be a non-empty subset of {sorted(CATEGORIES)}, got "
                               f"{self.categories}")
        if not 0 <= self.min_objects <= self.max_objects or self.extent < 4 or not 0 <= self.dropout < 1:
            raise KdforgeError("scene spec needs 0 <= min_objects <= max_objects, extent >= 4 and 0 <= dropout < 1")


@dataclass
class Scene:
    points: Tensor           # (N, 4) float32: x, y, z, intensity
    point_labels: Tensor     # (N,) long: index into semantic_names(spec)
    boxes: Tensor            # (M, 7) float32: x, y, z, l, w, h, yaw
    labels: Tensor           # (M,) long: index into spec.categories
    clutter: Tensor = field(default_factory=lambda: torch.zeros(0, 4))   # (C, 4): x, y, radius, height of each pole


def semantic_names(spec: SceneSpec) -> list[str]:
    return ["ground", *spec.categories, "clutter"]


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _count(g: torch.Generator, base: float, distance: float, spec: SceneSpec) -> int:
    falloff = min(1.0, (spec.ref_range / max(distance, 1e-6)) ** 2)
    return int(torch.poisson(torch.tensor([base * falloff]), generator=g).item())


def _box_surface(g: torch.Generator, box: Tensor, n: int) -> Tensor:
    """`n` points on the faces of the oriented box that face the sensor at the origin (top face included)."""
    x, y, z, l, w, h, yaw = box.tolist()
    c, s = math.cos(yaw), math.sin(yaw)
    # faces in the box frame: (normal, centre offset, the two in-face axes with half extents)
    faces = [((1, 0, 0), (l / 2, 0, 0), (0, w / 2, 0), (0, 0, h / 2)),
             ((-1, 0, 0), (-l / 2, 0, 0), (0, w / 2, 0), (0, 0, h / 2)),
             ((0, 1, 0), (0, w / 2, 0), (l / 2, 0, 0), (0, 0, h / 2)),
             ((0, -1, 0), (0, -w / 2, 0), (l / 2, 0, 0), (0, 0, h / 2)),
             ((0, 0, 1), (0, 0, h / 2), (l / 2, 0, 0), (0, w / 2, 0))]
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    centre = torch.tensor([x, y, z], dtype=torch.float64)
    visible, areas = [], []
    for normal, offset, a, b in faces:
        n_world = rot @ torch.tensor(normal, dtype=torch.float64)
        f_world = centre + rot @ torch.tensor(offset, dtype=torch.float64)
        if float(n_world @ (-f_world)) > 0:        # the face looks towards the sensor
            axes = [rot @ torch.tensor(v, dtype=torch.float64) for v in (a, b)]
            visible.append((f_world, axes[0], axes[1]))
            areas.append(4 * math.hypot(*a) * math.hypot(*b))
    if not visible or n == 0:
        return torch.zeros(0, 3, dtype=torch.float64)
    pick = torch.multinomial(torch.tensor(areas), n, replacement=True, generator=g)
    uv = 2 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 1
    f = torch.stack([visible[i][0] for i in pick.tolist()])
    a = torch.stack([visible[i][1] for i in pick.tolist()])
    b = torch.stack([visible[i][2] for i in pick.tolist()])
    return f + uv[:, :1] * a + uv[:, 1:] * b


def _range_noise(g: torch.Generator, pts: Tensor, std: float) -> Tensor:
    """Jitter each point along its ray from the sensor (range noise), as a real sensor does."""
    if std <= 0 or len(pts) == 0:
        return pts
    r = pts.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return pts + pts / r * std * torch.randn(len(pts), 1, generator=g, dtype=torch.float64)


def _place(g: torch.Generator, spec: SceneSpec, sizes: list[tuple[float, float, float]]) -> list[Tensor]:
    """Non-overlapping oriented boxes (rejection sampling on BEV circumcircles), away from the sensor."""
    placed: list[Tensor] = []
    margin = 1.0
    for l, w, h in sizes:
        radius = 0.5 * math.hypot(l, w)
        for _ in range(50):
            x, y = _uniform(g, -spec.extent + margin + radius, spec.extent - margin - radius, 2).tolist()
            if math.hypot(x, y) < 3.0:
                continue
            if all(math.hypot(x - float(p[0]), y - float(p[1])) > radius + 0.5 * math.hypot(p[3], p[4]) + 0.3
                   for p in placed):
                yaw = float(_uniform(g, -math.pi, math.pi))
                placed.append(torch.tensor([x, y, -spec.sensor_height + h / 2, l, w, h, yaw], dtype=torch.float64))
                break
    return placed


def make_scene(spec: SceneSpec, seed: int, index: int) -> Scene:
    """Scene `index` of the stream seeded by `seed` (a pure function of both)."""
    spec.check()
    g = seeded_generator(seed, 7919, index)
    k = len(spec.categories)
    n_obj = int(torch.randint(spec.min_objects, spec.max_objects + 1, (1,), generator=g))
    cats = torch.randint(0, k, (n_obj,), generator=g).tolist()
    sizes = []
    for c in cats:
        cs = CATEGORIES[spec.categories[c]]
        sizes.append(tuple(float(v * (1 + _uniform(g, -cs.jitter, cs.jitter))) for v in cs.size))
    boxes = _place(g, spec, sizes)
    cats = cats[:len(boxes)]       # a box that found no free spot is dropped
    chunks, sem, inten = [], [], []
    for box, c in zip(boxes, cats, strict=True):
        cs = CATEGORIES[spec.categories[c]]
        pts = _range_noise(g, _box_surface(g, box, _count(g, cs.points, float(box[:2].norm()), spec)), spec.noise)
        chunks.append(pts)
        sem.append(torch.full((len(pts),), 1 + c, dtype=torch.long))
        inten.append((cs.intensity + 0.1 * torch.randn(len(pts), generator=g, dtype=torch.float64)).clamp(0, 1))
    poles = []
    for _ in range(int(torch.randint(0, spec.clutter + 1, (1,), generator=g))):
        x, y = _uniform(g, -spec.extent + 1, spec.extent - 1, 2).tolist()
        r, h = float(_uniform(g, 0.15, 0.5)), float(_uniform(g, 1.0, 3.0))
        poles.append((x, y, r, h))
        n = _count(g, 40 * h, math.hypot(x, y), spec)
        ang = math.atan2(-y, -x) + _uniform(g, -math.pi / 2, math.pi / 2, n)      # the half facing the sensor
        zz = -spec.sensor_height + h * torch.rand(n, generator=g, dtype=torch.float64)
        pts = _range_noise(g, torch.stack([x + r * ang.cos(), y + r * ang.sin(), zz], 1), spec.noise)
        chunks.append(pts)
        sem.append(torch.full((n,), k + 1, dtype=torch.long))
        inten.append((0.4 + 0.15 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0, 1))
    ground = (2 * torch.rand(spec.ground_points, 2, generator=g, dtype=torch.float64) - 1) * spec.extent
    r = ground.norm(dim=1).clamp_min(1e-6)
    keep = torch.rand(len(ground), generator=g, dtype=torch.float64) < (spec.ref_range / r).clamp(max=1) ** 2 * 4
    ground = ground[keep]
    gz = -spec.sensor_height + spec.noise * torch.randn(len(ground), generator=g, dtype=torch.float64)
    chunks.append(torch.cat([ground, gz[:, None]], 1))
    sem.append(torch.zeros(len(ground), dtype=torch.long))
    inten.append((0.1 + 0.05 * torch.randn(len(ground), generator=g, dtype=torch.float64)).clamp(0, 1))
    xyz, labels, intensity = torch.cat(chunks), torch.cat(sem), torch.cat(inten)
    keep = torch.rand(len(xyz), generator=g) >= spec.dropout
    inside = (xyz[:, :2].abs() < spec.extent).all(1)
    keep &= inside
    points = torch.cat([xyz[keep], intensity[keep, None]], 1).float()
    box_t = torch.stack(boxes).float() if boxes else torch.zeros(0, 7)
    clutter = torch.tensor(poles, dtype=torch.float32).reshape(-1, 4)
    return Scene(points, labels[keep], box_t, torch.tensor(cats, dtype=torch.long), clutter)


def procedural_scenes(spec: SceneSpec, count: int, seed: int, start: int = 0) -> list[Scene]:
    """Scenes start .. start + count - 1 of the stream seeded by `seed`."""
    return [make_scene(spec, seed, i) for i in range(start, start + count)]
