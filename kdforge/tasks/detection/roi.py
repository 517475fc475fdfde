"""RoIAlign in plain torch (torchvision's ops do not install here), via `grid_sample`.

Semantics follow RoIAlign (He et al.) with `aligned=True` as in torchvision / Detectron2: a box
(x1, y1, x2, y2) in image pixels is scaled by `spatial_scale` and shifted by -0.5 so that feature
index i sits at continuous coordinate i; the box is split into out_h x out_w bins, each averaged
over sampling_ratio x sampling_ratio bilinear samples at the sub-bin centres. A sample more than
one pixel outside the map reads 0, one within a pixel of the edge reads the clamped edge value
(border padding plus a mask reproduces exactly that). Differentiable in the features (and the
boxes, through grid_sample). Boxes of image b are sampled from feature map b in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["roi_align", "rois_from_list"]


def rois_from_list(boxes: list[Tensor]) -> Tensor:
    """(R, 5) rows (image index, x1, y1, x2, y2) from a list of per-image (G_b, 4) boxes."""
    if not boxes:
        return torch.zeros(0, 5)
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype, device=b.device), b], 1)
                      for i, b in enumerate(boxes)])


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = 2) -> Tensor:
    """(R, C, out_h, out_w) pooled features of `rois` (R, 5: image index, x1, y1, x2, y2 in pixels)."""
    if features.dim() != 4:
        raise KdforgeError(f"roi_align: features must be (B, C, H, W), got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise KdforgeError(f"roi_align: rois must be (R, 5) rows of (image, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if sampling_ratio < 1:
        raise KdforgeError(f"roi_align: sampling_ratio must be >= 1, got {sampling_ratio}")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    B, C, H, W = features.shape
    s = sampling_ratio
    out = features.new_zeros(len(rois), C, out_h, out_w)
    if len(rois) == 0:
        return out
    box = rois[:, 1:].to(features.dtype) * spatial_scale - 0.5
    x1, y1 = box[:, 0:1], box[:, 1:2]
    bin_w = (box[:, 2:3] - x1) / out_w
    bin_h = (box[:, 3:4] - y1) / out_h
    fx = (torch.arange(out_w * s, device=features.device, dtype=features.dtype) + 0.5) / s      # in bins
    fy = (torch.arange(out_h * s, device=features.device, dtype=features.dtype) + 0.5) / s
    px = x1 + fx[None] * bin_w                  # (R, out_w * s) sample x in feature index units
    py = y1 + fy[None] * bin_h                  # (R, out_h * s)
    inside = (((px >= -1) & (px <= W))[:, None, :] & ((py >= -1) & (py <= H))[:, :, None]).to(features.dtype)
    gx = (2 * px + 1) / W - 1                   # grid_sample, align_corners=False: index i <-> (2i + 1) / W - 1
    gy = (2 * py + 1) / H - 1
    grid = torch.stack([gx[:, None, :].expand(-1, out_h * s, -1), gy[:, :, None].expand(-1, -1, out_w * s)], -1)
    image = rois[:, 0].long()
    rows, pooled = [], []
    for b in image.unique().tolist():
        sel = (image == b).nonzero()[:, 0]
        g = grid[sel].reshape(1, -1, out_w * s, 2)                        # (1, R_b * out_h * s, out_w * s, 2)
        v = F.grid_sample(features[b:b + 1], g, mode="bilinear", padding_mode="border", align_corners=False)
        v = v.reshape(C, len(sel), out_h * s, out_w * s).permute(1, 0, 2, 3) * inside[sel][:, None]
        rows.append(sel)
        pooled.append(v.reshape(len(sel), C, out_h, s, out_w, s).mean(dim=(3, 5)))
    # one scatter of every image's rows: per-image in-place writes would make backward copy the whole
    # output once per image (quadratic in the batch)
    return out.index_copy(0, torch.cat(rows), torch.cat(pooled))
