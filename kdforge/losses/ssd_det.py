"""SSD-Det pieces (Wu et al., ICCV 2023, "Spatial Self-Distillation for Object Detection with Inaccurate
Bounding Boxes") as pure functions: proposal bags around noisy boxes, the box coder, two-stream MIL
scores and losses, the top-k merge and the SISD IoU target.

Why these shapes (card p01, official `box_sampler` / `merge_box` / `MILLoss`): a noisy box b* is a
bag of candidate boxes; a classifier that can only tell "this bag holds class c" (MIL) learns which
members fit the object, and the refined box is the score-weighted mean of the best members. Every
bag is (G, P, 4) xyxy pixels with a (G, P) validity mask (proposals mostly outside the image do not
vote: they are masked before the bag softmax and the instance scores re-normalised over the valid
ones). Refined boxes are targets: callers `.detach()` them (no gradient flows into a target).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.detection.boxes import box_iou

__all__ = ["DEFAULT_SCALES", "DEFAULT_STDS", "decode_deltas", "encode_deltas", "image_iof", "masked_mean",
           "merge_topk", "mil_bag_scores", "mil_bce_loss", "mil_gfocal_loss", "minmax", "negative_gfocal_loss",
           "neighbourhood_bags", "random_negatives", "sisd_loss", "sisd_target", "spsd_l1"]

DEFAULT_SCALES = (1.0, 1.2, 1.3, 0.8, 0.7)        # official PBR base_ratios, applied to w and h separately
DEFAULT_STDS = (0.1, 0.1, 0.2, 0.2)               # delta-xywh coder stds (Faster R-CNN RoI head)
_MAX_LOG_RATIO = abs(math.log(16 / 1000))         # mmdet's wh clamp in the coder's decode


def _boxes(boxes: Tensor, name: str) -> None:
    if boxes.shape[-1] != 4:
        raise KdforgeError(f"{name}: boxes must end in 4 (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")


def image_iof(boxes: Tensor, height: float, width: float) -> Tensor:
    """Intersection with the image over the box's own area (any leading shape; 0 for empty boxes)."""
    _boxes(boxes, "image_iof")
    iw = (boxes[..., 2].clamp(max=width) - boxes[..., 0].clamp(min=0)).clamp_min(0)
    ih = (boxes[..., 3].clamp(max=height) - boxes[..., 1].clamp(min=0)).clamp_min(0)
    area = (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)
    return torch.where(area > 0, iw * ih / area.clamp_min(1e-12), torch.zeros_like(area))


def neighbourhood_bags(boxes: Tensor, height: float, width: float, scales: Sequence[float] = DEFAULT_SCALES,
                       shift: float = 0.2, min_iof: float = 0.7) -> tuple[Tensor, Tensor]:
    """(G, P, 4) proposals around each (G, 4) box and their (G, P) validity (IoF with the image > min_iof).

    Width and height are scaled independently by every `scales` entry (S x S boxes, same centre);
    each is kept and also moved by `shift` of its own (scaled) width left / right and of its height
    up / down: P = 5 S^2 (125 for the official 5 scales). Order: scale index sw * S + sh, then
    [centre, left, right, up, down].
    """
    _boxes(boxes, "neighbourhood_bags")
    if not scales or min(scales) <= 0:
        raise KdforgeError(f"neighbourhood_bags: scales must be positive, got {list(scales)}")
    s = boxes.new_tensor(list(scales))
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ws = (w[:, None, None] * s[None, :, None]).expand(-1, len(s), len(s))        # (G, Sw, Sh)
    hs = (h[:, None, None] * s[None, None, :]).expand(-1, len(s), len(s))
    ws, hs = ws.reshape(len(boxes), -1, 1), hs.reshape(len(boxes), -1, 1)       # (G, S^2, 1)
    zero, one = torch.zeros_like(ws), torch.ones_like(ws)
    dx = torch.cat([zero, -one, one, zero, zero], 2) * shift * ws                # (G, S^2, 5)
    dy = torch.cat([zero, zero, zero, -one, one], 2) * shift * hs
    ccx, ccy = cx[:, None, None] + dx, cy[:, None, None] + dy
    ww, hh = ws.expand_as(dx), hs.expand_as(dy)
    bags = torch.stack([ccx - ww / 2, ccy - hh / 2, ccx + ww / 2, ccy + hh / 2], -1).reshape(len(boxes), -1, 4)
    return bags, image_iof(bags, height, width) > min_iof


