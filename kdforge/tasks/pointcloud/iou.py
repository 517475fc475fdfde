"""Rotated-box IoU in bird's-eye view and in 3D, via shapely polygons (the `pointcloud` extra).

Boxes are (N, 7) rows (x, y, z, l, w, h, yaw), z the box centre. BEV IoU is the IoU of the
rotated footprints (shapely 2's vectorised polygon intersection); 3D IoU multiplies the
footprint intersection by the overlap of the z intervals, over the union of the volumes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.extras import require

__all__ = ["bev_corners", "bev_iou", "iou_3d"]


def _check(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 7:
        raise KdforgeError(f"{name}: boxes must be (N, 7) rows (x, y, z, l, w, h, yaw), got {tuple(boxes.shape)}")


def bev_corners(boxes: Tensor) -> Tensor:
    """(N, 4, 2) footprint corners, counter-clockwise."""
    _check(boxes, "bev_corners")
    x, y, l, w, yaw = boxes[:, 0], boxes[:, 1], boxes[:, 3], boxes[:, 4], boxes[:, 6]
    sx = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=boxes.dtype, device=boxes.device)
    sy = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=boxes.dtype, device=boxes.device)
    dx, dy = l[:, None] * sx, w[:, None] * sy
    c, s = yaw.cos()[:, None], yaw.sin()[:, None]
    return torch.stack([x[:, None] + c * dx - s * dy, y[:, None] + s * dx + c * dy], -1)


def _intersection_area(a: Tensor, b: Tensor) -> Tensor:
    shapely = require("shapely", "pointcloud", "rotated-box IoU needs shapely")
    import numpy as np

    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b), dtype=torch.float64)
    pa = shapely.polygons(bev_corners(a.detach().double()).cpu().numpy())
    pb = shapely.polygons(bev_corners(b.detach().double()).cpu().numpy())
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None, :]))
    return torch.from_numpy(np.asarray(inter, dtype=np.float64))


def bev_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) IoU of the rotated footprints (float64)."""
    _check(a, "bev_iou")
    _check(b, "bev_iou")
    inter = _intersection_area(a, b)
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    area_a, area_b = a64[:, 3] * a64[:, 4], b64[:, 3] * b64[:, 4]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def iou_3d(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) 3D IoU of rotated boxes (yaw about z only), float64."""
    _check(a, "iou_3d")
    _check(b, "iou_3d")
    inter = _intersection_area(a, b)
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    top = torch.minimum(a64[:, None, 2] + a64[:, None, 5] / 2, b64[None, :, 2] + b64[None, :, 5] / 2)
    bottom = torch.maximum(a64[:, None, 2] - a64[:, None, 5] / 2, b64[None, :, 2] - b64[None, :, 5] / 2)
    inter = inter * (top - bottom).clamp_min(0)
    vol_a = a64[:, 3] * a64[:, 4] * a64[:, 5]
    vol_b = b64[:, 3] * b64[:, 4] * b64[:, 5]
    union = vol_a[:, None] + vol_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))
