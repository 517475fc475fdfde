"""GiftNet's foreground-background relation distillation (ICCV 2023; card p17, a reconstruction).

For a feature map F (B, C, h, w) and a foreground mask M (B, 1, H, W), the relation of one image is
the cosine matrix between its foreground and its background positions

    M^l = avgpool(M to h x w) > 0.5,  f_p = F[:, p] / ||F[:, p]||
    R(F)[i, j] = <f_i, f_j>,  i in fg(M^l), j in bg(M^l)               (N_fg x N_bg)

and the loss matches the composite's relation (student branch) to the real image's (teacher branch,
detached):

    l1:  mean_ij |R(F_c)[i, j] - R(F_r)[i, j]|
    kl:  mean_i KL(softmax_j(R(F_r)[i] / tau) || softmax_j(R(F_c)[i] / tau))

averaged over the images that have both foreground and background positions at that level and
summed over the levels. Feature maps larger than `pool` x `pool` are average-pooled to it first
(the full matrix grows as (hw)^2); `sample` > 0 keeps at most `sample` random foreground and
background positions per image, the same indices for both branches. An image whose mask leaves no
foreground (or no background) position at a level is skipped there; a level where every image is
skipped adds 0 (with the graph kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["DISTANCES", "fg_bg_relations", "level_mask", "relation_distill_loss", "relation_gap"]

DISTANCES = ("l1", "kl")


def level_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h*w) bool: foreground positions of a level, avgpool(M) > 0.5 (area interpolation)."""
    m = F.adaptive_avg_pool2d(mask.float(), size) if tuple(mask.shape[-2:]) != tuple(size) else mask.float()
    return (m > 0.5).flatten(1)


def _pooled(feat: Tensor, pool: int) -> Tensor:
    h, w = feat.shape[-2:]
    if pool > 0 and (h > pool or w > pool):
        return F.adaptive_avg_pool2d(feat, (min(h, pool), min(w, pool)))
    return feat


def _check(student: Tensor, teacher: Tensor, mask: Tensor) -> None:
    if student.shape != teacher.shape or student.dim() != 4:
        raise KdforgeError(f"relation distillation: student {tuple(student.shape)} and teacher "
                           f"{tuple(teacher.shape)} features must be (B, C, h, w) of one shape")
    if mask.dim() != 4 or mask.shape[0] != student.shape[0] or mask.shape[1] != 1:
        raise KdforgeError(f"relation distillation: need a (B, 1, H, W) mask for {student.shape[0]} images, got "
                           f"{tuple(mask.shape)}")


def fg_bg_relations(student: Tensor, teacher: Tensor, mask: Tensor, pool: int = 16, sample: int = 0,
                    generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per usable image, (R(student), R(teacher)) cosine matrices over the same fg x bg positions."""
    _check(student, teacher, mask)
    s, t = _pooled(student, pool), _pooled(teacher.detach(), pool)
    fg = level_mask(mask, tuple(s.shape[-2:])).to(s.device)
    s = F.normalize(s.float().flatten(2), dim=1)
    t = F.normalize(t.float().flatten(2), dim=1)
    out = []
    for b in range(s.shape[0]):
        i, j = fg[b].nonzero().flatten(), (~fg[b]).nonzero().flatten()
        if len(i) == 0 or len(j) == 0:
            continue
        if sample > 0:
            if len(i) > sample:
                i = i[torch.randperm(len(i), generator=generator)[:sample].to(i.device)]
            if len(j) > sample:
                j = j[torch.randperm(len(j), generator=generator)[:sample].to(j.device)]
        out.append((s[b][:, i].T @ s[b][:, j], t[b][:, i].T @ t[b][:, j]))
    return out


def _distance(rs: Tensor, rt: Tensor, distance: str, tau: float) -> Tensor:
    if distance == "l1":
        return (rs - rt).abs().mean()
    p = F.softmax(rt / tau, dim=1)
    return (p * (F.log_softmax(rt / tau, dim=1) - F.log_softmax(rs / tau, dim=1))).sum(1).mean()


def _batched_level(student: Tensor, teacher: Tensor, mask: Tensor, distance: str, tau: float,
                   pool: int) -> Tensor | None:
    """The mean over usable images of one level's relation distance, all images at once (no sampling)."""
    s, t = _pooled(student, pool), _pooled(teacher.detach(), pool)
    fg = level_mask(mask, tuple(s.shape[-2:])).to(s.device)
    bg = ~fg
    usable = fg.any(1) & bg.any(1)
    if not usable.any():
        return None
    s, t = (F.normalize(x.float().flatten(2), dim=1) for x in (s, t))
    rs, rt = s.transpose(1, 2) @ s, t.transpose(1, 2) @ t               # (B, P, P): every position pair
    n_fg, n_bg = fg.sum(1).clamp_min(1), bg.sum(1).clamp_min(1)
    if distance == "l1":
        pair = (fg[:, :, None] & bg[:, None, :]).float()
        per_image = ((rs - rt).abs() * pair).sum((1, 2)) / (n_fg * n_bg)
    else:
        cols = bg[:, None, :].expand_as(rs)
        # a finite fill: exp underflows to 0 in the softmax, and a row without columns stays finite
        ls = F.log_softmax((rs / tau).masked_fill(~cols, -1e4), dim=2)
        lt = F.log_softmax((rt / tau).masked_fill(~cols, -1e4), dim=2)
        row = torch.where(cols, lt.exp() * (lt - ls), torch.zeros_like(ls)).sum(2)
        per_image = (row * fg.float()).sum(1) / n_fg
    return per_image[usable].mean()


def relation_distill_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor, distance: str = "l1",
                          tau: float = 0.1, pool: int = 16, sample: int = 0,
                          generator: torch.Generator | None = None) -> Tensor:
    """L_RD: sum over the levels of the mean over usable images of the relation distance (module doc).
    Without sampling all images are computed at once (every position pair, masked); with `sample`
    per image on its sampled positions."""
    if distance not in DISTANCES:
        raise KdforgeError(f"relation distillation: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    if tau <= 0:
        raise KdforgeError(f"relation distillation: tau must be > 0, got {tau}")
    if len(student) != len(teacher) or not student:
        raise KdforgeError(f"relation distillation: {len(student)} student levels but {len(teacher)} teacher levels")
    total = student[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student, teacher, strict=True):
        if sample > 0:
            pairs = fg_bg_relations(fs, ft, mask, pool, sample, generator)
            level = torch.stack([_distance(rs, rt, distance, tau) for rs, rt in pairs]).mean() if pairs else None
        else:
            _check(fs, ft, mask)
            level = _batched_level(fs, ft, mask, distance, tau, pool)
        total = total + (level if level is not None else 0.0 * fs.sum())
    return total


@torch.no_grad()
def relation_gap(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor,
                 pool: int = 16) -> list[tuple[float, int]]:
    """Per level, (sum over the usable images of mean |R(F_c) - R(F_r)|, usable images): summed over a
    split's batches, sum / count per level, summed over levels, is the split's relation gap (L1)."""
    out = []
    for fs, ft in zip(student, teacher, strict=True):
        pairs = fg_bg_relations(fs, ft, mask, pool)
        out.append((sum(float((rs - rt).abs().mean()) for rs, rt in pairs), len(pairs)))
    return out
