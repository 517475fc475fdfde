"""Batched, seeded, box-aware augmentation: random resize + crop/pad + horizontal flip.

Each sample's parameters are a pure function of (seed, epoch, data set index), so a view can be
rebuilt from its parameters (exact resume, cached teacher outputs, paired arms). The whole
batch is warped by one `grid_sample` call; the boxes get exactly the same affine map, then are
clipped to the output. A box keeping less than `min_visible` of its area (or under one pixel in
width or height) after clipping is dropped, and counted (the documented rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["ViewParams", "augment_batch", "view_params"]


@dataclass
class ViewParams:
    """Per-sample (B,) scale, x/y offsets of the resized image in the output (pixels), flip."""

    scale: Tensor
    offset_x: Tensor
    offset_y: Tensor
    flip: Tensor


def view_params(index: Tensor, epoch: int, seed: int, in_size: tuple[int, int], out_size: int,
                scale_range: tuple[float, float] = (0.75, 1.25), flip: bool = True) -> ViewParams:
    """The views of data set positions `index` at `epoch` (each a pure function of seed, epoch, position)."""
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise KdforgeError(f"detection augmentation: need 0 < scale_range[0] <= scale_range[1], got {scale_range}")
    h, w = in_size
    rows = []
    for i in index.tolist():
        g = seeded_generator(seed, 4711, epoch, int(i))
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        s = lo + (hi - lo) * u[0]
        # the resized image may be larger (crop) or smaller (pad) than the output: any placement
        span_x, span_y = out_size - w * s, out_size - h * s
        ox = min(0.0, span_x) + abs(span_x) * u[1]
        oy = min(0.0, span_y) + abs(span_y) * u[2]
        rows.append((s, ox, oy, float(flip and u[3] < 0.5)))
    t = torch.tensor(rows, dtype=torch.float64)
    return ViewParams(t[:, 0], t[:, 1], t[:, 2], t[:, 3].bool())


def augment_batch(images: Tensor, boxes: list[Tensor], labels: list[Tensor], params: ViewParams, out_size: int,
                  min_visible: float = 0.3) -> tuple[Tensor, list[Tensor], list[Tensor], int]:
    """Warp a float (B, C, H, W) batch and its xyxy boxes by `params`; (images, boxes, labels, dropped).

    Output pixel centre u maps to input x = (u' - offset) / scale with u' = u, or out - u when
    flipped; boxes map forward by the same rule.
    """
    if images.dim() != 4 or len(boxes) != images.shape[0] or len(labels) != images.shape[0]:
        raise KdforgeError(f"augment_batch: images (B, C, H, W) with B box and label tensors, got "
                           f"{tuple(images.shape)}, {len(boxes)}, {len(labels)}")
    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype
    s = params.scale.to(dev, dt)[:, None, None]
    ox, oy = params.offset_x.to(dev, dt)[:, None, None], params.offset_y.to(dev, dt)[:, None, None]
    centres = torch.arange(out_size, device=dev, dtype=dt) + 0.5
    u = centres[None, None, :].expand(b, out_size, out_size)
    v = centres[None, :, None].expand(b, out_size, out_size)
    u = torch.where(params.flip.to(dev)[:, None, None], out_size - u, u)
    x, y = (u - ox) / s, (v - oy) / s                       # input pixel coordinates
    grid = torch.stack([2 * x / w - 1, 2 * y / h - 1], dim=-1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    new_boxes, new_labels, dropped = [], [], 0
    for k in range(b):
        bx, lb = boxes[k].to(dev, torch.float64), labels[k].to(dev)
        if bx.numel() == 0:
            new_boxes.append(bx.reshape(0, 4).to(dt))
            new_labels.append(lb)
            continue
        sk, oxk, oyk = params.scale[k].item(), params.offset_x[k].item(), params.offset_y[k].item()
        x1, y1, x2, y2 = bx[:, 0] * sk + oxk, bx[:, 1] * sk + oyk, bx[:, 2] * sk + oxk, bx[:, 3] * sk + oyk
        if bool(params.flip[k]):
            x1, x2 = out_size - x2, out_size - x1
        full = ((x2 - x1) * (y2 - y1)).clamp_min(1e-12)
        cx1, cy1 = x1.clamp(0, out_size), y1.clamp(0, out_size)
        cx2, cy2 = x2.clamp(0, out_size), y2.clamp(0, out_size)
        keep = ((cx2 - cx1) * (cy2 - cy1) / full >= min_visible) & (cx2 - cx1 >= 1) & (cy2 - cy1 >= 1)
        dropped += int((~keep).sum())
        new_boxes.append(torch.stack([cx1, cy1, cx2, cy2], 1)[keep].to(dt))
        new_labels.append(lb[keep])
    return out, new_boxes, new_labels, dropped
