"""Geometry on torch tensors: pinhole projection / unprojection (kornia) and voxelisation with its inverse map.

* `project(points, K, T)` / `unproject(uv, depth, K, T)`: lidar-frame points -> pixel coordinates and
  camera depth and back, with `K` (3, 3) intrinsics and `T` (4, 4) the camera-from-lidar transform.
  kornia's `project_points` / `unproject_points` / `transform_points` do the work (the `pointcloud`
  extra).
* `voxelize(points, batch, lo, hi, size)`: the occupied voxels (sorted by batch, z, y, x) and, for
  every point, the voxel it falls in (`inverse`, -1 for points outside the range) -- the map that
  scatters point features into voxels and gathers voxel features back to points. A pillar is a
  voxel whose z size spans the whole height range.
* `scatter_max` / `scatter_mean`: per-voxel reductions of point features through that map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.extras import require

__all__ = ["Voxels", "kornia_geometry", "project", "scatter_max", "scatter_mean", "unproject", "voxelize"]


def kornia_geometry():
    return require("kornia.geometry", "pointcloud", "camera projection needs kornia")


def _check_camera(K: Tensor, T: Tensor) -> None:
    if K.shape[-2:] != (3, 3) or T.shape[-2:] != (4, 4):
        raise KdforgeError(f"camera: K must be (3, 3) and T (4, 4), got {tuple(K.shape)} and {tuple(T.shape)}")


def project(points: Tensor, K: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
    """(uv (N, 2) pixels, depth (N,) metres along the camera axis) of lidar-frame `points` (N, >= 3)."""
    _check_camera(K, T)
    kg = kornia_geometry()
    cam = kg.linalg.transform_points(T[None].to(points.dtype), points[None, :, :3])[0]
    depth = cam[:, 2]
    uv = kg.camera.project_points(cam, K.to(points.dtype))
    return uv, depth


def unproject(uv: Tensor, depth: Tensor, K: Tensor, T: Tensor) -> Tensor:
    """Lidar-frame points (N, 3) seen at pixels `uv` (N, 2) with camera depth `depth` (N,): `project`'s inverse."""
    _check_camera(K, T)
    kg = kornia_geometry()
    cam = kg.camera.unproject_points(uv, depth[:, None], K.to(uv.dtype), normalize=False)
    lidar_from_cam = torch.linalg.inv(T.to(uv.dtype))
    return kg.linalg.transform_points(lidar_from_cam[None], cam[None])[0]


@dataclass
class Voxels:
    coords: Tensor     # (V, 4) long: batch, iz, iy, ix of each occupied voxel (sorted)
    inverse: Tensor    # (N,) long: the voxel of every point, -1 outside the range
    counts: Tensor     # (V,) long: points per voxel
    grid: tuple[int, int, int]   # (nz, ny, nx)

    def centres(self, lo: Tensor, size: Tensor) -> Tensor:
        """(V, 3) metric centres (x, y, z) of the voxels."""
        ixyz = self.coords[:, [3, 2, 1]].to(lo.dtype)
        return lo + (ixyz + 0.5) * size


def voxelize(points: Tensor, batch: Tensor | None, lo: tuple[float, float, float] | Tensor,
             hi: tuple[float, float, float] | Tensor, size: tuple[float, float, float] | Tensor) -> Voxels:
    """Group points (N, >= 3) of `batch` (N,) scenes into voxels of `size` over the box [lo, hi)."""
    if points.dim() != 2 or points.shape[1] < 3:
        raise KdforgeError(f"voxelize: points must be (N, >= 3), got {tuple(points.shape)}")
    lo_t = torch.as_tensor(lo, dtype=points.dtype, device=points.device)
    hi_t = torch.as_tensor(hi, dtype=points.dtype, device=points.device)
    size_t = torch.as_tensor(size, dtype=points.dtype, device=points.device)
    if (size_t <= 0).any() or (hi_t <= lo_t).any():
        raise KdforgeError(f"voxelize: need size > 0 and hi > lo, got size {size_t.tolist()}, lo {lo_t.tolist()}, "
                           f"hi {hi_t.tolist()}")
    n = torch.round((hi_t - lo_t) / size_t).long()             # (nx, ny, nz)
    idx = torch.floor((points[:, :3] - lo_t) / size_t).long()
    inside = ((idx >= 0) & (idx < n)).all(1)
    b = torch.zeros(len(points), dtype=torch.long, device=points.device) if batch is None else batch.long()
    nx, ny, nz = n.tolist()
    lin = ((b * nz + idx[:, 2]) * ny + idx[:, 1]) * nx + idx[:, 0]
    uniq, inv, counts = torch.unique(lin[inside], sorted=True, return_inverse=True, return_counts=True)
    inverse = torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    inverse[inside] = inv
    ix = uniq % nx
    iy = (uniq // nx) % ny
    iz = (uniq // (nx * ny)) % nz
    ib = uniq // (nx * ny * nz)
    return Voxels(torch.stack([ib, iz, iy, ix], 1), inverse, counts, (nz, ny, nx))


def scatter_max(values: Tensor, inverse: Tensor, num: int) -> Tensor:
    """(num, C) per-voxel maximum of point `values` (N, C); points with inverse -1 are ignored."""
    keep = inverse >= 0
    out = values.new_zeros(num, values.shape[1])
    return out.scatter_reduce(0, inverse[keep, None].expand(-1, values.shape[1]), values[keep], reduce="amax",
                              include_self=False)


def scatter_mean(values: Tensor, inverse: Tensor, num: int) -> Tensor:
    """(num, C) per-voxel mean of point `values` (N, C); points with inverse -1 are ignored."""
    keep = inverse >= 0
    out = values.new_zeros(num, values.shape[1])
    return out.scatter_reduce(0, inverse[keep, None].expand(-1, values.shape[1]), values[keep], reduce="mean",
                              include_self=False)
