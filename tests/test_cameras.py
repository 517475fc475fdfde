"""Multi-camera renderings of point-cloud scenes: camera model, ray-cast depth / labels, point visibility."""

import math

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.cameras import (
    CameraSpec,
    camera_rig,
    extrinsics,
    intrinsics,
    point_pixels,
    render_views,
    rig_from_spec,
    visibility,
)
from kdforge.tasks.pointcloud.geometry import project, unproject
from kdforge.tasks.pointcloud.scenes import Scene, SceneSpec, make_scene

pytest.importorskip("kornia")

SPEC = SceneSpec(categories=["car", "pedestrian"])


def _scene(boxes, labels, clutter=()):
    return Scene(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                 torch.tensor(boxes, dtype=torch.float32).reshape(-1, 7),
                 torch.tensor(labels, dtype=torch.long), torch.tensor(clutter, dtype=torch.float32).reshape(-1, 4))


def test_camera_model_points_along_axes_and_round_trips():
    cam = CameraSpec(yaw=90.0, pitch=0.0, position=(1.0, 2.0, 0.5), fov=90.0, width=64, height=32)
    K, T = intrinsics(cam), extrinsics(cam)
    assert torch.allclose(K[0, 0], torch.tensor(32.0)) and K[0, 2] == 32 and K[1, 2] == 16
    R = T[:3, :3]
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6) and torch.isclose(torch.linalg.det(R), torch.tensor(1.0))
    # yaw 90 looks along +y: a point 5 m ahead is at the principal point, depth 5; +x is to the camera's right
    pts = torch.tensor([[1.0, 7.0, 0.5], [2.0, 7.0, 0.5], [1.0, 7.0, -0.5]])
    uv, depth = project(pts, K, T)
    assert torch.allclose(uv[0], torch.tensor([32.0, 16.0]), atol=1e-4) and torch.allclose(depth, torch.full((3,), 5.0))
    assert uv[1, 0] > 32 and torch.isclose(uv[1, 0] - 32, torch.tensor(32.0 / 5), atol=1e-4)   # f * 1 m / 5 m
    assert uv[2, 1] > 16                                                   # lower in the world = lower in the image
    assert torch.allclose(unproject(uv, depth, K, T), pts, atol=1e-4)


def test_render_depth_and_labels_match_hand_geometry():
    cam = CameraSpec(yaw=0.0, pitch=0.0, fov=60.0, width=41, height=21)
    scene = _scene([[10.0, 0.0, -0.2, 4.0, 2.0, 3.0, 0.0]], [1],           # 3 m tall: the axis hits it
                   clutter=[[6.0, -3.0, 0.5, 3.0]])
    mv = render_views(scene, [cam], SPEC, noise=0.0)
    cy, cx = 10, 20                                      # centre pixel (odd sizes: its centre is on the axis)
    assert mv.depth[0, cy, cx] == pytest.approx(8.0, abs=1e-4)          # front face of the box at x = 10 - 2
    assert mv.semantic[0, cy, cx] == 2 and mv.instance[0, cy, cx] == 0  # pedestrian (label 1 -> semantic 2)
    # the bottom row looks down at angle a: the ground (1.7 m below) is at depth 1.7 / tan(a)
    f = 0.5 * 41 / math.tan(math.radians(30))
    tan_a = (20 + 0.5 - 10.5) / f
    assert mv.depth[0, 20, 0] == pytest.approx(1.7 / tan_a, rel=1e-4) and mv.semantic[0, 20, 0] == 0
    # the top row sees sky; the pole (x 6, y -3: right of the axis) has depth 6 - r along the ray through its axis
    assert mv.depth[0, 0].eq(0).all() and mv.semantic[0, 0].eq(-1).all() and mv.instance[0, 0].eq(-1).all()
    col = round(cx + f * 3.0 / 6.0 - 0.5)               # the column whose ray passes closest to the pole's axis
    pole = mv.semantic[0, :, col] == 3
    assert pole.any() and mv.instance[0, :, col][pole].eq(-1).all()
    ray_x = (col + 0.5 - 20.5) / f                       # camera x per unit depth at that column
    depth_axis = 6.0                                     # analytic nearest hit along that ray, circle (6, -3, r 0.5)
    d = torch.tensor([1.0, -ray_x])
    a, b, c = float(d @ d), float(-2 * d @ torch.tensor([6.0, -3.0])), 36.0 + 9.0 - 0.25
    t = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a)
    assert mv.depth[0, cy, col] == pytest.approx(t, abs=1e-3) and t < depth_axis
    assert torch.equal(mv.rgb, render_views(scene, [cam], SPEC, noise=0.0).rgb)


def test_point_visibility_and_labels_on_a_procedural_scene():
    spec = SceneSpec()
    scene = make_scene(spec, 0, 3)
    assert scene.clutter.shape[1] == 4 and len(scene.clutter) >= 1
    cams = camera_rig(6)
    mv = render_views(scene, cams, spec, seed=3)
    assert mv.rgb.shape == (6, 3, 48, 96) and mv.rgb.min() >= 0 and mv.rgb.max() <= 1
    assert torch.equal(mv.rgb, render_views(scene, cams, spec, seed=3).rgb)
    assert not torch.equal(mv.rgb, render_views(scene, cams, spec, seed=4).rgb)
    view, uv, visible = point_pixels(scene.points, mv)
    assert visible.float().mean() > 0.7                 # six cameras all round see most returns
    seen = mv.semantic[view, uv[:, 1], uv[:, 0]]
    assert (seen[visible] == scene.point_labels[visible]).float().mean() > 0.9
    uv_all, seen_all = visibility(scene.points, mv)
    assert torch.equal(seen_all.any(0), visible) and (seen_all.sum(0) >= 2).any()   # neighbouring cameras overlap
    for i in torch.nonzero(seen_all.sum(0) >= 2).flatten()[:20].tolist():
        first = int(seen_all[:, i].float().argmax())
        assert view[i] == first and torch.equal(uv[i], uv_all[first, i])


def test_occluded_points_are_not_visible():
    cam = CameraSpec(yaw=0.0, pitch=0.0, fov=60.0, width=41, height=21)
    scene = _scene([[10.0, 0.0, -0.95, 4.0, 2.0, 1.5, 0.0]], [0])
    mv = render_views(scene, [cam], SPEC, noise=0.0)
    pts = torch.tensor([[8.0, 0.0, -0.9],      # on the front face
                        [14.0, 0.0, -0.9],     # right behind the box
                        [6.0, 3.0, -1.7]])     # ground beside it
    view, uv, visible = point_pixels(pts, mv)
    assert visible.tolist() == [True, False, True]
    f = 0.5 * 41 / math.tan(math.radians(30))
    assert uv[0].tolist() == [20, math.floor(10.5 + f * 0.9 / 8.0)]


def test_camera_errors_are_one_line():
    with pytest.raises(KdforgeError, match="unknown field"):
        rig_from_spec(SceneSpec(cameras=[{"yaw": 0, "fovv": 60}]))
    assert rig_from_spec(SceneSpec(cameras=[{"yaw": 30, "position": [0, 0, 1]}]))[0].position == (0, 0, 1)
    with pytest.raises(KdforgeError, match="one image size"):
        render_views(_scene([], []), [CameraSpec(width=10), CameraSpec(width=12)], SPEC)
    with pytest.raises(KdforgeError, match="fov"):
        intrinsics(CameraSpec(fov=180))
    with pytest.raises(KdforgeError, match="points must be"):
        point_pixels(torch.zeros(3, 2), render_views(_scene([], []), [CameraSpec()], SPEC))
