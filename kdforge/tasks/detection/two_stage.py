"""A two-stage detector (Faster R-CNN style: FPN, RPN, RoIAlign + 2fc head) in plain torch, raw outputs exposed.

Why this shape: heterogeneous detection KD (UniKD) pairs a two-stage teacher with a dense student
and reads the teacher's FPN maps; `TwoStageDetector.forward` therefore returns the FPN features
(a list, one map per level), the RPN's raw per-level objectness / deltas, the proposals (per image,
detached) and the RoI head's raw outputs on those proposals, all pre-NMS.

Pieces (each a plain function, so tests can check them by hand):
- FPN on the backbone taps: 1x1 lateral convs, top-down nearest-upsampling sum, 3x3 output convs.
- Anchors: per level and location (centre ((j + 0.5) s, (i + 0.5) s)), sizes `anchor_scales` x stride
  and aspect ratios h/w in `aspect_ratios`; order (location, size, ratio).
- Box coder (`encode` / `decode_deltas`): deltas (dx, dy, dw, dh) = ((gx - ax) / aw, (gy - ay) / ah,
  log(gw / aw), log(gh / ah)) divided by stds (0.1, 0.1, 0.2, 0.2) as in Faster R-CNN.
- RPN: shared 3x3 conv -> objectness (A) and deltas (4A) per location; anchors IoU >= 0.7 (or the best
  for a box) positive, < 0.3 negative, `rpn_batch` sampled per image (half positives at most); BCE +
  smooth L1 (beta 1/9) on the positives, both over the sampled count. Proposals: per level top
  `pre_nms` by objectness, decoded, clipped, tiny boxes removed, NMS 0.7 per image, best `post_nms`.
- RoI head: in training, the ground-truth boxes join the proposals; IoU >= 0.5 -> the box's class,
  else background; `roi_batch` sampled per image (`roi_pos_fraction` positives at most).
  RoIAlign (kdforge.tasks.detection.roi) on ONE level per box chosen by its size, the FPN rule
  level = floor(1 + log2(sqrt(wh) / canonical)) clamped to the levels (`canonical` px: boxes smaller
  go to the finest level), -> 2 fc -> K+1 logits (softmax CE, index K = background) and class-specific
  deltas (smooth L1 on the positives' own class, over the sampled count).
- decode: softmax scores per class, class-specific boxes, score > 0.05, per-class NMS 0.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.models.taps import FeatureTap
from kdforge.tasks.detection.boxes import batched_nms, box_iou, nms
from kdforge.tasks.detection.fpn import freeze_unused, tap_shapes, top_down
from kdforge.tasks.detection.roi import roi_align, rois_from_list

__all__ = ["STDS", "TwoStageDetector", "anchors", "build_two_stage", "decode_deltas", "encode", "match_labels",
           "sample_rois", "subsample"]

STDS = (0.1, 0.1, 0.2, 0.2)
CLAMP = math.log(1000.0 / 16)


def encode(ref: Tensor, target: Tensor, stds: tuple[float, ...] = STDS) -> Tensor:
    """(N, 4) deltas taking xyxy boxes `ref` onto xyxy `target` (Faster R-CNN parametrisation / stds)."""
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    tx, ty = target[:, 0] + 0.5 * tw, target[:, 1] + 0.5 * th
    d = torch.stack([(tx - rx) / rw, (ty - ry) / rh, torch.log(tw / rw), torch.log(th / rh)], 1)
    return d / d.new_tensor(stds)


def decode_deltas(ref: Tensor, deltas: Tensor, stds: tuple[float, ...] = STDS) -> Tensor:
    """Inverse of `encode`: xyxy boxes from (N, 4) refs and (N, 4) deltas (dw, dh clamped at log(1000/16))."""
    d = deltas * deltas.new_tensor(stds)
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    x, y = rx + d[:, 0] * rw, ry + d[:, 1] * rh
    w, h = rw * d[:, 2].clamp(max=CLAMP).exp(), rh * d[:, 3].clamp(max=CLAMP).exp()
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], 1)


def anchors(h: int, w: int, stride: int, sizes: list[float], ratios: list[float],
            device: torch.device | None = None) -> Tensor:
    """(H * W * A, 4) xyxy anchors of one level, row-major locations, then sizes, then ratios (h / w)."""
    base = []
    for s in sizes:
        for r in ratios:
            bw, bh = s / math.sqrt(r), s * math.sqrt(r)
            base.append([-bw / 2, -bh / 2, bw / 2, bh / 2])
    cell = torch.tensor(base, dtype=torch.float32, device=device)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    centre = torch.stack([x.reshape(-1), y.reshape(-1), x.reshape(-1), y.reshape(-1)], 1)
    return (centre[:, None, :] + cell[None]).reshape(-1, 4)


def match_labels(iou: Tensor, low: float, high: float, allow_best: bool) -> tuple[Tensor, Tensor]:
    """Per candidate (rows of `iou` (N, G)): (label 1 / 0 / -1 ignore, index of its best box).

    IoU >= high -> 1, < low -> 0, in between -> -1; `allow_best`: each box's best candidate(s) -> 1."""
    n = iou.shape[0]
    if iou.shape[1] == 0:
        return torch.zeros(n, dtype=torch.long, device=iou.device), torch.zeros(n, dtype=torch.long, device=iou.device)
    best, idx = iou.max(1)
    lab = torch.full((n,), -1, dtype=torch.long, device=iou.device)
    lab[best < low] = 0
    lab[best >= high] = 1
    if allow_best:
        top = iou.max(0).values
        lab[((iou == top[None]) & (top[None] > 0)).any(1)] = 1
    return lab, idx


