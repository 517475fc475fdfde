"""ZeroSeg's two distillation losses as pure functions (Chen et al., ICCV 2023, card p04).

The teacher (a CLIP image encoder) embeds n views of each image: the full image first, then the
cells of 2x2, 3x3, 4x4 ... grids. The student gives one pooled image embedding z and m segment
tokens g_1..g_m, all in the teacher's embedding space.

* `multiscale_global_l1(z, v)`: mean over views j of |z - v_j|_1 (L1 norm over the embedding),
  mean over the batch; with only the full-image view it is the paper's ablation base.
* `segment_matching_l1(g, v_local)`: for every segment the L1 distance to its nearest *local*
  view, summed over segments, mean over the batch. The caller passes the grid cells only: the
  full-image view must not be a candidate (segments would collapse onto the global concept).

Both sides should use the same convention (ZeroSeg leaves it open; kdforge L2-normalises both).
"""

from __future__ import annotations

from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["multiscale_global_l1", "segment_matching_l1"]


def multiscale_global_l1(z: Tensor, v: Tensor) -> Tensor:
    """mean_b mean_j |z_b - v_bj|_1 for z (B, D) and view embeddings v (B, n, D)."""
    if z.dim() != 2 or v.dim() != 3 or v.shape[0] != z.shape[0] or v.shape[2] != z.shape[1] or v.shape[1] < 1:
        raise KdforgeError(f"multiscale_global_l1: need z (B, D) and v (B, n >= 1, D), got {tuple(z.shape)} and "
                           f"{tuple(v.shape)}")
    return (z.unsqueeze(1) - v).abs().sum(-1).mean()


def segment_matching_l1(g: Tensor, v_local: Tensor) -> Tensor:
    """mean_b sum_i min_j |g_bi - v_bj|_1 for segment tokens g (B, m, D) and local views v_local (B, n, D)."""
    if g.dim() != 3 or v_local.dim() != 3 or g.shape[0] != v_local.shape[0] or g.shape[2] != v_local.shape[2] \
            or v_local.shape[1] < 1:
        raise KdforgeError(f"segment_matching_l1: need g (B, m, D) and v_local (B, n >= 1, D), got "
                           f"{tuple(g.shape)} and {tuple(v_local.shape)}")
    dist = (g.unsqueeze(2) - v_local.unsqueeze(1)).abs().sum(-1)        # (B, m, n)
    return dist.min(dim=2).values.sum(1).mean()

