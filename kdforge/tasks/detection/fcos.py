"""A dense one-stage detector (FCOS-style head on an FPN) in plain torch, with raw outputs exposed.

Why this shape: BCKD, UniKD and SSD-Det distil dense detectors; their terms read the head's raw,
pre-NMS outputs per FPN level (class logits, box regression, centerness). `FCOS.forward` returns
exactly those (a dict of per-level tensors), `fcos_targets` assigns ground truth to locations the
FCOS way, `fcos_loss` is sigmoid focal + GIoU + centerness BCE, and `decode` turns raw outputs into
boxes (score = sqrt(cls * centerness), top-k, batched NMS).

Levels: the backbone's last `num_levels` stage outputs (taps) -> 1x1 lateral convs + top-down
sum (FPN) -> a shared head (tower of 3x3 conv + GroupNorm + ReLU, then cls / box / centerness
convs). Location (i, j) of a level with stride s sits at ((j + 0.5) s, (i + 0.5) s). Box
regression predicts (l, t, r, b) / s through exp (non-negative), as FCOS does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.models.taps import FeatureTap
from kdforge.tasks.detection.boxes import batched_nms
from kdforge.tasks.detection.fpn import freeze_unused, tap_shapes, top_down

__all__ = ["FCOS", "build_fcos", "decode", "dense_predictions", "fcos_loss", "fcos_targets", "giou_loss", "locations",
           "sigmoid_focal_loss"]


class FCOS(nn.Module):
    """`backbone` (any nn.Module whose taps give the FPN inputs), FPN of width `width`, shared head."""

    def __init__(self, backbone: nn.Module, taps: list[str], num_classes: int, width: int = 32,
                 tower: int = 2, in_channels: int = 3, probe_size: int = 64) -> None:
        super().__init__()
        if not taps:
            raise KdforgeError("FCOS: name at least one backbone tap (e.g. feat2, feat3)")
        self.backbone, self.taps, self.num_classes = backbone, list(taps), num_classes
        shapes = tap_shapes(backbone, self.taps, probe_size, in_channels)
        freeze_unused(backbone, self.taps, probe_size, in_channels)      # e.g. its classifier head (DDP)
        self.strides = [probe_size // s[-1] for s in shapes]
        self.lateral = nn.ModuleList(nn.Conv2d(s[1], width, 1) for s in shapes)
        layers: list[nn.Module] = []
        for _ in range(tower):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        self.cls = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.ctr = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))     # prior 0.01 (focal-loss init)
        self._tap = FeatureTap(backbone, self.taps)

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Raw outputs per level: cls (B, K, H, W) logits, box (B, 4, H, W) ltrb / stride, ctr (B, 1, H, W)."""
        self._tap.clear()
        self.backbone(images)
        feats = [self._tap.features[t] for t in self.taps]
        lat = top_down([conv(f) for conv, f in zip(self.lateral, feats)])
        out: dict[str, list[Tensor]] = {"cls": [], "box": [], "ctr": []}
        for x in lat:
            h = self.tower(x)
            out["cls"].append(self.cls(h))
            out["box"].append(self.box(h).clamp(max=10).exp())
            out["ctr"].append(self.ctr(h))
        return out

    def loss(self, out: dict[str, list[Tensor]], boxes: list[Tensor], labels: list[Tensor],
             stats: dict[str, float] | None = None) -> dict[str, Tensor]:
        """The detector interface (see `kdforge.tasks.detection.models`): `fcos_loss`."""
        return fcos_loss(self, out, boxes, labels, stats)

    def decode(self, out: dict[str, list[Tensor]]) -> list[dict[str, Tensor]]:
        """The detector interface: per-image boxes / scores / labels after NMS (`decode`)."""
        return decode(self, out)