def encode_deltas(proposals: Tensor, targets: Tensor, stds: Sequence[float] = DEFAULT_STDS) -> Tensor:
    """Delta-xywh regression targets of `targets` from `proposals` (same shape (..., 4)), divided by `stds`."""
    _boxes(proposals, "encode_deltas")
    if proposals.shape != targets.shape:
        raise KdforgeError(f"encode_deltas: proposals {tuple(proposals.shape)} and targets "
                           f"{tuple(targets.shape)} differ")
    pw = (proposals[..., 2] - proposals[..., 0]).clamp_min(1e-6)
    ph = (proposals[..., 3] - proposals[..., 1]).clamp_min(1e-6)
    gw = (targets[..., 2] - targets[..., 0]).clamp_min(1e-6)
    gh = (targets[..., 3] - targets[..., 1]).clamp_min(1e-6)
    dx = ((targets[..., 0] + targets[..., 2]) - (proposals[..., 0] + proposals[..., 2])) / 2 / pw
    dy = ((targets[..., 1] + targets[..., 3]) - (proposals[..., 1] + proposals[..., 3])) / 2 / ph
    d = torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], -1)
    return d / d.new_tensor(list(stds))


def decode_deltas(proposals: Tensor, deltas: Tensor, stds: Sequence[float] = DEFAULT_STDS,
                  size: tuple[float, float] | None = None) -> Tensor:
    """The boxes `deltas` (encode_deltas' units) move `proposals` to; clamped to the image when `size` = (h, w)."""
    _boxes(proposals, "decode_deltas")
    if proposals.shape != deltas.shape:
        raise KdforgeError(f"decode_deltas: proposals {tuple(proposals.shape)} and deltas "
                           f"{tuple(deltas.shape)} differ")
    d = deltas * deltas.new_tensor(list(stds))
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    cx = (proposals[..., 0] + proposals[..., 2]) / 2 + d[..., 0] * pw
    cy = (proposals[..., 1] + proposals[..., 3]) / 2 + d[..., 1] * ph
    w = pw * d[..., 2].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    h = ph * d[..., 3].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    if size is not None:
        hh, ww = size
        out = torch.stack([out[..., 0].clamp(0, ww), out[..., 1].clamp(0, hh), out[..., 2].clamp(0, ww),
                           out[..., 3].clamp(0, hh)], -1)
    return out


def _valid(valid: Tensor, like: Tensor, name: str) -> Tensor:
    if valid.shape != like.shape[:2]:
        raise KdforgeError(f"{name}: valid must be (G, P) = {tuple(like.shape[:2])}, got {tuple(valid.shape)}")
    return valid.to(like.dtype)


def mil_bag_scores(cls_logits: Tensor, ins_logits: Tensor, valid: Tensor,
                   cls_mode: str = "softmax") -> tuple[Tensor, Tensor, Tensor]:
    """Two-stream MIL: (class probs (G, P, C), instance probs (G, P, C), bag scores (G, C)).

    Class stream: softmax over classes (stage I) or per-class sigmoid (stage II), zero on invalid
    proposals. Instance stream: softmax over the bag for each class, invalid proposals masked out
    and the rest re-normalised to sum 1 (L1 over P). Bag score: sum over the bag of their product.
    """
    if cls_logits.dim() != 3 or ins_logits.shape != cls_logits.shape:
        raise KdforgeError(f"mil_bag_scores: class and instance logits must both be (G, P, C), got "
                           f"{tuple(cls_logits.shape)} and {tuple(ins_logits.shape)}")
    v = _valid(valid, cls_logits, "mil_bag_scores")[..., None]
    if cls_mode == "softmax":
        cls = cls_logits.softmax(-1)
    elif cls_mode == "sigmoid":
        cls = cls_logits.sigmoid()
    else:
        raise KdforgeError(f"mil_bag_scores: cls_mode must be softmax or sigmoid, got {cls_mode!r}")
    cls = cls * v
    # softmax over the valid proposals only (the official softmax-then-mask-then-L1-renormalise, without
    # the underflow when an invalid proposal holds a large logit); a bag with no valid proposal scores 0
    masked = ins_logits.masked_fill(v == 0, torch.finfo(ins_logits.dtype).min)
    ins = masked.softmax(1) * v
    ins = ins / ins.sum(1, keepdim=True).clamp_min(1e-12)
    return cls, ins, (cls * ins).sum(1)


