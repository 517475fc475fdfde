"""Procedural LiDAR sequences: frame 0 is the scene, boxes move by v * t * dt along their heading, static points stay,
object points are re-sampled on the moved boxes, purity in (seed, index, frames), one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.scenes import SceneSpec, make_scene
from kdforge.tasks.pointcloud.sequences import MotionSpec, make_sequence, points_in_boxes

SPEC = SceneSpec(min_objects=6, max_objects=8)


def test_frame0_is_the_scene_and_boxes_move_by_v_dt() -> None:
    seq = make_sequence(SPEC, 3, 2, frames=4)
    scene = make_scene(SPEC, 3, 2)
    f0 = seq.frames[0]
    assert torch.equal(f0.points, scene.points) and torch.equal(f0.boxes, scene.boxes)
    assert torch.equal(seq.labels, scene.labels)
    for t, frame in enumerate(seq.frames):
        for i, (b0, bt) in enumerate(zip(scene.boxes.tolist(), frame.boxes.tolist(), strict=True)):
            vx, vy = seq.velocity[i].tolist()
            assert bt[0] == pytest.approx(b0[0] + vx * t * seq.dt, abs=1e-4)     # hand: x + v t dt
            assert bt[1] == pytest.approx(b0[1] + vy * t * seq.dt, abs=1e-4)
            assert bt[2:] == pytest.approx(b0[2:], abs=1e-6)
            speed = math.hypot(vx, vy)
            if speed > 0:       # along the heading (+x axis of the box)
                assert vx / speed == pytest.approx(math.cos(b0[6]), abs=1e-5)
                assert vy / speed == pytest.approx(math.sin(b0[6]), abs=1e-5)


def test_static_points_unchanged_and_object_points_on_their_moved_box() -> None:
    seq = make_sequence(SPEC, 0, 5, frames=3)
    k = len(SPEC.categories)
    f0 = seq.frames[0]
    still0 = f0.point_track < 0
    for frame in seq.frames[1:]:
        still = frame.point_track < 0
        assert torch.equal(frame.points[still], f0.points[still0])          # ground and clutter unchanged
        obj = frame.points[~still]
        assert ((frame.point_labels[~still] >= 1) & (frame.point_labels[~still] <= k)).all()
        inside = points_in_boxes(obj, frame.boxes, margin=0.25)
        assert (inside == frame.point_track[~still]).float().mean() > 0.97    # range noise may push a few out
    assert seq.static.any() and (~seq.static).any()
    moving = torch.nonzero(~seq.static).flatten()
    speeds = seq.velocity.norm(dim=1)
    for i in moving.tolist():
        name = SPEC.categories[int(seq.labels[i])]
        lo, hi = MotionSpec().speeds[name]
        assert lo <= float(speeds[i]) <= hi


def test_pure_function_of_seed_index_frames() -> None:
    a, b = make_sequence(SPEC, 1, 4, frames=3), make_sequence(SPEC, 1, 4, frames=3)
    for fa, fb in zip(a.frames, b.frames, strict=True):
        assert torch.equal(fa.points, fb.points) and torch.equal(fa.point_track, fb.point_track)
    longer = make_sequence(SPEC, 1, 4, frames=5)
    assert torch.equal(longer.frames[2].points, a.frames[2].points)
    other = make_sequence(SPEC, 1, 5, frames=3)
    assert not torch.equal(other.frames[1].points, a.frames[1].points)


def test_points_in_boxes_hand_case() -> None:
    box = torch.tensor([[2.0, 0.0, 0.0, 4.0, 2.0, 2.0, math.pi / 2]])    # rotated: 2 m along x, 4 m along y
    pts = torch.tensor([[2.0, 1.9, 0.0], [2.9, 0.0, 0.0], [3.1, 0.0, 0.0], [2.0, 0.0, 1.2]])
    assert points_in_boxes(pts, box).tolist() == [0, 0, -1, -1]
    assert points_in_boxes(pts, box, margin=0.25).tolist() == [0, 0, 0, 0]


def test_bad_motion_fails_in_one_line() -> None:
    with pytest.raises(KdforgeError, match="static_fraction"):
        make_sequence(SPEC, 0, 0, motion=MotionSpec(static_fraction=1.5))
    with pytest.raises(KdforgeError, match="speeds"):
        make_sequence(SPEC, 0, 0, motion=MotionSpec(speeds={"car": [1.0, 2.0]}))
    with pytest.raises(KdforgeError, match="frames"):
        make_sequence(SPEC, 0, 0, frames=0)