def build_fcos(backbone: nn.Module, taps: list[str], num_classes: int, width: int = 32, size: int = 64,
               tower: int = 2) -> FCOS:
    """`model.kind: fcos` (see `kdforge.tasks.detection.models`)."""
    return FCOS(backbone, taps, num_classes, width=width, tower=tower, probe_size=size)


def locations(h: int, w: int, stride: int, device: torch.device | None = None) -> Tensor:
    """(H * W, 2) x, y centres of a level's locations, row-major."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], 1)


def fcos_targets(points: list[Tensor], strides: list[int], boxes: Tensor, labels: Tensor,
                 ranges: list[tuple[float, float]] | None = None) -> tuple[Tensor, Tensor]:
    """FCOS assignment for one image: (labels (P,) with -1 = background, ltrb targets (P, 4) in pixels).

    A location is positive for a box that contains it and whose max(l, t, r, b) falls in the
    level's size range; among several, the box of smallest area wins.
    """
    if ranges is None:
        edges = [0.0] + [8.0 * s for s in strides[1:]] + [math.inf]
        ranges = list(zip(edges[:-1], edges[1:]))
    all_pts = torch.cat(points)
    dev = all_pts.device
    lo = torch.cat([torch.full((len(p),), r[0], device=dev) for p, r in zip(points, ranges)])
    hi = torch.cat([torch.full((len(p),), r[1], device=dev) for p, r in zip(points, ranges)])
    if boxes.numel() == 0:
        return (torch.full((len(all_pts),), -1, dtype=torch.long, device=dev),
                torch.zeros(len(all_pts), 4, device=dev))
    x, y = all_pts[:, 0:1], all_pts[:, 1:2]
    ltrb = torch.stack([x - boxes[None, :, 0], y - boxes[None, :, 1], boxes[None, :, 2] - x,
                        boxes[None, :, 3] - y], dim=2)                        # (P, G, 4)
    inside = ltrb.min(dim=2).values > 0
    reach = ltrb.max(dim=2).values
    fits = (reach >= lo[:, None]) & (reach <= hi[:, None])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :].expand_as(reach)
    area = torch.where(inside & fits, area, torch.full_like(area, math.inf))
    best_area, best = area.min(dim=1)
    cls = torch.where(torch.isfinite(best_area), labels[best], torch.full_like(labels[best], -1))
    return cls.long(), ltrb[torch.arange(len(all_pts), device=dev), best]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed focal loss (Lin et al.) over all entries of `logits` against 0/1 `targets`."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = p * targets + (1 - p) * (1 - targets)
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * (1 - pt) ** gamma
    return (weight * ce).sum()


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-location 1 - GIoU of ltrb distances from the same point (both (N, 4), non-negative)."""
    pa = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    ta = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    iw = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    ih = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = iw.clamp_min(0) * ih.clamp_min(0)
    union = pa + ta - inter
    ew = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    eh = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    enclose = (ew * eh).clamp_min(1e-9)
    iou = inter / union.clamp_min(1e-9)
    return 1 - (iou - (enclose - union) / enclose)


def _grid(model: FCOS, out: dict[str, list[Tensor]], device: torch.device) -> tuple[list[Tensor], Tensor]:
    """Each level's location centres (P_l, 2) and every location's stride (P,), levels in order."""
    shapes = [t.shape[-2:] for t in out["cls"]]
    pts = [locations(h, w, s, device) for (h, w), s in zip(shapes, model.strides)]
    scale = torch.cat([torch.full((h * w,), float(s), device=device) for (h, w), s in zip(shapes, model.strides)])
    return pts, scale


