"""A small DETR-style query detector (set prediction, Hungarian matching) that trains on CPU.

Why it exists: query-based distillation (incremental-detection KD, `iod_wcbc`) reads per-query
class logits, boxes and decoder embeddings, and the instance <-> query correspondence that
Hungarian matching gives. `QueryDetector.forward` returns exactly those raw outputs.

Pure DETR needs hundreds of epochs; the well-known fixes used here make it learn the procedural
scenes in a few CPU-minutes:

* one feature level (the taps are pooled to the coarsest tap's grid and summed after 1x1
  projections), fixed 2-D sine positions, a 1-layer transformer encoder (memory (B, D, H, W));
* few queries (default 16), each with a learned content vector and a learned *reference box*
  (DAB-DETR anchors), initialised on a regular grid; the query position is an MLP of the sine
  embedding of the reference box;
* every decoder layer predicts a box as a refinement of its reference in logit space,
  `box = sigmoid(logit(ref) + delta)`, and passes the (detached) box on as the next
  reference (Deformable DETR's iterative refinement);
* cross-attention gets a Gaussian log-prior around each query's reference box (SMCA-DETR's
  spatially modulated co-attention, width `attn_sigma` x the box size; 0 turns it off), so a
  query looks near its box from the first step instead of learning locality from scratch;
* sigmoid focal classification (no "no-object" class: unmatched queries learn all-zero
  targets), L1 on normalised (cx, cy, w, h) and GIoU on matched pairs, with the DETR
  matching cost (focal class cost + L1 + GIoU; weights 2 / 5 / 2) solved exactly by
  `scipy.optimize.linear_sum_assignment`; auxiliary losses on every decoder layer;
* the class and box heads are shared by all decoder layers (one class head to grow when
  classes are added).

Decode: top-k over queries x classes of the sigmoid scores (the set loss makes one query per
object, so no NMS by default; `nms_iou` adds class-wise NMS).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.models.taps import FeatureTap
from kdforge.tasks.detection.boxes import batched_nms
from kdforge.tasks.detection.fpn import freeze_unused, tap_shapes

__all__ = ["QueryDetector", "build_query", "cxcywh_to_xyxy", "hungarian_match", "match_cost", "match_queries",
           "pairwise_giou", "set_loss", "xyxy_to_cxcywh"]


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) generalized IoU of xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)
    elt, erb = torch.minimum(a[:, None, :2], b[None, :, :2]), torch.maximum(a[:, None, 2:], b[None, :, 2:])
    enclose = (erb - elt).clamp_min(0).prod(-1).clamp_min(1e-9)
    return inter / union - (enclose - union) / enclose


def _inverse_sigmoid(x: Tensor, eps: float = 1e-4) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_embed(coords: Tensor, dims: int, temperature: float = 20.0) -> Tensor:
    """(..., n) coordinates in [0, 1] -> (..., n * dims) sin/cos features (dims even per coordinate)."""
    freqs = temperature ** (2 * torch.arange(dims // 2, device=coords.device, dtype=coords.dtype) / dims)
    angles = coords[..., None] * (2 * math.pi) / freqs                    # (..., n, dims/2)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


# ------------------------------------------------------------------------------------ matching


def match_cost(logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, w_class: float = 2.0,
               w_l1: float = 5.0, w_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(Nq, G) DETR matching cost of one image: focal class cost + L1 + (-GIoU).

    `logits` (Nq, K); `boxes` (Nq, 4) and `target_boxes` (G, 4) normalised cx, cy, w, h;
    `labels` (G,) in 0..K-1. The class cost is Deformable DETR's focal cost
    alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)) at the target's class.
    """
    p = logits.sigmoid()[:, labels]
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    l1 = torch.cdist(boxes, target_boxes, p=1)
    giou = pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
    return w_class * (pos - neg) + w_l1 * l1 - w_giou * giou


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of an (N, G) cost: (row indices, column indices), rows sorted."""
    from scipy.optimize import linear_sum_assignment

    if cost.dim() != 2:
        raise KdforgeError(f"hungarian_match: cost must be (N, G), got {tuple(cost.shape)}")
    if not bool(torch.isfinite(cost).all()):
        raise KdforgeError("hungarian_match: the cost matrix holds non-finite values")
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    dev = cost.device
    return torch.as_tensor(rows, dtype=torch.long, device=dev), torch.as_tensor(cols, dtype=torch.long, device=dev)


def match_queries(logits: Tensor, boxes: Tensor, labels: list[Tensor], target_boxes: list[Tensor],
                  weights: dict[str, float]) -> list[tuple[Tensor, Tensor]]:
    """Per image (query indices, target indices) of the Hungarian match; targets in normalised cxcywh."""
    out = []
    with torch.no_grad():
        for b, (lab, tb) in enumerate(zip(labels, target_boxes)):
            if lab.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long, device=logits.device)
                out.append((empty, empty))
                continue
            out.append(hungarian_match(match_cost(logits[b].float(), boxes[b].float(), lab, tb, **weights)))
    return out


# ------------------------------------------------------------------------------------ the model


class _MLP(nn.Sequential):
    def __init__(self, dims: list[int]) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class _DecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention into the memory (Gaussian prior as a float mask), FFN."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = _MLP([d, ffn, d])
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, bias: Tensor | None) -> Tensor:
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        mask = None if bias is None else bias.repeat_interleave(self.heads, 0)
        tgt = self.norms[1](tgt + self.cross_attn(tgt + query_pos, memory + pos, memory, attn_mask=mask,
                                                  need_weights=False)[0])
        return self.norms[2](tgt + self.ffn(tgt))


class QueryDetector(nn.Module):
    """Backbone taps -> 1-level memory -> encoder -> decoder of `queries` reference-box queries."""

    def __init__(self, backbone: nn.Module, taps: list[str], num_classes: int, width: int = 64, size: int = 48,
                 queries: int = 16, encoder_layers: int = 1, decoder_layers: int = 2, heads: int = 4,
                 ffn: int = 128, attn_sigma: float = 0.5, init_box: float = 0.2, aux_loss: bool = True,
                 w_class: float = 2.0, w_l1: float = 5.0, w_giou: float = 2.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, top_k: int = 100, nms_iou: float | None = None,
                 in_channels: int = 3) -> None:
        super().__init__()
        if not taps:
            raise ConfigError("query detector: name at least one backbone tap (e.g. feat3)")
        if width % (4 * heads) or width % 8:
            raise ConfigError(f"query detector: width {width} must be a multiple of 8 and of 4 x heads ({heads})")
        if queries < 1 or decoder_layers < 1 or encoder_layers < 0 or attn_sigma < 0:
            raise ConfigError("query detector: need queries >= 1, decoder_layers >= 1, encoder_layers >= 0 and "
                              "attn_sigma >= 0")
        self.backbone, self.taps, self.num_classes, self.width = backbone, list(taps), num_classes, width
        self.num_queries, self.attn_sigma, self.aux_loss = queries, attn_sigma, aux_loss
        self.top_k, self.nms_iou = top_k, nms_iou
        self.cost = {"w_class": w_class, "w_l1": w_l1, "w_giou": w_giou, "alpha": focal_alpha, "gamma": focal_gamma}
        self.weights = {"cls": w_class, "l1": w_l1, "giou": w_giou}
        shapes = tap_shapes(backbone, self.taps, size, in_channels)
        freeze_unused(backbone, self.taps, size, in_channels)      # e.g. its classifier head (DDP)
        self.grid = tuple(int(v) for v in shapes[-1][-2:])
        self.strides = [size // self.grid[1]]
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(s[1], width, 1), nn.GroupNorm(min(8, width), width))
                                        for s in shapes)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.ModuleList(_copy(layer) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(width, heads, ffn) for _ in range(decoder_layers))
        self.query_content = nn.Parameter(torch.randn(queries, width) * 0.1)
        self.query_ref = nn.Parameter(_grid_boxes(queries, init_box))
        self.ref_pos = _MLP([4 * (width // 2), width, width])
        self.cls_head = nn.Linear(width, num_classes)
        self.box_head = _MLP([width, width, width, 4])
        nn.init.constant_(self.cls_head.bias, -math.log((1 - 0.01) / 0.01))       # prior 0.01 (focal init)
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)

    # -- forward ---------------------------------------------------------------------------------

    def _memory(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H*W, D) encoder memory and (1, H*W, D) sine positions of the cells."""
        with FeatureTap(self.backbone, self.taps) as tap:      # hooks per call: copies of the model stay valid
            self.backbone(images)
        h, w = self.grid_of(images)
        src = sum(proj(F.adaptive_avg_pool2d(tap.features[t], (h, w))) for proj, t in zip(self.input_proj, self.taps))
        ys = (torch.arange(h, device=images.device, dtype=src.dtype) + 0.5) / h
        xs = (torch.arange(w, device=images.device, dtype=src.dtype) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
        pos = sine_embed(centres, self.width // 2)[None]
        x = src.flatten(2).transpose(1, 2)
        for layer in self.encoder:
            x = layer(x + pos)
        return x, pos

    def grid_of(self, images: Tensor) -> tuple[int, int]:
        """The memory grid for images of this size (the coarsest tap's resolution)."""
        stride = self.strides[0]
        return math.ceil(images.shape[-2] / stride), math.ceil(images.shape[-1] / stride)

    def _gaussian_bias(self, ref: Tensor, h: int, w: int) -> Tensor:
        """(B, Nq, H*W) log of a Gaussian around each reference box (sd = attn_sigma x box size)."""
        ys = (torch.arange(h, device=ref.device, dtype=ref.dtype) + 0.5) / h
        xs = (torch.arange(w, device=ref.device, dtype=ref.dtype) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = ref[..., 0:1], ref[..., 1:2]
        sx = (ref[..., 2:3] * self.attn_sigma).clamp_min(1.0 / w)
        sy = (ref[..., 3:4] * self.attn_sigma).clamp_min(1.0 / h)
        return -((xx.reshape(1, 1, -1) - cx) ** 2 / (2 * sx ** 2) + (yy.reshape(1, 1, -1) - cy) ** 2 / (2 * sy ** 2))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Raw outputs: logits (B, Nq, K), boxes (B, Nq, 4) normalised cx cy w h, hidden (B, Nq, D) last
        decoder states, memory (B, D, H, W) encoder features, aux_logits / aux_boxes (L-1, B, Nq, .) of the
        earlier decoder layers, image_wh (2,) the input size in pixels."""
        memory, pos = self._memory(images)
        b = images.shape[0]
        h, w = self.grid_of(images)
        tgt = self.query_content[None].expand(b, -1, -1)
        ref = self.query_ref.sigmoid()[None].expand(b, -1, -1)
        all_logits, all_boxes = [], []
        for layer in self.decoder:
            query_pos = self.ref_pos(sine_embed(ref, self.width // 2))
            bias = self._gaussian_bias(ref, h, w) if self.attn_sigma > 0 else None
            tgt = layer(tgt, query_pos, memory, pos, bias)
            box = (_inverse_sigmoid(ref) + self.box_head(tgt)).sigmoid()
            all_logits.append(self.cls_head(tgt))
            all_boxes.append(box)
            ref = box.detach()
        return {"logits": all_logits[-1], "boxes": all_boxes[-1], "hidden": tgt,
                "memory": memory.transpose(1, 2).reshape(b, self.width, h, w),
                "aux_logits": torch.stack(all_logits[:-1]) if len(all_logits) > 1 else all_logits[-1][None][:0],
                "aux_boxes": torch.stack(all_boxes[:-1]) if len(all_boxes) > 1 else all_boxes[-1][None][:0],
                "image_wh": torch.tensor([images.shape[-1], images.shape[-2]], dtype=torch.float32,
                                         device=images.device)}

    # -- the detector interface --------------------------------------------------------------------

    def normalise(self, out: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """Pixel xyxy boxes -> normalised cx cy w h of this output's image size."""
        wh = out["image_wh"].to(boxes.device)
        return xyxy_to_cxcywh(boxes.float() / torch.cat([wh, wh]))

    def pixel_boxes(self, out: dict[str, Tensor]) -> Tensor:
        """(B, Nq, 4) predicted boxes as pixel xyxy."""
        wh = out["image_wh"]
        return cxcywh_to_xyxy(out["boxes"]) * torch.cat([wh, wh])

    def match(self, out: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Hungarian match of the last layer's queries to pixel-xyxy targets, per image."""
        return match_queries(out["logits"], out["boxes"], [lb.to(out["logits"].device) for lb in labels],
                             [self.normalise(out, b.to(out["boxes"].device)) for b in boxes], self.cost)

    def loss(self, out: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
             stats: dict[str, float] | None = None) -> dict[str, Tensor]:
        """`set_loss` on the last decoder layer, plus every earlier layer when `aux_loss`."""
        return set_loss(self, out, boxes, labels, stats)

    @torch.no_grad()
    def decode(self, out: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Per image the top-k (query, class) pairs by sigmoid score, boxes clipped to the image."""
        scores_all = out["logits"].sigmoid().flatten(1)                       # (B, Nq*K)
        boxes_all = self.pixel_boxes(out)
        wh = out["image_wh"]
        k = min(self.top_k, scores_all.shape[1])
        results = []
        for b in range(scores_all.shape[0]):
            scores, idx = scores_all[b].topk(k)
            q, lab = idx // self.num_classes, idx % self.num_classes
            xyxy = torch.minimum(boxes_all[b][q].clamp_min(0), torch.cat([wh, wh]))
            if self.nms_iou is not None:
                keep = batched_nms(xyxy, scores, lab, self.nms_iou)
                xyxy, scores, lab, q = xyxy[keep], scores[keep], lab[keep], q[keep]
            results.append({"boxes": xyxy, "scores": scores, "labels": lab, "queries": q})
        return results


def _copy(layer: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(layer)


def _grid_boxes(n: int, size: float) -> Tensor:
    """Reference boxes (logit space) with centres on a ceil(sqrt(n))-square grid, side `size`."""
    side = math.ceil(math.sqrt(n))
    c = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)[:n]
    boxes = torch.cat([centres, torch.full((n, 2), size)], -1)
    return _inverse_sigmoid(boxes)


def _focal(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = p * targets + (1 - p) * (1 - targets)
    return ((alpha * targets + (1 - alpha) * (1 - targets)) * (1 - pt) ** gamma * ce).sum()


def _layer_loss(model: QueryDetector, logits: Tensor, boxes: Tensor, labels: list[Tensor],
                targets: list[Tensor], num: float) -> dict[str, Tensor]:
    """Focal / L1 / GIoU of one decoder layer's predictions against its own Hungarian match."""
    matches = match_queries(logits, boxes, labels, targets, model.cost)
    onehot = torch.zeros_like(logits)
    pred, tgt = [], []
    for b, (qi, ti) in enumerate(matches):
        if qi.numel():
            onehot[b, qi, labels[b][ti]] = 1.0
            pred.append(boxes[b, qi])
            tgt.append(targets[b][ti])
    cls = _focal(logits, onehot, model.cost["alpha"], model.cost["gamma"]) / num
    if not pred:
        zero = boxes.sum() * 0
        return {"cls": cls, "l1": zero, "giou": zero}
    p, t = torch.cat(pred), torch.cat(tgt)
    l1 = (p - t).abs().sum() / num
    giou = (1 - pairwise_giou(cxcywh_to_xyxy(p), cxcywh_to_xyxy(t)).diagonal()).sum() / num
    return {"cls": cls, "l1": l1, "giou": giou}


def set_loss(model: QueryDetector, out: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
             stats: dict[str, float] | None = None) -> dict[str, Tensor]:
    """The DETR set loss: per decoder layer a Hungarian match, then w_class x focal (all queries x classes)
    + w_l1 x L1 + w_giou x (1 - GIoU) (matched pairs), each summed and divided by the number of target
    boxes; the layers' terms are summed into `cls`, `l1`, `giou`. `stats` receives `num_pos` (targets)."""
    if len(boxes) != out["logits"].shape[0] or len(labels) != len(boxes):
        raise KdforgeError(f"query detector loss: {out['logits'].shape[0]} images but {len(boxes)} box lists and "
                           f"{len(labels)} label lists")
    dev = out["logits"].device
    targets = [model.normalise(out, b.to(dev)) for b in boxes]
    labels = [lb.to(dev).long() for lb in labels]
    num = max(1.0, float(sum(int(lb.numel()) for lb in labels)))
    if stats is not None:
        stats["num_pos"] = num
    layers = [(out["logits"], out["boxes"])]
    if model.aux_loss:
        layers += list(zip(out["aux_logits"].unbind(0), out["aux_boxes"].unbind(0)))
    total: dict[str, Tensor] = {}
    for logits, bx in layers:
        for k, v in _layer_loss(model, logits.float(), bx.float(), labels, targets, num).items():
            total[k] = total[k] + model.weights[k] * v if k in total else model.weights[k] * v
    return total


def build_query(backbone: nn.Module, taps: list[str], num_classes: int, width: int = 64, size: int = 48,
                **options: Any) -> QueryDetector:
    """`model.kind: query` (see `kdforge.tasks.detection.models`); `model.head` holds the options above."""
    return QueryDetector(backbone, taps, num_classes, width=width, size=size, **options)
