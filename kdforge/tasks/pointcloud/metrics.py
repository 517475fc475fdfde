"""BEV / 3D average precision of rotated-box detections (KITTI protocol: greedy matching, 40 recall points).

Per class, detections of all scenes are sorted by score; each takes the unmatched ground-truth
box of its scene with the highest IoU if that IoU reaches the class's threshold (true positive),
else it is a false positive. AP is KITTI's R40: the mean over recall levels 1/40, 2/40, ..., 1 of
the best precision at a recall at least that high (0 where the recall is never reached). The
mean over classes that have ground truth is reported in %.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.iou import bev_iou, iou_3d

__all__ = ["KITTI_IOU", "Detections", "average_precision", "detection_ap", "greedy_match", "match_scene"]

# KITTI's official thresholds per class (car 0.7, pedestrian / cyclist 0.5)
KITTI_IOU = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}

Detections = tuple[Tensor, Tensor, Tensor]      # boxes (D, 7), scores (D,), labels (D,)


def average_precision(scores: Tensor, true_positive: Tensor, num_gt: int, recall_points: int = 40) -> float:
    """KITTI R40 AP in [0, 1] of detections (`scores`, `true_positive` flags) against `num_gt` boxes."""
    if num_gt <= 0:
        raise KdforgeError("average_precision: no ground-truth box of this class")
    if len(scores) == 0:
        return 0.0
    order = torch.argsort(scores.double(), descending=True, stable=True)
    tp = true_positive[order].double()
    ctp = tp.cumsum(0)
    recall = ctp / num_gt
    precision = ctp / torch.arange(1, len(tp) + 1, dtype=torch.float64)
    total = 0.0
    for k in range(1, recall_points + 1):
        reached = recall >= k / recall_points - 1e-12
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / recall_points


def greedy_match(det_boxes: Tensor, det_scores: Tensor, gt_boxes: Tensor, threshold: float,
                 iou: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(matched detections (D,), matched ground truth (G,)) of one scene: detections in score order each
    take the best-overlapping unmatched GT box when the overlap reaches `threshold`."""
    flags = torch.zeros(len(det_boxes), dtype=torch.bool)
    used = torch.zeros(len(gt_boxes), dtype=torch.bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return flags, used
    overlaps = iou(det_boxes, gt_boxes)
    for d in torch.argsort(det_scores.double(), descending=True, stable=True).tolist():
        cand = overlaps[d].masked_fill(used, -1.0)
        best = int(cand.argmax())
        if float(cand[best]) >= threshold:
            used[best] = True
            flags[d] = True
    return flags, used


def match_scene(det_boxes: Tensor, det_scores: Tensor, gt_boxes: Tensor, threshold: float,
                iou: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """True-positive flags of one scene's detections (greedy in score order, each GT matched once)."""
    return greedy_match(det_boxes, det_scores, gt_boxes, threshold, iou)[0]


def detection_ap(detections: Sequence[Detections], ground_truth: Sequence[tuple[Tensor, Tensor]],
                 class_names: Sequence[str], thresholds: dict[str, float] | float,
                 kind: str | Callable[[Tensor, Tensor], Tensor] = "bev") -> dict[str, float]:
    """{'<class>': AP %, 'mean': mean over classes with ground truth} at the classes' IoU thresholds.

    `kind` is the overlap: "bev" or "3d" IoU, or any (det, gt) -> (D, G) similarity matched against
    the thresholds (e.g. a centre-distance closeness)."""
    if len(detections) != len(ground_truth):
        raise KdforgeError(f"detection_ap: {len(detections)} scenes of detections but {len(ground_truth)} of truth")
    if not callable(kind) and kind not in ("bev", "3d"):
        raise KdforgeError(f"detection_ap: kind must be 'bev' or '3d', got {kind!r}")
    iou = kind if callable(kind) else bev_iou if kind == "bev" else iou_3d
    out: dict[str, float] = {}
    for c, name in enumerate(class_names):
        thr = thresholds if isinstance(thresholds, float) else thresholds.get(name, 0.5)
        scores, flags, num_gt = [], [], 0
        for (boxes, sc, lab), (gt, gl) in zip(detections, ground_truth, strict=True):
            d, g = lab == c, gl == c
            num_gt += int(g.sum())
            scores.append(sc[d].detach().cpu())
            flags.append(match_scene(boxes[d].detach().cpu(), sc[d].detach().cpu(), gt[g].cpu(), thr, iou))
        if num_gt:
            out[name] = 100.0 * average_precision(torch.cat(scores), torch.cat(flags), num_gt)
    out["mean"] = sum(out.values()) / len(out) if out else 0.0
    return out
