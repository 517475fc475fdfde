"""Unsupervised point segmentation pieces: super-voxels, cosine k-means, and Hungarian-matched mIoU.

* `supervoxels(points, batch, voxel, bins, ...)`: a coarse voxel grid intersected with intensity
  bins (the LiDAR stand-in for PointDC's colour / normal splits): every point gets the id of its
  (scene, voxel, intensity bin) cell, ids 0..S-1; points outside the box get -1.
* `segment_mean(values, ids, num)`: the per-super-voxel mean of point values.
* `kmeans_cosine(x, k, seed)`: scikit-learn k-means on L2-normalised rows (PointDC's faiss inner-product
  k-means substitute), the centroids L2-normalised again; `assign_cosine` gives each row its most similar
  centroid.
* `hungarian_miou(pred, target, num_classes)`: the evaluation of unsupervised segmentation: the
  confusion between clusters and true classes, a one-to-one matching of clusters to classes that
  maximises the matched points (scipy `linear_sum_assignment`), then per-class IoU
  tp / (tp + fp + fn) and their mean; points of clusters matched to no class are false negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.geometry import scatter_mean, voxelize

__all__ = ["assign_cosine", "confusion", "hungarian_miou", "kmeans_cosine", "segment_mean", "supervoxels"]


def supervoxels(points: Tensor, batch: Tensor | None, voxel: float, bins: int, lo: tuple[float, float, float],
                hi: tuple[float, float, float]) -> Tensor:
    """(N,) super-voxel ids 0..S-1 (-1 outside [lo, hi)): voxel grid of side `voxel` x `bins` intensity bins."""
    if points.dim() != 2 or points.shape[1] < 4:
        raise KdforgeError(f"supervoxels: points must be (N, >= 4) with intensity in column 3, got "
                           f"{tuple(points.shape)}")
    if voxel <= 0 or bins < 1:
        raise KdforgeError(f"supervoxels: need voxel > 0 and bins >= 1, got {voxel} and {bins}")
    vox = voxelize(points, batch, lo, hi, (voxel, voxel, voxel))
    level = (points[:, 3].clamp(0, 1) * bins).long().clamp(max=bins - 1)
    key = torch.where(vox.inverse >= 0, vox.inverse * bins + level, torch.full_like(level, -1))
    out = torch.full_like(key, -1)
    inside = key >= 0
    out[inside] = torch.unique(key[inside], return_inverse=True)[1]
    return out


def segment_mean(values: Tensor, ids: Tensor, num: int | None = None) -> Tensor:
    """(num, C) mean of `values` (N, C) over the points of each id (ids -1 are ignored; empty ids give 0)."""
    return scatter_mean(values, ids, int(ids.max()) + 1 if num is None else num)


def kmeans_cosine(x: Tensor, k: int, seed: int, iters: int = 80, n_init: int = 3) -> Tensor:
    """(k, C) L2-normalised centroids of scikit-learn k-means on the L2-normalised rows of `x` (M, C)."""
    from sklearn.cluster import KMeans

    if len(x) < k:
        raise KdforgeError(f"k-means: {len(x)} samples for {k} clusters")
    xn = F.normalize(x.double(), dim=1).numpy()
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=iters, random_state=seed).fit(xn)
    return F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=1)


def assign_cosine(x: Tensor, centroids: Tensor) -> Tensor:
    """(M,) index of the most similar (cosine) centroid of every row of `x`."""
    return (F.normalize(x.float(), dim=1) @ F.normalize(centroids.float(), dim=1).T).argmax(1)


def confusion(pred: Tensor, target: Tensor, num_classes: int, num_clusters: int) -> Tensor:
    """(num_classes, num_clusters) counts of points of true class i in cluster j (targets < 0 ignored)."""
    keep = (target >= 0) & (target < num_classes)
    idx = target[keep].long() * num_clusters + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_clusters).reshape(num_classes, num_clusters)


def hungarian_miou(pred: Tensor, target: Tensor, num_classes: int, num_clusters: int | None = None
                   ) -> dict[str, float | list[float]]:
    """mIoU (%) of clusters `pred` against classes `target` after the best one-to-one matching.

    Returns {miou, oacc (% of points in their class's matched cluster), ious (per class, %),
    match (the cluster matched to each class, -1 none)}. Classes absent from `target` and never
    matched are left out of the mean (nan IoU), as the official `nanmean`.
    """
    from scipy.optimize import linear_sum_assignment

    if pred.shape != target.shape:
        raise KdforgeError(f"hungarian_miou: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    k = int(num_clusters if num_clusters is not None else max(num_classes, int(pred.max()) + 1 if len(pred) else 0))
    hist = confusion(pred, target, num_classes, k).double()
    rows, cols = linear_sum_assignment(-hist.numpy())
    match = [-1] * num_classes
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        match[r] = c
    ious = []
    for c in range(num_classes):
        gt = float(hist[c].sum())
        if match[c] < 0:
            ious.append(0.0 if gt > 0 else float("nan"))
            continue
        tp = float(hist[c, match[c]])
        fp = float(hist[:, match[c]].sum()) - tp
        fn = gt - tp
        ious.append(100.0 * tp / (tp + fp + fn) if tp + fp + fn > 0 else float("nan"))
    valid = [v for v in ious if v == v]
    total = float(hist.sum())
    oacc = 100.0 * sum(float(hist[c, m]) for c, m in enumerate(match) if m >= 0) / max(1.0, total)
    return {"miou": sum(valid) / max(1, len(valid)), "oacc": oacc, "ious": ious, "match": match}
