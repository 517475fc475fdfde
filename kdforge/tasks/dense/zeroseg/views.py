"""The teacher's multi-scale views: the full image plus every cell of 2x2, 3x3, 4x4 ... grids.

Each cell (boundaries round(k * S / g)) is resized to the teacher's input size (bilinear,
antialiased when shrinking) and encoded by the CLIP image tower; the embeddings are
L2-normalised (ZeroSeg does not say; the student's side is normalised the same way). Training uses
fixed canvases (no augmentation, the paper's centre-crop-only setting), so the views of every
training sample are encoded once and cached: `(sample, view) -> v` is the tensor (N, n, D).
Views are ordered grid by grid (the order of `grids`), row-major inside a grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.vision_language.models import encode_images, pixels

__all__ = ["crop_views", "encode_views", "grid_boxes", "local_view_index", "single_object_cells", "view_grid"]


def _check_grids(grids: Sequence[int]) -> None:
    if not grids or any(int(g) < 1 for g in grids) or len(set(grids)) != len(grids):
        raise ConfigError(f"views: grids must be distinct integers >= 1, got {list(grids)}")


def grid_boxes(size: int, grids: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every view, grid by grid, row-major inside a grid."""
    _check_grids(grids)
    boxes = []
    for g in grids:
        if g > size:
            raise ConfigError(f"views: a {g}x{g} grid does not fit a {size} px image")
        edges = [round(k * size / g) for k in range(g + 1)]
        boxes += [(edges[r], edges[r + 1], edges[c], edges[c + 1]) for r in range(g) for c in range(g)]
    return boxes


def view_grid(grids: Sequence[int]) -> Tensor:
    """The grid size each view comes from, (n,)."""
    return torch.tensor([g for g in grids for _ in range(g * g)])


def local_view_index(grids: Sequence[int]) -> Tensor:
    """Positions of the local views (grid cells of grids > 1): the segment-matching candidates."""
    return (view_grid(grids) > 1).nonzero().flatten()


def crop_views(images: Tensor, grids: Sequence[int], out_size: int) -> Tensor:
    """(B, n, C, out, out): every view of float `images` (B, C, S, S), resized to `out_size`."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise KdforgeError(f"crop_views: need square images (B, C, S, S), got {tuple(images.shape)}")
    views = []
    for y0, y1, x0, x1 in grid_boxes(images.shape[-1], grids):
        cell = images[:, :, y0:y1, x0:x1]
        shrink = (y1 - y0) > out_size
        views.append(F.interpolate(cell, size=(out_size, out_size), mode="bilinear", align_corners=False,
                                   antialias=shrink))
    return torch.stack(views, 1)


@torch.no_grad()
def encode_views(clip: torch.nn.Module, images_uint8: Tensor, grids: Sequence[int], chunk: int = 64,
                 device: torch.device | None = None) -> Tensor:
    """(N, n, D) L2-normalised teacher embeddings of every view of uint8 `images_uint8` (N, 3, S, S)."""
    device = device or next(clip.parameters()).device
    size = int(clip.config.vision_config.image_size)
    was = clip.training
    clip.eval()
    out = []
    try:
        for s in range(0, len(images_uint8), chunk):
            x = images_uint8[s:s + chunk].float() / 255
            v = crop_views(x, grids, size)                           # (b, n, 3, size, size) in [0, 1]
            b, n = v.shape[:2]
            flat = pixels((v.flatten(0, 1) * 255).round().to(torch.uint8)).to(device)
            out.append(F.normalize(encode_images(clip, flat).float(), dim=-1).view(b, n, -1).cpu())
    finally:
        clip.train(was)
    return torch.cat(out)


def single_object_cells(instances: Tensor, masks: Tensor, grids: Sequence[int], min_share: float = 0.5,
                        min_pixels: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Grid cells (grids > 1) that hold exactly one object: (sample index, view index, class 0..C-1).

    A cell holds an object when at least `min_pixels` of it lie in the cell; it holds exactly one
    when one object does and at least `min_share` of that object's pixels are inside the cell."""
    boxes = grid_boxes(instances.shape[-1], grids)
    grid_of = view_grid(grids)
    samples, views, labels = [], [], []
    for i in range(len(instances)):
        inst, cls = instances[i], masks[i]
        ids = [int(k) for k in inst.unique() if k > 0]
        area = {k: int((inst == k).sum()) for k in ids}
        for j, (y0, y1, x0, x1) in enumerate(boxes):
            if grid_of[j] == 1:
                continue
            cell = inst[y0:y1, x0:x1]
            inside = {k: int((cell == k).sum()) for k in ids}
            present = [k for k in ids if inside[k] >= min_pixels]
            if len(present) == 1 and inside[present[0]] >= min_share * area[present[0]]:
                k = present[0]
                samples.append(i)
                views.append(j)
                labels.append(int(cls[inst == k][0]) - 1)
    return torch.tensor(samples, dtype=torch.long), torch.tensor(views, dtype=torch.long), \
        torch.tensor(labels, dtype=torch.long)
