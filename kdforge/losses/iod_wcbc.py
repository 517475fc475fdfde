"""Within- and between-class distillation for incremental object detection (card p02, DMD + IFD).

Forgetting in class-incremental detection is read as damage to the old classes' semantic
space: classes drift toward each other (between-class) and instances of a class scatter
(within-class). Two terms, both comparing the frozen old model (teacher) with the student on
the same pseudo-objects (old-class instances the teacher finds in a new-task image):

* `distance_matrix_kd` (DMD): Euclidean class-to-class distance matrices of the two models'
  class prototypes must agree: mean_{c,c'} (D^S[c,c'] - D^T[c,c'])^2. The prototypes are any
  (C, D) sets in the same class order (decoder query embeddings, box-pooled features).
* `semantic_guided_feature_kd` (IFD): each instance's low-level feature gap inside its box
  (mean squared difference of the two feature maps over the cells of the box and the
  channels) is weighted by softmax_i(||q_i^S - q_i^T||) over the instances (detached), so the
  instances whose meaning drifted most are anchored hardest.

Not registered in `kdforge.registry.LOSSES`: those entries are `DistillLoss` modules over
per-sample (student, teacher) taps; these terms need class prototypes and instance boxes,
which only the incremental-detection method builds. Card items marked (R) are reconstructions
(official code is not public): the IFD formula's normalisation and the box pooling are ours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["box_cells", "box_mean", "class_prototypes", "distance_matrix", "distance_matrix_kd",
           "semantic_guided_feature_kd"]


def distance_matrix(protos: Tensor) -> Tensor:
    """(C, C) Euclidean distances between the rows of (C, D) prototypes (zero diagonal, finite gradient)."""
    sq = (protos[:, None, :] - protos[None, :, :]).pow(2).sum(-1)
    off = ~torch.eye(protos.shape[0], dtype=torch.bool, device=protos.device)
    return torch.where(off, sq.clamp_min(1e-12).sqrt(), torch.zeros_like(sq))


def distance_matrix_kd(protos_t: Tensor, protos_s: Tensor) -> Tensor:
    """DMD: mean over (c, c') of (D^S - D^T)^2 with D the Euclidean class-distance matrix; teacher detached."""
    if protos_t.dim() != 2 or protos_s.dim() != 2 or protos_t.shape[0] != protos_s.shape[0]:
        raise KdforgeError(f"distance_matrix_kd: prototypes must be (C, D) sets with the same C, got "
                           f"{tuple(protos_t.shape)} and {tuple(protos_s.shape)}")
    if protos_t.shape[0] < 2:
        return protos_s.sum() * 0
    d_t = distance_matrix(protos_t.detach().float())
    d_s = distance_matrix(protos_s.float())
    return (d_s - d_t).pow(2).mean()


def class_prototypes(embeddings: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
    """(C, D) mean embedding of each class in `classes` (each must occur in `labels`)."""
    rows = [embeddings[labels == c].mean(0) for c in classes.tolist()]
    if not rows:
        return embeddings.new_zeros(0, embeddings.shape[-1])
    return torch.stack(rows)


def box_cells(boxes: Tensor, grid: tuple[int, int], stride: float) -> Tensor:
    """(N, H*W) bool: the feature cells whose centres lie inside each pixel-xyxy box.

    A box holding no cell centre (smaller than a cell) gets the cell under its centre, so every
    instance has at least one cell."""
    h, w = grid
    ys = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    xs = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    xx, yy = xx.reshape(1, -1), yy.reshape(1, -1)
    inside = (xx >= boxes[:, 0:1]) & (xx <= boxes[:, 2:3]) & (yy >= boxes[:, 1:2]) & (yy <= boxes[:, 3:4])
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 / stride).long().clamp(0, w - 1)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 / stride).long().clamp(0, h - 1)
    centre = torch.zeros_like(inside)
    centre[torch.arange(len(boxes), device=boxes.device), cy * w + cx] = True
    return torch.where(inside.any(1, keepdim=True), inside, centre)


def _check_instances(feat: Tensor, boxes: Tensor, image_index: Tensor, name: str) -> None:
    if feat.dim() != 4 or boxes.dim() != 2 or boxes.shape[1] != 4 or image_index.shape != (boxes.shape[0],):
        raise KdforgeError(f"{name}: need features (B, C, H, W), boxes (N, 4) and image_index (N,), got "
                           f"{tuple(feat.shape)}, {tuple(boxes.shape)} and {tuple(image_index.shape)}")


def box_mean(feat: Tensor, boxes: Tensor, image_index: Tensor, stride: float) -> Tensor:
    """(N, C) mean of each instance's image feature map over the cells of its pixel-xyxy box."""
    _check_instances(feat, boxes, image_index, "box_mean")
    cells = box_cells(boxes.float(), tuple(feat.shape[-2:]), stride).to(feat.dtype)      # (N, HW)
    flat = feat.flatten(2)[image_index]                                                  # (N, C, HW)
    return (flat * cells[:, None]).sum(-1) / cells.sum(-1, keepdim=True)


def semantic_guided_feature_kd(q_t: Tensor, q_s: Tensor, feat_t: Tensor, feat_s: Tensor, boxes: Tensor,
                               image_index: Tensor, stride: float) -> Tensor:
    """IFD: sum_i softmax_i(||q_i^S - q_i^T||).detach() * mean_{p in box_i, c} (F^S - F^T)^2.

    `q_t`, `q_s` (N, D): the instances' decoder embeddings; `feat_t`, `feat_s` (B, C, H, W) feature
    maps of stride `stride` pixels; `boxes` (N, 4) pixel xyxy; `image_index` (N,) each instance's image.
    """
    _check_instances(feat_s, boxes, image_index, "semantic_guided_feature_kd")
    if q_t.shape != q_s.shape or q_s.shape[0] != boxes.shape[0] or feat_t.shape != feat_s.shape:
        raise KdforgeError(f"semantic_guided_feature_kd: embeddings {tuple(q_t.shape)} / {tuple(q_s.shape)} and "
                           f"features {tuple(feat_t.shape)} / {tuple(feat_s.shape)} must pair with {len(boxes)} boxes")
    if boxes.shape[0] == 0:
        return feat_s.sum() * 0
    with torch.no_grad():
        weights = torch.softmax((q_s.float() - q_t.float()).norm(dim=1), 0)
    cells = box_cells(boxes.float(), tuple(feat_s.shape[-2:]), stride).float()           # (N, HW)
    gap = (feat_s.float() - feat_t.detach().float()).pow(2).mean(1).flatten(1)[image_index]     # (N, HW)
    per_instance = (gap * cells).sum(1) / cells.sum(1)
    return (weights * per_instance).sum()
