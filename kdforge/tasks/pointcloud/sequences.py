"""Short LiDAR sequences with moving and parked objects, grown from one procedural scene.

`make_sequence(spec, seed, index, frames, motion)` is a pure function of (seed, index, frames):
frame 0 is `make_scene(spec, seed, index)` exactly; every object gets a velocity (a fraction
`motion.static_fraction` is parked, speed 0; the others drive along their heading +x axis at a
category speed drawn uniformly from `motion.speeds`, cars faster than cyclists faster than
pedestrians), and frame t (time t * dt) moves each box by v * t * dt and re-samples that object's
points with a generator seeded by (seed, index, t) through the scene's own sensor model
(sensor-facing faces, 1/r^2 density, range noise, dropout, points outside the extent dropped).
Ground and clutter points are the frame-0 points, unchanged (a static world seen by a static
sensor). Boxes keep their track id (their row in frame 0); a box whose centre leaves the extent
is still listed (its points are cropped) so track ids stay aligned with rows.

Which frame-0 points belong to which object is recovered by a point-in-box test on the object
boxes enlarged by `_MARGIN` (boxes of a scene never overlap: `scenes._place` keeps their
circumcircles apart). Moving objects may drive into each other in later frames; nothing stops that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.pointcloud.scenes import (
    CATEGORIES,
    Scene,
    SceneSpec,
    _box_surface,
    _count,
    _range_noise,
    make_scene,
)

__all__ = ["Frame", "MotionSpec", "Sequence", "boxes_at", "make_sequence", "points_in_boxes"]

_MARGIN = 0.25     # metres the box is enlarged by when frame-0 points are assigned to objects


@dataclass
class MotionSpec:
    """How objects move: the parked fraction, speed ranges per category (m/s) and the frame interval (s)."""

    static_fraction: float = 0.5
    dt: float = 0.2
    speeds: dict[str, list[float]] = field(default_factory=lambda: {"car": [4.0, 8.0], "cyclist": [2.0, 4.0],
                                                                    "pedestrian": [1.0, 2.0]})

    def check(self, categories: list[str]) -> None:
        if not 0 <= self.static_fraction <= 1 or self.dt <= 0:
            raise KdforgeError(f"motion: need 0 <= static_fraction <= 1 and dt > 0, got {self.static_fraction}, "
                               f"{self.dt}")
        for c in categories:
            lo_hi = self.speeds.get(c)
            if lo_hi is None or len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
                raise KdforgeError(f"motion.speeds[{c!r}] must be [low, high] with 0 <= low <= high, got {lo_hi}")


@dataclass
class Frame:
    points: Tensor           # (N, 4) x, y, z, intensity
    point_labels: Tensor     # (N,) semantic label (scenes.semantic_names)
    point_track: Tensor      # (N,) track id (row of `boxes`) of object points, -1 for ground / clutter
    boxes: Tensor            # (M, 7) every track's box at this frame's time


@dataclass
class Sequence:
    frames: list[Frame]
    labels: Tensor           # (M,) category of each track
    velocity: Tensor         # (M, 2) m/s in the lidar frame
    dt: float
    clutter: Tensor = field(default_factory=lambda: torch.zeros(0, 4))    # frame 0's poles (Scene.clutter)

    def scene(self, t: int = 0) -> Scene:
        """Frame `t` as a `Scene` (boxes at that time, the static poles), e.g. for `cameras.render_views`."""
        f = self.frames[t]
        return Scene(f.points, f.point_labels, f.boxes, self.labels, self.clutter)

    @property
    def static(self) -> Tensor:
        """(M,) bool: parked objects (speed 0)."""
        return self.velocity.norm(dim=1) == 0


def boxes_at(boxes: Tensor, velocity: Tensor, time: float) -> Tensor:
    """Boxes (M, 7) moved by velocity (M, 2) * time (seconds); size, height and heading unchanged."""
    out = boxes.clone()
    out[:, :2] = boxes[:, :2] + velocity.to(boxes.dtype) * time
    return out


def points_in_boxes(points: Tensor, boxes: Tensor, margin: float = 0.0) -> Tensor:
    """(N,) index of the (first) box (M, 7) each point (N, >= 3) lies in, boxes enlarged by `margin`; -1 none."""
    out = torch.full((len(points),), -1, dtype=torch.long)
    if len(boxes) == 0 or len(points) == 0:
        return out
    p = points[:, :3].double()
    b = boxes.double()
    d = p[:, None, :] - b[None, :, :3]                          # (N, M, 3)
    c, s = b[:, 6].cos(), b[:, 6].sin()
    lx = d[..., 0] * c + d[..., 1] * s
    ly = -d[..., 0] * s + d[..., 1] * c
    inside = ((lx.abs() <= b[:, 3] / 2 + margin) & (ly.abs() <= b[:, 4] / 2 + margin)
              & (d[..., 2].abs() <= b[:, 5] / 2 + margin))
    hit = inside.any(1)
    out[hit] = inside[hit].double().argmax(1)
    return out


def _velocities(g: torch.Generator, scene: Scene, spec: SceneSpec, motion: MotionSpec) -> Tensor:
    v = torch.zeros(len(scene.boxes), 2, dtype=torch.float64)
    for i, (box, lab) in enumerate(zip(scene.boxes.tolist(), scene.labels.tolist(), strict=True)):
        parked = float(torch.rand(1, generator=g, dtype=torch.float64)) < motion.static_fraction
        lo, hi = motion.speeds[spec.categories[lab]]
        speed = lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=torch.float64))
        if not parked:
            v[i] = torch.tensor([math.cos(box[6]), math.sin(box[6])], dtype=torch.float64) * speed
    return v


def _object_points(g: torch.Generator, spec: SceneSpec, boxes: Tensor, labels: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(points (N, 4), semantic (N,), track (N,)) of the objects, the scene's sensor model, dropout and crop."""
    chunks, sem, track, inten = [], [], [], []
    for i, (box, c) in enumerate(zip(boxes.double(), labels.tolist(), strict=True)):
        cs = CATEGORIES[spec.categories[c]]
        pts = _range_noise(g, _box_surface(g, box, _count(g, cs.points, float(box[:2].norm()), spec)), spec.noise)
        chunks.append(pts)
        sem.append(torch.full((len(pts),), 1 + c, dtype=torch.long))
        track.append(torch.full((len(pts),), i, dtype=torch.long))
        inten.append((cs.intensity + 0.1 * torch.randn(len(pts), generator=g, dtype=torch.float64)).clamp(0, 1))
    if not chunks:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    xyz, s, t, it = torch.cat(chunks), torch.cat(sem), torch.cat(track), torch.cat(inten)
    keep = (torch.rand(len(xyz), generator=g) >= spec.dropout) & (xyz[:, :2].abs() < spec.extent).all(1)
    return torch.cat([xyz[keep], it[keep, None]], 1).float(), s[keep], t[keep]


