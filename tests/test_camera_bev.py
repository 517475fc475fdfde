"""Camera BEV student: frustum geometry against hand trigonometry, the same BEV cell in the LiDAR and camera grids,
splat against a plain loop, depth targets, the model's taps and the centre-distance AP against hand cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.losses.distillbev import box_masks
from kdforge.tasks.pointcloud.camera_bev import (
    CameraBEVDetector,
    CameraConfig,
    LiftSplat,
    centre_distance_ap,
    depth_targets,
    frustum_cells,
    lidar_taps,
)
from kdforge.tasks.pointcloud.cameras import MultiView, camera_rig, extrinsics, intrinsics
from kdforge.tasks.pointcloud.geometry import project
from kdforge.tasks.pointcloud.models import DetectorConfig, PillarEncoder, build_detector, centerpoint_targets, decode

EXTENT = 8.0


def _rig(cam: CameraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    specs = cam.rig()
    return torch.stack([intrinsics(c) for c in specs]), torch.stack([extrinsics(c) for c in specs])


def _hand_cells(cam: CameraConfig, extent: float, voxel: float, z_range: list[float]) -> list[int]:
    """Frustum cells from the rig's yaw / pitch by plain trigonometry (no K / T, no kornia)."""
    f = 0.5 * cam.width / math.tan(math.radians(cam.fov) / 2)
    n = int(round(2 * extent / voxel))
    step = (cam.depth_max - cam.depth_min) / cam.depth_bins
    out = []
    for v in range(cam.views):
        yaw, pitch = math.radians(v * 360 / cam.views), math.radians(cam.pitch)
        fwd = (math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), -math.sin(pitch))
        right = (math.sin(yaw), -math.cos(yaw), 0.0)
        down = (fwd[1] * right[2] - fwd[2] * right[1], fwd[2] * right[0] - fwd[0] * right[2],
                fwd[0] * right[1] - fwd[1] * right[0])
        for k in range(cam.depth_bins):
            d = cam.depth_min + (k + 0.5) * step
            for i in range(cam.height // cam.stride):
                for j in range(cam.width // cam.stride):
                    xn = ((j + 0.5) * cam.stride - cam.width / 2) / f
                    yn = ((i + 0.5) * cam.stride - cam.height / 2) / f
                    p = [d * (xn * right[a] + yn * down[a] + fwd[a]) for a in range(3)]
                    ix, iy = math.floor((p[0] + extent) / voxel), math.floor((p[1] + extent) / voxel)
                    ok = 0 <= ix < n and 0 <= iy < n and z_range[0] <= p[2] < z_range[1]
                    out.append(iy * n + ix if ok else -1)
    return out


def test_frustum_cells_match_hand_trigonometry() -> None:
    cam = CameraConfig(views=3, width=16, height=8, stride=4, depth_bins=5, depth_min=1.0, depth_max=11.0, pitch=10.0)
    K, T = _rig(cam)
    got = frustum_cells(K, T, cam, EXTENT, 1.0, [-3.0, 1.0])
    want = _hand_cells(cam, EXTENT, 1.0, [-3.0, 1.0])
    assert len(got) == 3 * 5 * 2 * 4
    mismatch = [(i, a, b) for i, (a, b) in enumerate(zip(got.tolist(), want, strict=True)) if a != b]
    assert not mismatch, mismatch[:5]
    assert (got >= 0).sum() > 20 and (got == -1).any()          # some points leave the grid / height range


def test_a_bev_position_lands_in_the_same_cell_for_teacher_and_student() -> None:
    cam = CameraConfig(views=6, width=48, height=24, stride=1, depth_bins=100, depth_min=1.0, depth_max=21.0)
    K, T = _rig(cam)
    x, y, z = 5.5, -2.5, -1.0                   # centre of cell ix 13, iy 5 of the 1 m grid over [-8, 8]
    ix, iy, n = 13, 5, 16
    # LiDAR teacher: the pillar grid (0.5 m) and the head grid (targets, masks) put it at (row iy, column ix)
    enc = PillarEncoder(4, EXTENT, 0.5, [-3.0, 1.0])
    canvas = enc(torch.tensor([[x, y, z, 0.5]]), torch.zeros(1, dtype=torch.long), 1)
    rows, cols = torch.nonzero(canvas[0].abs().sum(0)).T.tolist()
    assert rows == [2 * iy + 1] and cols == [2 * ix + 1]
    heat, _, mask = centerpoint_targets(torch.tensor([[x, y, z, 2.0, 1.0, 1.5, 0.3]]), torch.tensor([0]), 1, EXTENT,
                                        1.0)
    assert mask.nonzero().tolist() == [[iy, ix]] and float(heat[0, iy, ix]) == 1.0
    fg, _ = box_masks(torch.tensor([[x, y, z, 0.5, 0.5, 1.5, 0.0]]), EXTENT, 1.0, n)
    assert fg.nonzero().tolist() == [[iy, ix]]
    # camera student: the frustum point at the pixel and depth bin the point projects to splats into the same cell
    cells = frustum_cells(K, T, cam, EXTENT, 1.0, [-3.0, 1.0])
    hits = 0
    for v in range(cam.views):
        uv, depth = project(torch.tensor([[x, y, z]]), K[v], T[v])
        col, row = int(uv[0, 0]), int(uv[0, 1])
        if depth[0] <= 0 or not (0 <= col < cam.width and 0 <= row < cam.height):
            continue
        k = int((float(depth[0]) - cam.depth_min) / ((cam.depth_max - cam.depth_min) / cam.depth_bins))
        flat = ((v * cam.depth_bins + k) * cam.height + row) * cam.width + col
        assert int(cells[flat]) == iy * n + ix
        hits += 1
        # and a one-hot depth at that pixel carries its context exactly there
        ls = LiftSplat(cam, 3, EXTENT, 1.0, [-3.0, 1.0])
        depth_p = torch.zeros(1, cam.views, cam.depth_bins, cam.height, cam.width)
        depth_p[0, v, k, row, col] = 1.0
        ctx = torch.zeros(1, cam.views, 3, cam.height, cam.width)
        ctx[0, v, :, row, col] = torch.tensor([1.0, 2.0, 3.0])
        bev = ls.splat(depth_p, ctx, cells, torch.bincount(cells[cells >= 0], minlength=n * n))
        assert bev[0].abs().sum(0).nonzero().tolist() == [[iy, ix]]
        assert bev[0, :, iy, ix].tolist() == [1.0, 2.0, 3.0]
    assert hits >= 1


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_splat_matches_a_plain_loop(mode: str) -> None:
    cam = CameraConfig(views=2, width=8, height=4, stride=2, depth_bins=3, depth_min=2.0, depth_max=8.0, splat=mode,
                       image_depth=1)
    K, T = _rig(cam)
    ls = LiftSplat(cam, 2, EXTENT, 2.0, [-3.0, 1.0])
    cells, counts = ls.cells(K, T)
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 2, 3, 2, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 2, 2, 2, 4, generator=g, dtype=torch.float64)
    got = ls.splat(depth, ctx, cells, counts)
    want = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    hits = torch.zeros(64)
    flat = 0
    for v in range(2):
        for k in range(3):
            for i in range(2):
                for j in range(4):
                    c = int(cells[flat])
                    flat += 1
                    if c < 0:
                        continue
                    hits[c] += 1
                    for b in range(2):
                        want[b, :, c // 8, c % 8] += depth[b, v, k, i, j] * ctx[b, v, :, i, j]
    if mode == "mean":
        want = want / hits.clamp_min(1).view(1, 1, 8, 8).double()
    torch.testing.assert_close(got, want)
    assert torch.equal(counts, hits.long())


def test_depth_targets_lidar_and_rendered() -> None:
    cam = CameraConfig(views=1, width=8, height=4, stride=2, depth_bins=4, depth_min=0.0, depth_max=8.0)
    K, T = _rig(cam)
    depth = torch.zeros(1, 4, 8)
    depth[0, 0, 0], depth[0, 1, 1], depth[0, 0, 2] = 5.0, 3.1, 9.0           # patch (0, 0) min 3.1; (0, 1): 9 > max
    mv = MultiView(torch.zeros(1, 3, 4, 8), depth, torch.zeros(1, 4, 8).long(), torch.zeros(1, 4, 8).long(), K, T)
    rendered = depth_targets(mv, torch.zeros(0, 3), CameraConfig(**{**cam.__dict__, "depth_source": "rendered"}))
    assert rendered.shape == (1, 2, 4) and rendered[0, 0, 0] == 1 and (rendered.flatten()[1:] == -1).all()
    # one lidar point straight ahead at 6.5 m (the camera looks 5 degrees down): bin 3 at its pixel, -1 elsewhere
    p = torch.tensor([[6.5 * math.cos(math.radians(5)), 0.0, -6.5 * math.sin(math.radians(5)), 0.5],
                      [-4.0, 0.0, 0.0, 0.5]])                                        # behind the camera: ignored
    lidar = depth_targets(mv, p, cam)
    uv, _ = project(p[:1, :3], K[0], T[0])
    r, c = int(uv[0, 1] // 2), int(uv[0, 0] // 2)
    assert lidar[0, r, c] == 3 and (lidar >= 0).sum() == 1


def test_camera_detector_taps_decode_and_lidar_taps() -> None:
    torch.manual_seed(0)
    cam = CameraConfig(views=2, width=16, height=8, stride=4, depth_bins=6, image_width=4, image_depth=2)
    det = CameraBEVDetector(3, EXTENT, DetectorConfig(voxel=2.0, cell=1.0, pfn=4, width=8, depth=2, head=8), cam)
    K, T = _rig(cam)
    out = det(torch.rand(2, 2, 3, 8, 16), K.expand(2, -1, -1, -1), T.expand(2, -1, -1, -1))
    assert out["lss"].shape == (2, 4, 8, 8) and out["neck"].shape == (2, 8, 16, 16)
    assert out["heatmap"].shape == (2, 3, 16, 16) and out["reg"].shape == (2, 8, 16, 16)
    assert out["depth"].shape == (2, 2, 6, 2, 4) and out["block2"].shape == (2, 8, 4, 4)
    assert len(decode(out, EXTENT, 1.0)) == 2
    out["heatmap"].sum().backward()
    assert det.encoder.image[0].weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="one camera rig"):
        det(torch.rand(2, 2, 3, 8, 16), torch.stack([K, K * 2]), T.expand(2, -1, -1, -1))
    lidar = build_detector(3, EXTENT, DetectorConfig(voxel=0.5, cell=1.0, pfn=4, width=8, depth=2, head=8))
    pts = torch.rand(50, 4) * torch.tensor([16.0, 16.0, 2.0, 1.0]) - torch.tensor([8.0, 8.0, 1.5, 0.0])
    b = torch.zeros(50, dtype=torch.long)
    taps, direct = lidar_taps(lidar, pts, b, 1), lidar(pts, b, 1)
    for k in ("neck", "heatmap", "reg"):
        torch.testing.assert_close(taps[k], direct[k])


def test_centre_distance_ap_hand_case() -> None:
    gt = [(torch.tensor([[0.0, 0.0, 0, 4, 2, 1.5, 0], [5.0, 5.0, 0, 4, 2, 1.5, 0]]), torch.tensor([0, 0]))]
    # detections: 0.8 m from the first GT (score 0.9), 3 m from the second (0.8), a far false positive (0.7)
    det = [(torch.tensor([[0.8, 0.0, 0, 4, 2, 1.5, 0], [5.0, 8.0, 0, 4, 2, 1.5, 0], [-9.0, -9.0, 0, 4, 2, 1.5, 0]]),
            torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0]))]
    got = centre_distance_ap(det, gt, ["car"])
    # d 0.5: nothing matches (AP 0); d 1, 2: recall 1/2 at precision 1 (AP 0.5); d 4: both at precision 1 (AP 1)
    assert got["car"] == pytest.approx(100 * (0 + 0.5 + 0.5 + 1) / 4)
    assert got["mean"] == got["car"]


def test_camera_config_errors_are_one_line() -> None:
    from kdforge.errors import KdforgeError

    for bad, msg in (({"stride": 3}, "stride must be"), ({"depth_min": 5.0, "depth_max": 2.0}, "depth_min"),
                     ({"splat": "max"}, "splat must be"), ({"image_depth": 1, "stride": 8}, "image_depth")):
        with pytest.raises(KdforgeError, match=msg) as info:
            CameraConfig(**bad).check("camera")
        assert "\n" not in str(info.value)
    assert camera_rig(6)[1].yaw == 60.0