def _flatten(out: dict[str, list[Tensor]], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, P, K) cls logits, (B, P, 4) ltrb/stride, (B, P) centerness logits, levels concatenated."""
    def flat(ts: list[Tensor], c: int) -> Tensor:
        return torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, c) for t in ts], 1)
    return flat(out["cls"], k), flat(out["box"], 4), flat(out["ctr"], 1)[..., 0]


def fcos_loss(model: FCOS, out: dict[str, list[Tensor]], boxes: list[Tensor], labels: list[Tensor],
              stats: dict[str, float] | None = None) -> dict[str, Tensor]:
    """Focal (classification), GIoU (box) and BCE (centerness) losses, normalised by the positives.

    `stats`, when given, receives `num_pos` (the normaliser distillation terms share)."""
    cls, box, ctr = _flatten(out, model.num_classes)
    dev = cls.device
    pts, scale = _grid(model, out, dev)
    cls_t, box_t = [], []
    for b, l in zip(boxes, labels):          # assignment on the training device: no host round trip
        c, t = fcos_targets(pts, model.strides, b.float().to(dev), l.to(dev))
        cls_t.append(c)
        box_t.append(t)
    cls_t, box_t = torch.stack(cls_t), torch.stack(box_t)
    pos = cls_t >= 0
    num_pos = max(1.0, float(pos.sum()))
    if stats is not None:
        stats["num_pos"] = num_pos
    onehot = torch.zeros_like(cls)
    onehot[pos] = F.one_hot(cls_t[pos], model.num_classes).to(cls.dtype)
    loss_cls = sigmoid_focal_loss(cls, onehot) / num_pos
    if not bool(pos.any()):
        zero = box.sum() * 0 + ctr.sum() * 0
        return {"cls": loss_cls, "box": zero, "ctr": zero}
    pred = box[pos] * scale.expand_as(pos)[pos][:, None]
    target = box_t[pos]
    lr, tb = target[:, [0, 2]], target[:, [1, 3]]
    centerness = ((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)).sqrt()
    loss_box = (giou_loss(pred, target) * centerness).sum() / centerness.sum().clamp_min(1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], centerness, reduction="sum") / num_pos
    return {"cls": loss_cls, "box": loss_box, "ctr": loss_ctr}


def dense_predictions(model: FCOS, out: dict[str, list[Tensor]]) -> tuple[Tensor, Tensor]:
    """Every location's (B, P, K) class logits and (B, P, 4) decoded xyxy box in pixels (with gradient)."""
    return _dense(model, out)[:2]


def _dense(model: FCOS, out: dict[str, list[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """(B, P, K) class logits, (B, P, 4) decoded xyxy boxes, (B, P) centerness logits."""
    cls, box, ctr = _flatten(out, model.num_classes)
    levels, scale = _grid(model, out, cls.device)
    pts = torch.cat(levels)
    ltrb = box * scale[None, :, None]
    xyxy = torch.stack([pts[None, :, 0] - ltrb[..., 0], pts[None, :, 1] - ltrb[..., 1],
                        pts[None, :, 0] + ltrb[..., 2], pts[None, :, 1] + ltrb[..., 3]], dim=-1)
    return cls, xyxy, ctr


@torch.no_grad()
def decode(model: FCOS, out: dict[str, list[Tensor]], score_threshold: float = 0.05, top_k: int = 100,
           iou_threshold: float = 0.6, max_detections: int = 100) -> list[dict[str, Tensor]]:
    """Per image: boxes (xyxy, pixels), scores sqrt(cls * centerness), labels, after batched NMS."""
    cls, boxes, ctr = _dense(model, out)
    results = []
    for b in range(cls.shape[0]):
        scores = (torch.sigmoid(cls[b]) * torch.sigmoid(ctr[b])[:, None]).sqrt()      # (P, K)
        flat = scores.reshape(-1)
        keep = flat > score_threshold
        cand = keep.nonzero()[:, 0]
        cand = cand[flat[cand].argsort(descending=True)[:top_k * 10]]
        loc, lab = cand // model.num_classes, cand % model.num_classes
        xyxy = boxes[b][loc]
        kept = batched_nms(xyxy, flat[cand], lab, iou_threshold)[:max_detections]
        results.append({"boxes": xyxy[kept], "scores": flat[cand][kept], "labels": lab[kept]})
    return results