def subsample(labels: Tensor, total: int, pos_fraction: float, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor]:
    """Indices of sampled positives (label >= 1) and negatives (label 0): at most `total`, positives capped."""
    pos = (labels >= 1).nonzero()[:, 0]
    neg = (labels == 0).nonzero()[:, 0]
    n_pos = min(len(pos), int(total * pos_fraction))
    n_neg = min(len(neg), total - n_pos)
    dev = labels.device
    pos = pos[torch.randperm(len(pos), generator=generator).to(dev)[:n_pos]]
    neg = neg[torch.randperm(len(neg), generator=generator).to(dev)[:n_neg]]
    return pos, neg


def sample_rois(proposals: Tensor, boxes: Tensor, labels: Tensor, num_classes: int, total: int,
                pos_fraction: float, fg_iou: float = 0.5, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """One image's RoI-head training set: (rois (S, 4), class targets (S,) with K = background, matched box (S, 4)).

    Ground-truth boxes join the proposals; IoU >= fg_iou -> the matched box's class, else background."""
    cand = torch.cat([proposals, boxes.to(proposals)]) if len(boxes) else proposals
    if len(boxes) == 0:
        cls = torch.full((len(cand),), num_classes, dtype=torch.long, device=cand.device)
        _, neg = subsample(torch.zeros(len(cand), dtype=torch.long, device=cand.device), total, pos_fraction,
                           generator)
        return cand[neg], cls[neg], cand[neg]
    iou = box_iou(cand, boxes.to(cand))
    best, idx = iou.max(1)
    fg = best >= fg_iou
    pos, neg = subsample(fg.long(), total, pos_fraction, generator)
    keep = torch.cat([pos, neg])
    cls = torch.where(fg, labels.to(cand.device)[idx], torch.full_like(idx, num_classes))
    return cand[keep], cls[keep], boxes.to(cand)[idx[keep]]


class TwoStageDetector(nn.Module):
    """`backbone` taps -> FPN (width `width`) -> RPN -> RoIAlign on one level per box -> 2fc head."""

    def __init__(self, backbone: nn.Module, taps: list[str], num_classes: int, width: int = 32, size: int = 64,
                 anchor_scales: tuple[float, ...] = (4.0, 8.0), aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 pre_nms: int = 200, post_nms: int = 50, rpn_nms: float = 0.7, rpn_batch: int = 64,
                 roi_batch: int = 64, roi_pos_fraction: float = 0.25, pool: int = 5, fc: int = 128,
                 canonical: float = 16.0, in_channels: int = 3) -> None:
        super().__init__()
        if not taps:
            raise KdforgeError("two_stage: name at least one backbone tap (e.g. feat2, feat3)")
        if min(pre_nms, post_nms, rpn_batch, roi_batch, pool, fc) < 1 or not 0 < roi_pos_fraction <= 1:
            raise KdforgeError("two_stage: pre_nms, post_nms, rpn_batch, roi_batch, pool, fc must be >= 1 and "
                               "roi_pos_fraction in (0, 1]")
        self.backbone, self.taps, self.num_classes = backbone, list(taps), num_classes
        shapes = tap_shapes(backbone, self.taps, size, in_channels)
        freeze_unused(backbone, self.taps, size, in_channels)      # e.g. its classifier head (DDP)
        self.strides = [size // s[-1] for s in shapes]
        self.size, self.width = size, width
        self.sizes, self.ratios = list(anchor_scales), list(aspect_ratios)
        self.pre_nms, self.post_nms, self.rpn_nms = pre_nms, post_nms, rpn_nms
        self.rpn_batch, self.roi_batch, self.roi_pos_fraction = rpn_batch, roi_batch, roi_pos_fraction
        self.pool, self.canonical = pool, canonical
        self.lateral = nn.ModuleList(nn.Conv2d(s[1], width, 1) for s in shapes)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in shapes)
        a = len(self.sizes) * len(self.ratios)
        self.rpn_conv = nn.Conv2d(width, width, 3, padding=1)
        self.rpn_obj = nn.Conv2d(width, a, 1)
        self.rpn_box = nn.Conv2d(width, 4 * a, 1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(width * pool * pool, fc), nn.ReLU(), nn.Linear(fc, fc),
                                nn.ReLU())
        self.cls = nn.Linear(fc, num_classes + 1)
        self.box = nn.Linear(fc, 4 * num_classes)
        for m in (self.rpn_obj, self.rpn_box):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.box.bias)
        self._tap = FeatureTap(backbone, self.taps)

    # ------------------------------------------------------------------ forward pieces
    def features(self, images: Tensor) -> list[Tensor]:
        """FPN maps, finest level first."""
        self._tap.clear()
        self.backbone(images)
        lat = top_down([conv(self._tap.features[t]) for conv, t in zip(self.lateral, self.taps)])
        return [conv(x) for conv, x in zip(self.smooth, lat)]

    def level_anchors(self, feats: list[Tensor]) -> list[Tensor]:
        return [anchors(f.shape[-2], f.shape[-1], s, [z * s for z in self.sizes], self.ratios, f.device)
                for f, s in zip(feats, self.strides)]

    def propose(self, obj: list[Tensor], deltas: list[Tensor], anc: list[Tensor]) -> list[Tensor]:
        """Per image (P_b, 4) detached proposals: per-level top-k, decode, clip, NMS, best `post_nms`."""
        out = []
        for b in range(obj[0].shape[0]):
            boxes, scores = [], []
            for o, d, a in zip(obj, deltas, anc):
                o, d = o[b].detach(), d[b].detach()
                top = o.topk(min(self.pre_nms, len(o))).indices
                boxes.append(decode_deltas(a[top], d[top], (1.0, 1.0, 1.0, 1.0)).clamp(0, self.size))
                scores.append(o[top])
            bx, sc = torch.cat(boxes), torch.cat(scores)
            ok = ((bx[:, 2] - bx[:, 0]) >= 1) & ((bx[:, 3] - bx[:, 1]) >= 1)
            bx, sc = bx[ok], sc[ok]
            keep = nms(bx, sc, self.rpn_nms)[:self.post_nms]
            out.append(bx[keep])
        return out

    def roi_levels(self, rois: Tensor) -> Tensor:
        """The FPN level of each (R, 5) RoI: floor(1 + log2(sqrt(wh) / canonical)) clamped to the levels."""
        side = ((rois[:, 3] - rois[:, 1]).clamp_min(1e-6) * (rois[:, 4] - rois[:, 2]).clamp_min(1e-6)).sqrt()
        lvl = torch.floor(1 + torch.log2(side / self.canonical + 1e-8))
        return lvl.clamp(0, len(self.strides) - 1).long()

    def roi_head(self, feats: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(R, K+1) class logits and (R, 4K) class-specific deltas of the RoIs `boxes` (per image lists)."""
        rois = rois_from_list([b.to(feats[0].dtype) for b in boxes]).to(feats[0].device)
        pooled = feats[0].new_zeros(len(rois), self.width, self.pool, self.pool)
        lvl = self.roi_levels(rois)
        for i, (f, s) in enumerate(zip(feats, self.strides)):
            sel = (lvl == i).nonzero()[:, 0]
            if len(sel):
                pooled[sel] = roi_align(f, rois[sel], self.pool, 1.0 / s, 2)
        h = self.fc(pooled)
        return self.cls(h), self.box(h)

    def forward(self, images: Tensor) -> dict[str, object]:
        """Raw outputs: features (FPN maps), rpn_obj (B, HWA per level), rpn_box (B, HWA, 4 per level),
        anchors, proposals (per image), roi_cls (R, K+1) / roi_box (R, 4K) on the proposals (images in order)."""
        feats = self.features(images)
        obj, deltas = [], []
        for f in feats:
            h = F.relu(self.rpn_conv(f))
            b = f.shape[0]
            obj.append(self.rpn_obj(h).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.rpn_box(h).permute(0, 2, 3, 1).reshape(b, -1, 4))
        anc = self.level_anchors(feats)
        props = self.propose(obj, deltas, anc)
        roi_cls, roi_box = self.roi_head(feats, props)
        return {"features": feats, "rpn_obj": obj, "rpn_box": deltas, "anchors": anc, "proposals": props,
                "roi_cls": roi_cls, "roi_box": roi_box}

    # ------------------------------------------------------------------ the detector interface
    def loss(self, out: dict[str, object], boxes: list[Tensor], labels: list[Tensor],
             stats: dict[str, float] | None = None) -> dict[str, Tensor]:
        """rpn_cls (BCE), rpn_box (smooth L1), roi_cls (softmax CE), roi_box (smooth L1); `stats` gets num_pos
        (the RoI head's sampled positives)."""
        feats: list[Tensor] = out["features"]          # type: ignore[assignment]
        anc = torch.cat(out["anchors"])                # type: ignore[arg-type]
        obj = torch.cat(out["rpn_obj"], 1)             # type: ignore[arg-type]
        dl = torch.cat(out["rpn_box"], 1)              # type: ignore[arg-type]
        dev = obj.device
        rpn_cls, rpn_box = obj.sum() * 0, dl.sum() * 0
        rois, cls_t, box_t = [], [], []
        for b, (gt, lab) in enumerate(zip(boxes, labels)):
            gt, lab = gt.float().to(dev), lab.to(dev)
            lab_a, idx = match_labels(box_iou(anc, gt) if len(gt) else anc.new_zeros(len(anc), 0), 0.3, 0.7, True)
            pos, neg = subsample(lab_a, self.rpn_batch, 0.5)       # global RNG: seeded, checkpointed
            n = max(1, len(pos) + len(neg))
            target = torch.zeros(len(pos) + len(neg), device=dev)
            target[:len(pos)] = 1
            rpn_cls = rpn_cls + F.binary_cross_entropy_with_logits(obj[b, torch.cat([pos, neg])], target,
                                                                   reduction="sum") / n
            if len(pos):
                t = encode(anc[pos], gt[idx[pos]], (1.0, 1.0, 1.0, 1.0))
                rpn_box = rpn_box + F.smooth_l1_loss(dl[b, pos], t, beta=1 / 9, reduction="sum") / n
            r, c, m = sample_rois(out["proposals"][b], gt, lab, self.num_classes, self.roi_batch,  # type: ignore
                                  self.roi_pos_fraction)
            rois.append(r)
            cls_t.append(c)
            box_t.append(m)
        logits, deltas = self.roi_head(feats, rois)
        cls_t, ref, box_t = torch.cat(cls_t), torch.cat(rois), torch.cat(box_t)
        n = max(1, len(cls_t))
        roi_cls = F.cross_entropy(logits, cls_t, reduction="sum") / n
        fg = (cls_t < self.num_classes).nonzero()[:, 0]
        if stats is not None:
            stats["num_pos"] = max(1.0, float(len(fg)))
        roi_box = deltas.sum() * 0
        if len(fg):
            pred = deltas.reshape(len(deltas), self.num_classes, 4)[fg, cls_t[fg]]
            roi_box = F.smooth_l1_loss(pred, encode(ref[fg], box_t[fg]), beta=1.0, reduction="sum") / n
        size = float(len(boxes))
        return {"rpn_cls": rpn_cls / size, "rpn_box": rpn_box / size, "roi_cls": roi_cls, "roi_box": roi_box}

    @torch.no_grad()
    def decode(self, out: dict[str, object], score_threshold: float = 0.05, iou_threshold: float = 0.5,
               max_detections: int = 100) -> list[dict[str, Tensor]]:
        """Per image: class-specific boxes of the proposals, softmax scores, per-class NMS."""
        props: list[Tensor] = out["proposals"]          # type: ignore[assignment]
        prob = F.softmax(out["roi_cls"], 1)[:, :self.num_classes]             # type: ignore[arg-type]
        deltas = out["roi_box"].reshape(len(prob), self.num_classes, 4)       # type: ignore[union-attr]
        results, start = [], 0
        k = self.num_classes
        for p in props:
            n = len(p)
            sc = prob[start:start + n].reshape(-1)
            bx = decode_deltas(p.repeat_interleave(k, 0), deltas[start:start + n].reshape(-1, 4)).clamp(0, self.size)
            lab = torch.arange(k, device=sc.device).repeat(n)
            keep = (sc > score_threshold).nonzero()[:, 0]
            bx, sc, lab = bx[keep], sc[keep], lab[keep]
            kept = batched_nms(bx, sc, lab, iou_threshold)[:max_detections]
            results.append({"boxes": bx[kept], "scores": sc[kept], "labels": lab[kept]})
            start += n
        return results


def build_two_stage(backbone: nn.Module, taps: list[str], num_classes: int, width: int = 32, size: int = 64,
                    **options: object) -> TwoStageDetector:
    """`model.kind: two_stage` (see `kdforge.tasks.detection.models`); `model.head` holds the options above."""
    for key in ("anchor_scales", "aspect_ratios"):
        if key in options:
            options[key] = tuple(options[key])          # type: ignore[arg-type]
    return TwoStageDetector(backbone, taps, num_classes, width=width, size=size, **options)  # type: ignore[arg-type]
