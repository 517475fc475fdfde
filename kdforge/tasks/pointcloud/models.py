"""A pillar BEV detector with CenterPoint-style heads: pillar encoder -> BEV CNN (neck) -> heatmap + box maps.

* `PillarEncoder`: points are grouped into pillars (`geometry.voxelize`, one z bin); each point is
  decorated with its offsets from the pillar centre and the pillar's mean height, a shared linear
  layer + ReLU embeds it and a max over the pillar's points gives the pillar feature, scattered
  into a (B, C, ny, nx) pseudo-image (PointPillars).
* `BEVDetector`: a stride-2 (or 1) conv then `depth - 1` 3x3 conv blocks (GroupNorm, so batches split
  over DDP ranks exactly), resized to the head grid (`cell` metres per cell) when the pillar grid
  is coarser or finer; the head (3x3 conv + ReLU) predicts per-class centre heatmaps (logits) and
  8 box channels per cell (dx, dy, z, log l, log w, log h, sin 2yaw, cos 2yaw: the heading modulo pi,
  which is all a box footprint and its IoU depend on, and all that points on the sensor-facing
  faces can tell apart). Taps: `neck`, `heatmap`, `reg` (the output dict's keys). With
  `feature_dim > 0` a separate branch (3x3 conv + ReLU + 1x1 conv on the neck) adds a per-cell
  embedding `feature` (B, feature_dim, G, G) (upvl's distilled vision-language features); the
  default 0 builds exactly the detector without it.
* `centerpoint_targets` / `centerpoint_loss` / `decode`: Gaussian centre heatmaps (CenterNet radius
  at min overlap 0.1, radius >= 1 cell), the CornerNet focal loss + L1 box loss at centre cells
  (each normalised per scene by its object count, then averaged over scenes), and top-K peak
  decoding after a 3x3 max-pool (CenterPoint's NMS-free decoding).

A teacher and a compact student are the same class with other sizes: the student here has a coarser
pillar grid (lower input resolution) and a narrower CNN, upsampled to the same head grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.geometry import scatter_max, scatter_mean, voxelize

__all__ = ["BEVDetector", "DetectorConfig", "PillarEncoder", "build_detector", "centerpoint_loss",
           "centerpoint_targets", "decode", "gaussian_radius"]

REG_CHANNELS = 8


@dataclass
class DetectorConfig:
    voxel: float = 0.5          # pillar side (m): the input resolution
    cell: float = 1.0           # head grid cell (m): where heatmaps and boxes live
    pfn: int = 16               # pillar feature channels
    width: int = 32             # BEV CNN channels
    depth: int = 3              # conv blocks (the first one strides `stride`)
    stride: int = 2             # 1 | 2: the first block's stride
    head: int = 32              # head hidden channels
    z_range: list[float] = field(default_factory=lambda: [-3.0, 1.0])     # pillar height range (m)
    feature_dim: int = 0        # > 0: a per-cell embedding head ("feature" output, e.g. distilled VL features)

    def check(self, where: str) -> None:
        if min(self.voxel, self.cell) <= 0 or min(self.pfn, self.width, self.head, self.depth) < 1:
            raise KdforgeError(f"{where}: need voxel, cell > 0 and pfn, width, head, depth >= 1")
        if self.feature_dim < 0:
            raise KdforgeError(f"{where}: feature_dim must be >= 0, got {self.feature_dim}")
        if self.stride not in (1, 2):
            raise KdforgeError(f"{where}: stride must be 1 or 2, got {self.stride}")
        if len(self.z_range) != 2 or self.z_range[1] <= self.z_range[0]:
            raise KdforgeError(f"{where}: z_range must be [low, high] with high > low, got {self.z_range}")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, c // 8), c)


def _grid(extent: float, size: float, where: str) -> int:
    n = 2 * extent / size
    if abs(n - round(n)) > 1e-6:
        raise KdforgeError(f"{where}: 2 * extent ({2 * extent}) must be a whole number of {size} m cells")
    return int(round(n))


class PillarEncoder(nn.Module):
    """Points (P, 4) of B scenes -> (B, C, ny, nx) pillar pseudo-image."""

    def __init__(self, channels: int, extent: float, voxel: float, z_range: list[float]) -> None:
        super().__init__()
        self.extent, self.voxel, self.z_range = extent, voxel, list(z_range)
        self.n = _grid(extent, voxel, "pillar grid")
        self.embed = nn.Linear(7, channels)
        self.channels = channels

    def forward(self, points: Tensor, batch: Tensor, batch_size: int) -> Tensor:
        lo = (-self.extent, -self.extent, self.z_range[0])
        hi = (self.extent, self.extent, self.z_range[1])
        size = (self.voxel, self.voxel, self.z_range[1] - self.z_range[0])
        vox = voxelize(points, batch, lo, hi, size)
        keep = vox.inverse >= 0
        pts, inv = points[keep], vox.inverse[keep]
        centres = vox.centres(torch.tensor(lo, dtype=points.dtype, device=points.device),
                              torch.tensor(size, dtype=points.dtype, device=points.device))
        mean_z = scatter_mean(pts[:, 2:3], inv, len(vox.counts))
        deco = torch.cat([pts[:, :4], pts[:, :2] - centres[inv, :2], pts[:, 2:3] - mean_z[inv]], 1)
        feats = scatter_max(F.relu(self.embed(deco)), inv, len(vox.counts))
        lin = (vox.coords[:, 0] * self.n + vox.coords[:, 2]) * self.n + vox.coords[:, 3]
        canvas = feats.new_zeros(batch_size * self.n * self.n, self.channels).index_copy(0, lin, feats)
        return canvas.reshape(batch_size, self.n, self.n, self.channels).permute(0, 3, 1, 2)


class BEVDetector(nn.Module):
    feature_taps = ("neck", "heatmap", "reg")

    def __init__(self, num_classes: int, extent: float, cfg: DetectorConfig) -> None:
        super().__init__()
        cfg.check("detector")
        self.num_classes, self.extent, self.cell = num_classes, extent, cfg.cell
        self.grid = _grid(extent, cfg.cell, "head grid")
        self.encoder = PillarEncoder(cfg.pfn, extent, cfg.voxel, cfg.z_range)
        first = nn.Conv2d(cfg.pfn, cfg.width, 3, cfg.stride, 1, bias=False)
        layers: list[nn.Module] = [first, _norm(cfg.width), nn.ReLU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Conv2d(cfg.width, cfg.width, 3, 1, 1, bias=False), _norm(cfg.width), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.channels = cfg.width
        self.shared = nn.Sequential(nn.Conv2d(cfg.width, cfg.head, 3, 1, 1), nn.ReLU())
        self.heatmap = nn.Conv2d(cfg.head, num_classes, 1)
        self.reg = nn.Conv2d(cfg.head, REG_CHANNELS, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.1) / 0.1))      # prior 0.1 (CenterPoint)
        self.feature_dim = cfg.feature_dim
        if cfg.feature_dim > 0:        # its own branch (3x3 conv + ReLU + 1x1), so it does not share the box head's
            self.feature = nn.Sequential(nn.Conv2d(cfg.width, cfg.head, 3, 1, 1), nn.ReLU(),
                                         nn.Conv2d(cfg.head, cfg.feature_dim, 1))

    def forward(self, points: Tensor, batch: Tensor, batch_size: int) -> dict[str, Tensor]:
        x = self.backbone(self.encoder(points, batch, batch_size))
        if x.shape[-1] != self.grid:
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        h = self.shared(x)
        out = {"neck": x, "heatmap": self.heatmap(h), "reg": self.reg(h)}
        if self.feature_dim > 0:
            out["feature"] = self.feature(x)
        return out


def build_detector(num_classes: int, extent: float, cfg: DetectorConfig) -> BEVDetector:
    return BEVDetector(num_classes, extent, cfg)


# ------------------------------------------------------------------------------------- targets, loss, decoding


def gaussian_radius(length: float, width: float, min_overlap: float = 0.1) -> float:
    """CenterNet's radius (cells) within which a corner shift keeps IoU >= min_overlap (the smallest of 3 cases)."""
    b1 = length + width
    c1 = width * length * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (length + width)
    c2 = (1 - min_overlap) * width * length
    r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (length + width)
    c3 = (min_overlap - 1) * width * length
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def centerpoint_targets(boxes: Tensor, labels: Tensor, num_classes: int, extent: float, cell: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(heat (K, G, G), reg (8, G, G), mask (G, G)) of one scene's boxes on the head grid."""
    g = _grid(extent, cell, "head grid")
    heat = torch.zeros(num_classes, g, g)
    reg = torch.zeros(REG_CHANNELS, g, g)
    mask = torch.zeros(g, g)
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32),
                            indexing="ij")
    for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
        x, y, z, l, w, h, yaw = box
        fx, fy = (x + extent) / cell, (y + extent) / cell
        ix, iy = int(math.floor(fx)), int(math.floor(fy))
        if not (0 <= ix < g and 0 <= iy < g):
            continue
        radius = max(1, int(gaussian_radius(l / cell, w / cell)))
        sigma = (2 * radius + 1) / 6
        d2 = (xs - ix) ** 2 + (ys - iy) ** 2
        blob = torch.exp(-d2 / (2 * sigma ** 2)) * (d2 <= radius ** 2 + 1e-6)
        heat[label] = torch.maximum(heat[label], blob)
        reg[:, iy, ix] = torch.tensor([fx - ix, fy - iy, z, math.log(l), math.log(w), math.log(h), math.sin(2 * yaw),
                                       math.cos(2 * yaw)])
        mask[iy, ix] = 1.0
    return heat, reg, mask


