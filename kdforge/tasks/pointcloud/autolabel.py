"""Auto-labels from motion: cluster each frame, track the key frame's clusters, fit boxes (UP-VL's labeller).

Per frame the non-ground points (z > ground + `ground_clear`) are clustered in BEV (scikit-learn's
DBSCAN, `eps`); the key frame's clusters are tracked through the sequence (Hungarian association of
centroids with a constant-velocity prediction and a `gate`, scipy); a track's velocity is the
least-squares slope of its centroids, and it is moving when |v| > `v_min` and |v| > `motion_snr`
standard errors over >= `min_frames` frames. With a per-point semantic score (the cosine of a
point's vision-language feature to an "object" prompt) a static cluster whose mean score passes
`sem_threshold` is an object too. A moving track's points of every frame are moved back into the
key frame (temporal aggregation) before its box is fitted along the motion; a static one's box
follows the minimum-area rectangle. kdforge/methods/upvl.py uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.tasks.pointcloud.sequences import Sequence

__all__ = ["AutoLabelConfig", "auto_label", "fit_box", "track_clusters"]


@dataclass
class AutoLabelConfig:
    ground_clear: float = 0.3            # points higher than ground + this are clustered (m)
    eps: float = 0.8                     # DBSCAN neighbourhood (m, BEV)
    min_points: int = 5                  # smallest cluster kept
    gate: float = 2.5                    # largest centroid distance for an association (m)
    min_frames: int = 3                  # frames (>= 3) a track must be seen in to count as moving
    v_min: float = 0.5                   # speed above which a track is moving (m/s)
    motion_snr: float = 4.0              # ... and above this many standard errors of the fitted speed
    sem_threshold: float = 0.3           # mean cosine to the generic prompt above which a cluster is an object
    min_visible: int = 3                 # key-frame points with a VL feature a semantic decision needs
    min_size: float = 0.4                # smallest box side (m)


def _clusters(points: Tensor, ground_z: float, cfg: AutoLabelConfig) -> tuple[Tensor, Tensor]:
    """(cluster id (N,) -1 = none, centroids (C, 2)) of the non-ground points of one frame."""
    from sklearn.cluster import DBSCAN

    ids = torch.full((len(points),), -1, dtype=torch.long)
    above = points[:, 2] > ground_z + cfg.ground_clear
    if int(above.sum()) == 0:
        return ids, torch.zeros(0, 2)
    lab = torch.from_numpy(DBSCAN(eps=cfg.eps, min_samples=3).fit(points[above, :2].double().numpy()).labels_).long()
    sizes = torch.bincount(lab[lab >= 0]) if (lab >= 0).any() else torch.zeros(0, dtype=torch.long)
    keep = torch.nonzero(sizes >= cfg.min_points).flatten()
    remap = torch.full((len(sizes) + 1,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    ids[above] = torch.where(lab >= 0, remap[lab.clamp(min=0)], -1)
    cents = torch.stack([points[ids == c, :2].mean(0) for c in range(len(keep))]) if len(keep) else torch.zeros(0, 2)
    return ids, cents


def track_clusters(centroids: list[Tensor], dt: float, gate: float) -> Tensor:
    """(C0, T) index of the cluster each key-frame cluster is associated with in every frame (-1 unmatched).

    Frame by frame, each track predicts its centroid at constant velocity (estimated from its first and
    last matched centroids; 0 until a second match) and the Hungarian assignment on predicted distances
    within `gate` metres extends it."""
    from scipy.optimize import linear_sum_assignment

    n0, frames = len(centroids[0]), len(centroids)
    match = torch.full((n0, frames), -1, dtype=torch.long)
    match[:, 0] = torch.arange(n0)
    last = centroids[0].double().clone()
    last_t = torch.zeros(n0, dtype=torch.long)
    vel = torch.zeros(n0, 2, dtype=torch.float64)
    for t in range(1, frames):
        cur = centroids[t].double()
        if n0 == 0 or len(cur) == 0:
            continue
        pred = last + vel * ((t - last_t).double() * dt)[:, None]
        cost = torch.cdist(pred, cur)
        big = cost.masked_fill(cost > gate, 1e6)
        rows, cols = linear_sum_assignment(big.numpy())
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if float(cost[r, c]) <= gate:
                match[r, t] = c
                vel[r] = (cur[c] - centroids[0][r].double()) / (t * dt)
                last[r], last_t[r] = cur[c], t
    return match


def fit_box(points: Tensor, ground_z: float, heading: float | None, min_size: float) -> Tensor:
    """(7,) box of BEV-aggregated points: heading given (motion) or the minimum-area rectangle's long axis."""
    xy = points[:, :2].double()
    if heading is None:
        best = None
        for k in range(30):                          # 3 deg steps over [0, 90)
            a = k * math.pi / 60
            c, s = math.cos(a), math.sin(a)
            u, v = xy @ torch.tensor([c, s], dtype=torch.float64), xy @ torch.tensor([-s, c], dtype=torch.float64)
            area = float((u.max() - u.min()) * (v.max() - v.min()))
            if best is None or area < best[0] - 1e-12:
                best = (area, a, float(u.max() - u.min()), float(v.max() - v.min()))
        heading = best[1] if best[2] >= best[3] else best[1] + math.pi / 2
    c, s = math.cos(heading), math.sin(heading)
    u, v = xy @ torch.tensor([c, s], dtype=torch.float64), xy @ torch.tensor([-s, c], dtype=torch.float64)
    cu, cv = float(u.max() + u.min()) / 2, float(v.max() + v.min()) / 2
    length, width = max(float(u.max() - u.min()), min_size), max(float(v.max() - v.min()), min_size)
    height = max(float(points[:, 2].max()) - ground_z, min_size)
    x, y = cu * c - cv * s, cu * s + cv * c
    return torch.tensor([x, y, ground_z + height / 2, length, width, height, heading], dtype=torch.float32)


