"""Region views and region soft labels for FKD / FerKD: RandomResizedCrop boxes, rebuilt exactly.

FKD runs the teacher once, offline, on random-resized-crop regions of every training image and
stores, per region, the box, the flip flag and the teacher's soft label. The student later replays
exactly those regions. Here a region is a pure function of (seed, epoch, image index, crop slot):
its box is drawn by counter-based hashing (`kdforge.data.transforms.hash_u32`), so the same crop
comes back on any device, batch size or order, and `region_views` rebuilds the pixels from the
stored box alone.

`precompute_region_bank` is the offline soft-label generator: K epochs x n crops per image, the
teacher's probabilities kept in memory (optionally quantised to top-k with the leftover mass
spread evenly, FKD's "marginal smoothing"), plus the exact teacher probability of the true class
of every crop, which is what FerKD ranks regions by. Training then needs no teacher forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.transforms import hash_u32, normalize, to_float
from kdforge.errors import KdforgeError

# hash streams of the crop parameters (disjoint from transforms.py's 1..3)
STREAM_RRC_FLIP = 15
_STREAM_RRC_BASE = 16          # + 4 * attempt + {0: area, 1: log-ratio, 2: top, 3: left}
RRC_ATTEMPTS = 10              # as torchvision's RandomResizedCrop
_INV_2_32 = 1.0 / 4294967296.0


def _uniform(keys: Tensor, seed: int, epoch: int, stream: int) -> Tensor:
    """float64 uniforms in [0, 1) from the 32-bit hash of each key."""
    return hash_u32(keys, seed, epoch, stream).to(torch.float64) * _INV_2_32


def region_keys(indices: Tensor | Sequence[int], num_crops: int) -> Tensor:
    """Hash keys of the crop slots: image `i`, slot `j` -> `i * num_crops + j`, shape (B, num_crops)."""
    idx = torch.as_tensor(indices, dtype=torch.int64, device="cpu")
    if idx.dim() != 1:
        raise KdforgeError(f"region indices must be 1-D, got shape {tuple(idx.shape)}")
    if num_crops < 1:
        raise KdforgeError(f"num_crops must be >= 1, got {num_crops}")
    return idx[:, None] * num_crops + torch.arange(num_crops)


def rrc_boxes(indices: Tensor | Sequence[int], epoch: int, seed: int, height: int, width: int,
              num_crops: int = 1, scale: Sequence[float] = (0.08, 1.0),
              ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True) -> tuple[Tensor, Tensor]:
    """RandomResizedCrop boxes and flips for every (image, crop slot): a pure function of the key.

    Follows torchvision's sampling rule: up to 10 attempts of (area ~ U(scale) * H*W,
    log-aspect ~ U(log ratio)); the first box that fits wins, at a uniform position; otherwise a
    centred crop with the aspect clamped to `ratio`. Returns `boxes` int64 (B, num_crops, 4) as
    (top, left, height, width) in pixels and `flips` bool (B, num_crops). Computed on the CPU in
    float64 so that a box never depends on the device.
    """
    s0, s1 = (float(v) for v in scale)
    r0, r1 = (float(v) for v in ratio)
    if not (0.0 < s0 <= s1 <= 1.0):
        raise KdforgeError(f"region scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0.0 < r0 <= r1):
        raise KdforgeError(f"region ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    if height < 1 or width < 1:
        raise KdforgeError(f"image size must be positive, got {height}x{width}")
    keys = region_keys(indices, num_crops)
    flat = keys.reshape(-1)
    area = float(height * width)
    chosen = torch.zeros(flat.shape[0], dtype=torch.bool)
    out_h = torch.zeros(flat.shape[0], dtype=torch.int64)
    out_w, out_t, out_l = torch.zeros_like(out_h), torch.zeros_like(out_h), torch.zeros_like(out_h)
    for attempt in range(RRC_ATTEMPTS):
        base = _STREAM_RRC_BASE + 4 * attempt
        target = area * (s0 + (s1 - s0) * _uniform(flat, seed, epoch, base))
        log_r = math.log(r0) + (math.log(r1) - math.log(r0)) * _uniform(flat, seed, epoch, base + 1)
        aspect = torch.exp(log_r)
        w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
        h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
        fits = (w > 0) & (h > 0) & (w <= width) & (h <= height) & ~chosen
        top = torch.floor(_uniform(flat, seed, epoch, base + 2) * (height - h + 1).clamp(min=1)).to(torch.int64)
        left = torch.floor(_uniform(flat, seed, epoch, base + 3) * (width - w + 1).clamp(min=1)).to(torch.int64)
        out_h = torch.where(fits, h, out_h)
        out_w = torch.where(fits, w, out_w)
        out_t = torch.where(fits, top, out_t)
        out_l = torch.where(fits, left, out_l)
        chosen |= fits
    if not bool(chosen.all()):           # fallback: centre crop, aspect clamped to `ratio`
        in_ratio = width / height
        if in_ratio < r0:
            fw, fh = width, int(round(width / r0))
        elif in_ratio > r1:
            fw, fh = int(round(height * r1)), height
        else:
            fw, fh = width, height
        rest = ~chosen
        out_h[rest], out_w[rest] = fh, fw
        out_t[rest], out_l[rest] = (height - fh) // 2, (width - fw) // 2
    boxes = torch.stack([out_t, out_l, out_h, out_w], dim=-1).reshape(*keys.shape, 4)
    if flip:
        flips = ((hash_u32(flat, seed, epoch, STREAM_RRC_FLIP) >> 16) & 1).eq(1).reshape(keys.shape)
    else:
        flips = torch.zeros(keys.shape, dtype=torch.bool)
    return boxes, flips


def _resize_matrix(start: Tensor, length: Tensor, out_size: int, in_size: int, dtype: torch.dtype) -> Tensor:
    """(M, out_size, in_size) bilinear weights resizing [start, start+length) to out_size.

    Same sampling as `F.interpolate(mode="bilinear", align_corners=False)` on the cropped
    segment: source = (dst + 0.5) * length / out - 0.5, clamped below at 0 and above at the
    segment's last pixel.
    """
    dev = start.device
    m = start.shape[0]
    dst = torch.arange(out_size, device=dev, dtype=torch.float64)
    src = ((dst[None, :] + 0.5) * (length[:, None].double() / out_size) - 0.5).clamp(min=0.0)
    lo = src.floor()
    frac = (src - lo).to(dtype)
    lo = lo.long()
    hi = torch.minimum(lo + 1, length[:, None] - 1)
    lo = torch.minimum(lo, length[:, None] - 1)
    mat = torch.zeros(m, out_size, in_size, device=dev, dtype=dtype)
    mat.scatter_add_(2, (start[:, None] + lo)[..., None], (1.0 - frac)[..., None])
    mat.scatter_add_(2, (start[:, None] + hi)[..., None], frac[..., None])
    return mat


def region_views(images: Tensor, boxes: Tensor, flips: Tensor | None = None,
                 size: int | Sequence[int] | None = None) -> Tensor:
    """Crop every box out of its image, resize it bilinearly to `size` and mirror where `flips`.

    `images` (B, C, H, W) float; `boxes` (B, 4) or (B, n, 4) as (top, left, height, width), one
    row per image (or n per image); returns (B, C, S, S) or (B * n, C, S, S), crops of an image
    next to each other. Batched as two separable interpolation matrices per crop (one einsum),
    equal to `F.interpolate(crop, size, mode="bilinear", align_corners=False)` per crop.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise KdforgeError(f"region_views expects float images (B, C, H, W), got {images.dtype} "
                           f"{tuple(images.shape)}")
    b, _, h, w = images.shape
    boxes = torch.as_tensor(boxes, device=images.device).long()
    if boxes.dim() == 2:
        boxes = boxes[:, None, :]
    if boxes.dim() != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise KdforgeError(f"boxes must be (B, 4) or (B, n, 4) for {b} images, got {tuple(boxes.shape)}")
    n = boxes.shape[1]
    flat = boxes.reshape(-1, 4)
    top, left, bh, bw = flat.unbind(1)
    if bool(((bh < 1) | (bw < 1) | (top < 0) | (left < 0) | (top + bh > h) | (left + bw > w)).any()):
        raise KdforgeError(f"a region box lies outside the {h}x{w} image")
    if size is None:
        out_h, out_w = h, w
    elif isinstance(size, int):
        out_h = out_w = size
    else:
        out_h, out_w = (int(v) for v in size)
    rows = _resize_matrix(top, bh, out_h, h, images.dtype).reshape(b, n, out_h, h)
    cols = _resize_matrix(left, bw, out_w, w, images.dtype).reshape(b, n, out_w, w)
    if flips is not None:
        fl = torch.as_tensor(flips, device=images.device).bool().reshape(b, n)
        cols = torch.where(fl[:, :, None, None], cols.flip(2), cols)
    out = torch.einsum("bnrh,bchw,bnsw->bncrs", rows, images, cols)
    return out.reshape(b * n, images.shape[1], out_h, out_w)


