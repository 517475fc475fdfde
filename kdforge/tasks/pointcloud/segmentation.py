"""A CPU-trainable point-wise segmentation network: PointNet-lite blocks with voxel context.

`PointSegNet(cfg, extent, z_range)` maps the points of a batch of scenes (N, 4: x, y, z,
intensity; `batch` (N,) the scene of each point) to per-point features (N, out). Each block
voxelises the points at its scale (`geometry.voxelize`; with `pillar_blocks[i]` the voxel is a BEV
pillar of that side spanning the whole height), describes every point by its current feature and
its offset from its voxel's centroid (scaled by the voxel side), max-pools those descriptions over the voxel
(`geometry.scatter_max`, a PointNet inside the voxel) and adds the pooled context back to each
point through its inverse map (residual). Blocks run fine to coarse (default 0.5 m voxels, then
2 m pillars), so a point sees the shape of its object part and of its neighbourhood. LayerNorm
(per point) keeps a scene's features independent of the other scenes in the batch.

`forward` returns {"features": (N, out), "taps": [(N, width) after the stem and each block]}.
Points outside the voxel box get no context (zeros) but still a feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.geometry import scatter_max, scatter_mean, voxelize

__all__ = ["PointSegConfig", "PointSegNet"]


@dataclass
class PointSegConfig:
    width: int = 32                       # hidden channels
    out: int = 32                         # output feature size
    scales: list[float] = field(default_factory=lambda: [0.5, 2.0])   # voxel sides (m) per block
    pillar_blocks: list[bool] = field(default_factory=lambda: [False, True])   # block i pools a BEV pillar

    def check(self, where: str) -> None:
        if self.width < 1 or self.out < 1:
            raise KdforgeError(f"{where}: width and out must be >= 1, got {self.width} and {self.out}")
        if not self.scales or min(self.scales) <= 0:
            raise KdforgeError(f"{where}: scales must be a non-empty list of voxel sides > 0, got {self.scales}")
        if len(self.pillar_blocks) != len(self.scales):
            raise KdforgeError(f"{where}: pillar_blocks needs one entry per scale ({len(self.scales)}), got "
                               f"{len(self.pillar_blocks)}")


def _mlp(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, c_out), nn.LayerNorm(c_out), nn.ReLU())


class _VoxelBlock(nn.Module):
    def __init__(self, width: int, scale: float, pillar: bool) -> None:
        super().__init__()
        self.scale, self.pillar = scale, pillar
        self.local = _mlp(width + 3, width)
        self.mix = nn.Sequential(nn.Linear(2 * width, width), nn.LayerNorm(width))

    def forward(self, h: Tensor, xyz: Tensor, batch: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        size = torch.tensor([self.scale, self.scale, float(hi[2] - lo[2]) if self.pillar else self.scale],
                            dtype=xyz.dtype, device=xyz.device)
        vox = voxelize(xyz, batch, lo, hi, size)
        num = len(vox.counts)
        inside = vox.inverse >= 0
        centroid = scatter_mean(xyz, vox.inverse, num)
        offset = torch.zeros_like(xyz)
        offset[inside] = (xyz[inside] - centroid[vox.inverse[inside]]) / size
        local = self.local(torch.cat([h, offset], 1))
        pooled = scatter_max(local, vox.inverse, num)
        context = torch.zeros_like(local)
        context[inside] = pooled[vox.inverse[inside]]
        return torch.relu(h + self.mix(torch.cat([local, context], 1)))


class PointSegNet(nn.Module):
    """Per-point features of LiDAR points (x, y, z, intensity) with fine-to-coarse voxel context."""

    def __init__(self, cfg: PointSegConfig, extent: float, z_range: tuple[float, float]) -> None:
        super().__init__()
        cfg.check("segmentation model")
        self.cfg, self.extent = cfg, float(extent)
        self.register_buffer("lo", torch.tensor([-extent, -extent, z_range[0]], dtype=torch.float32), persistent=False)
        self.register_buffer("hi", torch.tensor([extent, extent, z_range[1]], dtype=torch.float32), persistent=False)
        self.stem = nn.Sequential(_mlp(4, cfg.width), _mlp(cfg.width, cfg.width))
        self.blocks = nn.ModuleList(_VoxelBlock(cfg.width, s, p) for s, p in zip(cfg.scales, cfg.pillar_blocks,
                                                                                 strict=True))
        self.head = nn.Linear(cfg.width, cfg.out)
        self.out_dim = cfg.out

    def normalised_inputs(self, points: Tensor) -> Tensor:
        """(N, 4): x, y scaled by the extent, z mapped to [-1, 1] over the height range, intensity centred."""
        xyz = points[:, :3]
        mid, half = (self.lo + self.hi) / 2, (self.hi - self.lo) / 2
        return torch.cat([(xyz - mid) / half, points[:, 3:4] - 0.5], 1)

    def forward(self, points: Tensor, batch: Tensor | None = None) -> dict[str, Tensor | list[Tensor]]:
        if points.dim() != 2 or points.shape[1] < 4:
            raise KdforgeError(f"PointSegNet: points must be (N, >= 4) (x, y, z, intensity), got "
                               f"{tuple(points.shape)}")
        points = points.float()
        b = torch.zeros(len(points), dtype=torch.long, device=points.device) if batch is None else batch.long()
        h = self.stem(self.normalised_inputs(points))
        taps = [h]
        for block in self.blocks:
            h = block(h, points[:, :3], b, self.lo, self.hi)
            taps.append(h)
        return {"features": self.head(h), "taps": taps}