def centerpoint_loss(out: dict[str, Tensor], heat: Tensor, reg: Tensor, mask: Tensor, reg_weight: float = 0.25
                     ) -> dict[str, Tensor]:
    """{'heatmap': focal loss, 'box': reg_weight * L1}, each per scene / max(1, objects), mean over scenes."""
    p = out["heatmap"].float().sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg = 1 - pos
    focal = -(pos * (1 - p) ** 2 * p.log() + neg * (1 - heat) ** 4 * p ** 2 * (1 - p).log())
    count = pos.flatten(1).sum(1).clamp_min(1)
    hm = (focal.flatten(1).sum(1) / count).mean()
    l1 = (out["reg"].float() - reg).abs().sum(1) * mask
    box = (l1.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)).mean()
    return {"heatmap": hm, "box": reg_weight * box}


@torch.no_grad()
def decode(out: dict[str, Tensor], extent: float, cell: float, top_k: int = 50, score_threshold: float = 0.05
           ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per scene (boxes (D, 7), scores (D,), labels (D,)): the top-K 3x3 heatmap peaks above the threshold."""
    heat = out["heatmap"].float().sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    b, k, g, _ = heat.shape
    scores, index = peaks.flatten(1).topk(min(top_k, k * g * g))
    result = []
    for i in range(b):
        keep = scores[i] > score_threshold
        idx = index[i][keep]
        label, cellidx = idx // (g * g), idx % (g * g)
        iy, ix = cellidx // g, cellidx % g
        r = out["reg"][i].float().flatten(1)[:, cellidx]
        x = -extent + (ix.float() + r[0]) * cell
        y = -extent + (iy.float() + r[1]) * cell
        size = r[3:6].clamp(max=4.0).exp()
        yaw = torch.atan2(r[6], r[7]) / 2
        boxes = torch.stack([x, y, r[2], size[0], size[1], size[2], yaw], 1)
        result.append((boxes, scores[i][keep], label))
    return result
