"""RDD's pure losses (Li et al., ICCV 2023): region crops, channel softmax, the inner problem, L_feat / L_logit.

Representation-disparity-aware distillation compares teacher and student BEV features in the same
proposal regions, normalised by a softmax over channels (tau 4); the closed form of its L1 inner
problem keeps the pairs whose disparity exceeds `lam` times their scene's mean; the kept pairs'
feature disparity and heatmap L1 are the two losses. The method around them (proposals, adapter,
teacher) is `kdforge.methods.rdd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["channel_softmax", "inner_weights", "rdd_losses", "region_features"]


def region_features(features: Tensor, rois: Tensor, size: int, spatial_scale: float) -> Tensor:
    """(R, C, size, size) RoIAlign of `rois` with one bilinear sample per bin, every scene in one grid_sample.

    Same values as `kdforge.tasks.detection.roi.roi_align(..., sampling_ratio=1)` (aligned boxes; a sample
    more than a cell outside the map reads 0, one within a cell of the edge the clamped edge value), but
    one call for the whole batch: the regions of each scene are padded to the batch's largest count.
    """
    b, c, h, w = features.shape
    if len(rois) == 0:
        return features.new_zeros(0, c, size, size)
    scene = rois[:, 0].long()
    box = rois[:, 1:].to(features.dtype) * spatial_scale - 0.5
    steps = (torch.arange(size, device=features.device, dtype=features.dtype) + 0.5) / size
    px = box[:, 0:1] + steps[None] * (box[:, 2:3] - box[:, 0:1])          # (R, size)
    py = box[:, 1:2] + steps[None] * (box[:, 3:4] - box[:, 1:2])
    inside = (((px >= -1) & (px <= w))[:, None, :] & ((py >= -1) & (py <= h))[:, :, None]).to(features.dtype)
    grid = torch.stack([((2 * px + 1) / w - 1)[:, None, :].expand(-1, size, -1),
                        ((2 * py + 1) / h - 1)[:, :, None].expand(-1, -1, size)], -1).reshape(len(rois), -1, 2)
    counts = torch.bincount(scene, minlength=b)
    slot = (torch.nn.functional.one_hot(scene, b).cumsum(0) - 1).gather(1, scene[:, None])[:, 0]   # rank in scene
    padded = grid.new_full((b, int(counts.max()), size * size, 2), 0.0)
    padded[scene, slot] = grid
    sampled = torch.nn.functional.grid_sample(features, padded, mode="bilinear", padding_mode="border",
                                              align_corners=False)             # (B, C, Rmax, size * size)
    out = sampled[scene, :, slot]                                                # (R, C, size * size)
    return out.reshape(len(rois), c, size, size) * inside[:, None]


def channel_softmax(regions: Tensor, tau: float) -> Tensor:
    """Softmax over channels (dim 1) of regions / tau at every cell (computed on a channels-last view: faster)."""
    return torch.softmax(regions.movedim(1, -1) / tau, dim=-1).movedim(-1, 1)


@torch.no_grad()
def inner_weights(disparity: Tensor, scene: Tensor, lam: float) -> Tensor:
    """m_i = 1[d_i / mean_{j in scene(i)} d_j > lam]: the closed form of the inner problem, per scene."""
    if len(disparity) == 0:
        return disparity.new_zeros(0)
    n = int(scene.max()) + 1
    total = disparity.new_zeros(n).index_add(0, scene, disparity.detach())
    count = disparity.new_zeros(n).index_add(0, scene, torch.ones_like(disparity))
    mean = (total / count.clamp_min(1))[scene]
    return (disparity.detach() > lam * mean).to(disparity.dtype)


def rdd_losses(f_s: Tensor, f_t: Tensor, p_s: Tensor, p_t: Tensor, rois: Tensor, scene: Tensor, batch_size: int,
               cell: float, tau: float, lam: float, roi_size: int, weighting: str = "rdd"
               ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(L_feat, L_logit, stats) of the region pairs `rois` on adapted student / teacher features and heatmap probs.

    Each scene's pairs are averaged (1/(M+N)); scenes without pairs add 0; the mean is over the batch's scenes.
    """
    if len(rois) == 0:
        zero = f_s.sum() * 0
        return zero, zero, {"active": zero.detach(), "pairs": zero.detach(), "disparity": f_s.new_zeros(0)}
    scale = 1.0 / cell
    r_s = channel_softmax(region_features(f_s, rois, roi_size, scale), tau)
    r_t = channel_softmax(region_features(f_t, rois, roi_size, scale), tau)
    d = (r_s - r_t).flatten(1).norm(dim=1)
    m = inner_weights(d, scene, lam) if weighting == "rdd" else torch.ones_like(d)
    q_s, q_t = region_features(p_s, rois, roi_size, scale), region_features(p_t, rois, roi_size, scale)
    logit = (q_s - q_t).abs().sum(1).flatten(1).mean(1)
    count = d.new_zeros(batch_size).index_add(0, scene, torch.ones_like(d)).clamp_min(1)
    l_feat = (d.new_zeros(batch_size).index_add(0, scene, m * d) / count).mean()
    l_logit = (d.new_zeros(batch_size).index_add(0, scene, m * logit) / count).mean()
    return l_feat, l_logit, {"active": m.mean().detach(), "pairs": d.new_tensor(float(len(d))),
                             "disparity": d.detach()}