@torch.no_grad()
def region_soft_labels(teacher: nn.Module, images: Tensor, boxes: Tensor, flips: Tensor | None = None,
                       size: int | Sequence[int] | None = None, temperature: float = 1.0,
                       batch_size: int = 512) -> Tensor:
    """The teacher's softmax on each region view: (B * n, K) float32, in `region_views` order.

    The teacher runs in eval mode under no_grad (its BN statistics never move).
    """
    if temperature <= 0:
        raise KdforgeError(f"region_soft_labels: temperature must be > 0, got {temperature}")
    was_training = teacher.training
    teacher.eval()
    per = boxes.shape[1] if boxes.dim() == 3 else 1
    step = max(1, batch_size // per)
    outs = []
    for s in range(0, images.shape[0], step):
        fl = None if flips is None else flips[s:s + step]
        views = region_views(images[s:s + step], boxes[s:s + step], fl, size)
        outs.append(F.softmax(teacher(views).float() / temperature, dim=1))
    teacher.train(was_training)
    return torch.cat(outs)


def object_coverage(masks: Tensor, boxes: Tensor) -> Tensor:
    """Share of each image's object that a region contains: masks (N, H, W), boxes (N, ..., 4) -> (N, ...).

    `masks` are the images' object masks (bool or {0, 1}); `boxes` (top, left, height, width)
    regions of the same images (any number per image). 1 = the whole object is in the region,
    0 = only background (a hard negative). Images without object pixels get coverage 0.
    Exact pixel counts from one integral image per mask.
    """
    if masks.dim() != 3 or boxes.shape[0] != masks.shape[0] or boxes.shape[-1] != 4:
        raise KdforgeError(f"object_coverage expects masks (N, H, W) and boxes (N, ..., 4), got "
                           f"{tuple(masks.shape)} and {tuple(boxes.shape)}")
    n = masks.shape[0]
    ii = F.pad(masks.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))     # (N, H+1, W+1)
    flat = boxes.reshape(n, -1, 4).long().cpu()
    top, left, bh, bw = flat.unbind(-1)
    img = torch.arange(n)[:, None].expand_as(top)
    ii = ii.cpu()

    def at(r: Tensor, c: Tensor) -> Tensor:
        return ii[img, r, c]

    inside = at(top + bh, left + bw) - at(top, left + bw) - at(top + bh, left) + at(top, left)
    total = ii[:, -1, -1][:, None]
    cov = torch.where(total > 0, inside / total.clamp(min=1.0), torch.zeros_like(inside))
    return cov.float().reshape(boxes.shape[:-1])


