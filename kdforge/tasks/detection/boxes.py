"""Box geometry in plain torch (torchvision does not install here): conversions, IoU, batched NMS."""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["batched_nms", "box_area", "box_iou", "nms", "xywh_to_xyxy", "xyxy_to_xywh"]


def _check(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise KdforgeError(f"{name}: boxes must be (N, 4), got {tuple(boxes.shape)}")


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO [x, y, w, h] -> corners [x1, y1, x2, y2]."""
    _check(boxes, "xywh_to_xyxy")
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    _check(boxes, "xyxy_to_xywh")
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of xyxy boxes (0 for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) IoU of xyxy boxes (0 where the union is empty)."""
    _check(a, "box_iou")
    _check(b, "box_iou")
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: indices of kept boxes, by decreasing score (ties: lower index first).

    A box is suppressed when its IoU with a higher-scored kept box is > `iou_threshold`. The
    IoU matrix is computed once; the greedy pass walks it on the device.
    """
    _check(boxes, "nms")
    if scores.shape != (boxes.shape[0],):
        raise KdforgeError(f"nms: scores must be ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = box_iou(boxes[order], boxes[order]) > iou_threshold
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ~over[i, i + 1:]
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class (boxes of different classes never suppress each other).

    Each class is shifted by an offset larger than every box, so one NMS pass does all classes.
    """
    _check(boxes, "batched_nms")
    if classes.shape != (boxes.shape[0],):
        raise KdforgeError(f"batched_nms: classes must be ({boxes.shape[0]},), got {tuple(classes.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    span = (boxes.max() - boxes.min()).abs() + 1
    shifted = boxes + (classes.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)