def make_sequence(spec: SceneSpec, seed: int, index: int, frames: int = 6, motion: MotionSpec | None = None
                  ) -> Sequence:
    """Sequence `index` of the stream seeded by `seed`: `frames` frames, frame 0 = make_scene(spec, seed, index)."""
    motion = motion or MotionSpec()
    motion.check(spec.categories)
    if frames < 1:
        raise KdforgeError(f"a sequence needs frames >= 1, got {frames}")
    scene = make_scene(spec, seed, index)
    velocity = _velocities(seeded_generator(seed, 7927, index), scene, spec, motion)
    k = len(spec.categories)
    objects = (scene.point_labels >= 1) & (scene.point_labels <= k)
    track0 = torch.where(objects, points_in_boxes(scene.points, scene.boxes, _MARGIN), -1)
    out = [Frame(scene.points, scene.point_labels, track0, scene.boxes)]
    still = ~objects
    for t in range(1, frames):
        boxes = boxes_at(scene.boxes, velocity, t * motion.dt)
        pts, sem, trk = _object_points(seeded_generator(seed, 7933, index, t), spec, boxes, scene.labels)
        out.append(Frame(torch.cat([pts, scene.points[still]]), torch.cat([sem, scene.point_labels[still]]),
                         torch.cat([trk, torch.full((int(still.sum()),), -1, dtype=torch.long)]), boxes))
    return Sequence(out, scene.labels, velocity.float(), motion.dt, scene.clutter)