def auto_label(seq: Sequence, ground_z: float, cfg: AutoLabelConfig, semantic: Tensor | None
               ) -> tuple[Tensor, Tensor]:
    """(boxes (K, 7), moving (K,) bool) of the key frame: moving tracks, plus, with `semantic` (the key frame's
    per-point cosine to the generic prompt, NaN where unknown), the clusters whose mean score passes."""
    parts = [_clusters(f.points, ground_z, cfg) for f in seq.frames]
    match = track_clusters([p[1] for p in parts], seq.dt, cfg.gate)
    boxes, moving = [], []
    for c in range(match.shape[0]):
        seen = torch.nonzero(match[c] >= 0).flatten().tolist()
        cents = torch.stack([parts[t][1][match[c, t]] for t in seen]).double()
        v, stderr = torch.zeros(2, dtype=torch.float64), math.inf
        if len(seen) >= 3:          # least-squares line through the centroids and its slope's standard error
            tt = torch.tensor(seen, dtype=torch.float64) * seq.dt
            tc = tt - tt.mean()
            v = (tc[:, None] * (cents - cents.mean(0))).sum(0) / (tc ** 2).sum()
            res = cents - cents.mean(0) - tc[:, None] * v
            stderr = math.sqrt(float((res ** 2).sum()) / (2 * (len(seen) - 2)) / float((tc ** 2).sum()))
        speed = float(v.norm())
        is_moving = len(seen) >= cfg.min_frames and speed > cfg.v_min and speed > cfg.motion_snr * stderr
        is_object = is_moving
        if not is_object and semantic is not None:
            s = semantic[parts[0][0] == c]
            s = s[~s.isnan()]
            is_object = len(s) >= cfg.min_visible and float(s.mean()) > cfg.sem_threshold
        if not is_object:
            continue
        pts = []
        for t in (seen if is_moving else [0]):
            p = seq.frames[t].points[parts[t][0] == match[c, t], :3].double().clone()
            p[:, :2] -= v * (t * seq.dt)
            pts.append(p)
        heading = math.atan2(float(v[1]), float(v[0])) if is_moving else None
        boxes.append(fit_box(torch.cat(pts), ground_z, heading, cfg.min_size))
        moving.append(is_moving)
    if not boxes:
        return torch.zeros(0, 7), torch.zeros(0, dtype=torch.bool)
    return torch.stack(boxes), torch.tensor(moving)