def _per_object(loss: Tensor, labels_valid: Tensor, weight: Tensor | None) -> Tensor:
    """Weighted sum of per-object losses over the number of objects with a valid proposal."""
    w = labels_valid.to(loss.dtype) * (1.0 if weight is None else weight.detach().to(loss.dtype))
    return (loss * w).sum() / labels_valid.sum().clamp_min(1).to(loss.dtype)


def mil_bce_loss(bag: Tensor, labels: Tensor, valid: Tensor, weight: Tensor | None = None) -> Tensor:
    """Stage-I MIL loss: BCE of bag scores (G, C) against one-hot labels, summed over classes and
    averaged over objects that have a valid proposal (`weight`, per object, detached)."""
    y = F.one_hot(labels, bag.shape[-1]).to(bag.dtype)
    loss = F.binary_cross_entropy(bag.clamp(0, 1), y, reduction="none").sum(-1)
    return _per_object(loss, valid.any(1), weight)


def _gfocal(p: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    return -((p - q) ** 2 * (q * (p + eps).log() + (1 - q) * (1 - p + eps).log())).sum(-1)


def mil_gfocal_loss(bag: Tensor, labels: Tensor, valid: Tensor, weight: Tensor | None = None) -> Tensor:
    """Stage-II MIL loss: sum_c |bag - y|^2 BCE(bag, y), weighted per object (stage-I confidence)."""
    return _per_object(_gfocal(bag, F.one_hot(labels, bag.shape[-1]).to(bag.dtype)), valid.any(1), weight)


def negative_gfocal_loss(probs: Tensor, keep: Tensor) -> Tensor:
    """Background boxes' class probabilities (N, C) pushed to 0 by the same loss, mean over kept boxes."""
    loss = _gfocal(probs, torch.zeros_like(probs))
    k = keep.to(loss.dtype)
    return (loss * k).sum() / k.sum().clamp_min(1)


def random_negatives(count: int, height: float, width: float, positives: Tensor, iou_threshold: float = 0.3,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(count, 4) random boxes over (and a little beyond) the image and which overlap no positive box
    by IoU >= iou_threshold (official `gen_negative_proposals`)."""
    u = torch.rand(count, 4, generator=generator, dtype=torch.float32).to(positives.device)
    x1 = -0.2 * width + u[:, 0] * 1.2 * width
    y1 = -0.2 * height + u[:, 1] * 1.2 * height
    x2 = x1 + u[:, 2] * (1.2 * width - x1)
    y2 = y1 + u[:, 3] * (1.2 * height - y1)
    boxes = torch.stack([x1, y1, x2, y2], 1).to(positives.dtype)
    if positives.numel() == 0:
        return boxes, torch.ones(count, dtype=torch.bool, device=boxes.device)
    return boxes, (box_iou(boxes, positives.reshape(-1, 4)) < iou_threshold).all(1)


def merge_topk(proposals: Tensor, scores: Tensor, k: int, size: tuple[float, float] | None = None) -> Tensor:
    """(G, 4) score-weighted mean of each bag's top-k proposals: weights w_i / sum(w) + 1e-8 (official
    `merge_box`), clamped to the image when `size` = (h, w). A bag whose top scores are all 0 falls
    back to uniform weights. No gradient (the merged box is a target)."""
    _boxes(proposals, "merge_topk")
    if scores.shape != proposals.shape[:2]:
        raise KdforgeError(f"merge_topk: scores must be (G, P) = {tuple(proposals.shape[:2])}, got "
                           f"{tuple(scores.shape)}")
    if k < 1:
        raise KdforgeError(f"merge_topk: k must be >= 1, got {k}")
    with torch.no_grad():
        top, idx = scores.detach().topk(min(k, scores.shape[1]), dim=1)
        total = top.sum(1, keepdim=True)
        w = torch.where(total > 0, top / total.clamp_min(1e-30), torch.full_like(top, 1.0 / top.shape[1])) + 1e-8
        picked = proposals.detach().gather(1, idx[..., None].expand(-1, -1, 4))
        out = (picked * w[..., None]).sum(1)
        if size is not None:
            hh, ww = size
            out = torch.stack([out[:, 0].clamp(0, ww), out[:, 1].clamp(0, hh), out[:, 2].clamp(0, ww),
                               out[:, 3].clamp(0, hh)], -1)
    return out


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over dim 1 of (G, P, ...) values, valid (G, P) entries only (0 where none is valid)."""
    v = valid.to(values.dtype).reshape(*valid.shape, *([1] * (values.dim() - 2)))
    return (values * v).sum(1) / v.sum(1).clamp_min(1)


def minmax(values: Tensor, valid: Tensor) -> Tensor:
    """(G, P) values rescaled to [0, 1] within each bag over its valid entries (invalid -> 0)."""
    big = torch.finfo(values.dtype).max
    lo = torch.where(valid, values, torch.full_like(values, big)).amin(1, keepdim=True)
    hi = torch.where(valid, values, torch.full_like(values, -big)).amax(1, keepdim=True)
    out = (values - lo) / (hi - lo).clamp_min(1e-12)
    return torch.where(valid, out.clamp(0, 1), torch.zeros_like(out))


def sisd_target(bags: Tensor, reference: Tensor) -> Tensor:
    """SISD regression target (IoU(proposal, stage-I box) - 0.5) / 0.5 for (G, P, 4) bags and (G, 4) boxes."""
    _boxes(bags, "sisd_target")
    if reference.shape != (bags.shape[0], 4):
        raise KdforgeError(f"sisd_target: reference must be (G, 4) = ({bags.shape[0]}, 4), got "
                           f"{tuple(reference.shape)}")
    g, p = bags.shape[:2]
    if g == 0:
        return bags.new_zeros(0, p)
    iou = box_iou(bags.reshape(-1, 4), reference).reshape(g, p, g)
    own = iou[torch.arange(g), :, torch.arange(g)]                       # (G, P): each bag vs its own box
    return ((own - 0.5) / 0.5).detach()


def sisd_loss(pred: Tensor, target: Tensor, valid: Tensor, beta: float = 1.0) -> Tensor:
    """Smooth-L1 between predicted and target (G, P) IoU codes, mean over valid proposals."""
    if pred.shape != target.shape:
        raise KdforgeError(f"sisd_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    v = _valid(valid, pred, "sisd_loss")
    loss = F.smooth_l1_loss(pred, target.detach(), reduction="none", beta=beta)
    return (loss * v).sum() / v.sum().clamp_min(1)


def spsd_l1(pred: Tensor, target: Tensor, valid: Tensor, weight: Tensor | None = None) -> Tensor:
    """SPSD: L1 between (G, P, 4) predicted and target deltas over valid proposals, weighted per object
    (stage II: the stage-I bag confidence), averaged over valid proposals and the 4 coordinates."""
    if pred.shape != target.shape:
        raise KdforgeError(f"spsd_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    v = _valid(valid, pred, "spsd_l1")
    w = v if weight is None else v * weight.detach().to(v.dtype)[:, None]
    loss = (pred - target.detach()).abs().mean(-1)
    return (loss * w).sum() / v.sum().clamp_min(1)