# ---------------------------------------------------------------------------------------------
# the offline soft-label bank


def quantize_topk(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values and class indices of each label (FKD stores these instead of all K values)."""
    if not 1 <= k < probs.shape[-1]:
        raise KdforgeError(f"topk must be in [1, {probs.shape[-1] - 1}], got {k}")
    values, indices = probs.topk(k, dim=-1)
    return values, indices


def recover_topk(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """K-dim label from top-k: stored values at their classes, the leftover mass spread evenly
    over the other K - k classes (FKD's "marginal smoothing")."""
    k = values.shape[-1]
    rest = (1.0 - values.float().sum(-1, keepdim=True)).clamp(min=0.0) / (num_classes - k)
    out = rest.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), values.float())


@dataclass
class RegionBank:
    """Stored regions of K epochs x n crops per image and the teacher's labels for them.

    `boxes` (K, N, n, 4) int (top, left, height, width); `flips` (K, N, n) bool; `probs`
    (K, N, n, C) when stored in full, else `topk_values`/`topk_indices` (K, N, n, k);
    `confidence` (K, N, n) the teacher's (unquantised) probability of the true class;
    `labels` (N,) the hard labels the bank was built for.
    """

    boxes: Tensor
    flips: Tensor
    confidence: Tensor
    labels: Tensor
    num_classes: int
    seed: int
    size: tuple[int, int]
    probs: Tensor | None = None
    topk_values: Tensor | None = None
    topk_indices: Tensor | None = None

    @property
    def epochs(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.boxes.shape[1])

    @property
    def num_crops(self) -> int:
        return int(self.boxes.shape[2])

    def slot(self, epoch: int) -> int:
        """Training epoch -> stored epoch (the bank is replayed cyclically)."""
        return int(epoch) % self.epochs

    def soft_labels(self, epoch: int, index: Tensor) -> Tensor:
        """(B, n, C) float32 labels of images `index` in training epoch `epoch` (top-k recovered)."""
        e, idx = self.slot(epoch), index.to("cpu").long()
        if self.probs is not None:
            return self.probs[e, idx].float()
        if self.topk_values is None or self.topk_indices is None:
            raise KdforgeError("region bank holds neither full labels nor top-k labels")
        return recover_topk(self.topk_values[e, idx], self.topk_indices[e, idx], self.num_classes)

    def state(self) -> dict[str, Any]:
        return {"boxes": self.boxes, "flips": self.flips, "confidence": self.confidence,
                "labels": self.labels, "num_classes": self.num_classes, "seed": self.seed,
                "size": list(self.size), "probs": self.probs, "topk_values": self.topk_values,
                "topk_indices": self.topk_indices}

    def save(self, path: str | Path) -> None:
        torch.save(self.state(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> RegionBank:
        p = Path(path).expanduser()
        if not p.is_file():
            raise KdforgeError(f"region bank not found: {p}")
        try:
            st = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise KdforgeError(f"cannot read region bank {p}: {str(err).splitlines()[0]}") from None
        try:
            st["size"] = tuple(int(v) for v in st["size"])
            return cls(**st)
        except (TypeError, KeyError) as err:
            raise KdforgeError(f"{p} is not a region bank ({err})") from None

    def check_matches(self, labels: Tensor) -> None:
        """The bank must have been built for exactly these training samples."""
        if labels.shape != self.labels.shape or not torch.equal(labels.cpu().long(), self.labels):
            raise KdforgeError(f"region bank was built for {self.num_images} other samples/labels than the "
                               f"{labels.shape[0]} training samples of this run (rebuild it)")


@torch.no_grad()
def precompute_region_bank(teacher: nn.Module, images: Tensor, labels: Tensor, num_classes: int, epochs: int,
                           num_crops: int = 4, seed: int = 0, scale: Sequence[float] = (0.08, 1.0),
                           ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                           size: int | Sequence[int] | None = None, topk: int | None = None,
                           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                           batch_size: int = 512, device: torch.device | str = "cpu") -> RegionBank:
    """Run the teacher once on `epochs` x `num_crops` regions of every image; keep all in memory.

    `images` are uint8 or float (N, C, H, W); with `mean`/`std` each chunk is normalised first
    (exactly as the trainer prepares a batch) and the regions are cut from the normalised image,
    as the student's views will be. Epoch e of the bank uses the boxes of `rrc_boxes(.., epoch=e)`.
    """
    if epochs < 1:
        raise KdforgeError(f"region bank epochs must be >= 1, got {epochs}")
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise KdforgeError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                           f"{tuple(labels.shape)}")
    labels = labels.cpu().long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise KdforgeError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    n_img, _, h, w = images.shape
    out_size = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    dev = torch.device(device)
    teacher = teacher.to(dev)
    all_idx = torch.arange(n_img)
    chunk = max(1, batch_size // num_crops)
    boxes, flips, conf, probs, tv, ti = [], [], [], [], [], []
    for e in range(epochs):
        eb, ef = rrc_boxes(all_idx, e, seed, h, w, num_crops, scale, ratio, flip)
        ep_probs = []
        for s in range(0, n_img, chunk):
            x = images[s:s + chunk].to(dev)
            x = to_float(x) if x.dtype == torch.uint8 else x.float()
            if mean is not None and std is not None:
                x = normalize(x, mean, std)
            p = region_soft_labels(teacher, x, eb[s:s + chunk].to(dev), ef[s:s + chunk].to(dev), out_size,
                                   batch_size=batch_size)
            ep_probs.append(p.cpu().reshape(-1, num_crops, p.shape[-1]))
        p = torch.cat(ep_probs)
        if p.shape[-1] != num_classes:
            raise KdforgeError(f"teacher predicts {p.shape[-1]} classes, the labels have {num_classes}")
        boxes.append(eb.to(torch.int32))
        flips.append(ef)
        conf.append(p.gather(-1, labels[:, None, None].expand(-1, num_crops, 1)).squeeze(-1))
        if topk is None:
            probs.append(p)
        else:
            v, i = quantize_topk(p, topk)
            tv.append(v)
            ti.append(i.to(torch.int32))
    return RegionBank(boxes=torch.stack(boxes), flips=torch.stack(flips), confidence=torch.stack(conf),
                      labels=labels, num_classes=num_classes, seed=int(seed), size=tuple(out_size),
                      probs=torch.stack(probs) if topk is None else None,
                      topk_values=torch.stack(tv) if topk is not None else None,
                      topk_indices=torch.stack(ti) if topk is not None else None)
