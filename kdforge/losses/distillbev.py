"""DistillBEV's pure pieces (Wang et al., ICCV 2023): BEV region masks, adaptive scales, teacher attention, the loss.

One distillation position compares the adapted student BEV feature F_S' = Conv1x1(F_S) with the frozen
teacher's F_T (B, C, H, W) on the same grid (the official `fgd_distill_loss`):

    A_sp = H W softmax_hw(mean_c |F_T| / T_sp),  A_ch = C softmax_c(mean_hw |F_T| / T_ch)    (detached)
    M_fg = cells whose centre lies inside a ground-truth box (rotated test); M_bg = 1 - M_fg (- M_fp)
    S    = max(S_fg, S_bg), S_fg = sqrt(cell area / (l_k w_k)) for a cell of box k, S_bg = 1 / N_bg
    E    = (F_S' - F_T)^2
    L_fg = w_fg sum(E M_fg S A_sp A_ch) / B,  L_bg = w_bg sum(E M_bg S A_sp A_ch) / B
    L_fp = w_fp sum(E M_fp S_fp A_sp A_ch) / B   (false-positive regions; off in the released configs)
    L_ch = w_ch sum_c |mean_hw F_T - mean_hw F_S'| / B,  L_sp = w_sp sum_hw |mean_c F_T - Conv3x3(mean_c F_S')| / B

The false-positive region (`false_positive_mask`): cells where the teacher's class-max heatmap
probability exceeds `threshold` while the ground-truth heatmap stays below `gt_threshold`, minus the
foreground; S_fp is 1 / (cells of its 4-connected component) ("dfs") or 1 / (fp cells of the scene)
("average"), and the background count drops by the fp cells. The method around these (adapters,
positions, the teacher) is `kdforge.methods.distillbev`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["box_masks", "channel_attention", "distillbev_terms", "false_positive_mask", "plain_mse",
           "region_masks", "spatial_attention"]


def box_masks(boxes: Tensor, extent: float, cell: float, grid: int) -> tuple[Tensor, Tensor]:
    """(fg (G, G) 0/1, fg scale (G, G)) of one scene's boxes (M, >= 7: x, y, z, l, w, h, yaw) on a square BEV grid.

    Rows are y, columns x (cell (iy, ix) has centre (-extent + (ix + .5) cell, -extent + (iy + .5) cell)), the
    head grid's axis order. A cell inside several boxes takes the first box's scale (as the official code).
    """
    centres = -extent + (torch.arange(grid, dtype=torch.float64) + 0.5) * cell
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    fg = torch.zeros(grid, grid, dtype=torch.float64)
    scale = torch.zeros(grid, grid, dtype=torch.float64)
    for box in boxes.double().tolist()[::-1]:           # reversed: the first box writes last and wins
        x, y, _, l, w, _, yaw = box[:7]
        c, s = math.cos(yaw), math.sin(yaw)
        dx, dy = cx - x, cy - y
        inside = ((dx * c + dy * s).abs() <= l / 2) & ((-dx * s + dy * c).abs() <= w / 2)
        fg[inside] = 1.0
        scale[inside] = math.sqrt(cell * cell / (l * w))
    return fg.float(), scale.float()


def false_positive_mask(gt_heat: Tensor, teacher_heat: Tensor, fg: Tensor, threshold: float, gt_threshold: float,
                        scale_mode: str = "dfs") -> tuple[Tensor, Tensor]:
    """(fp (B, H, W) 0/1, fp scale (B, H, W)): teacher class-max probability > threshold, GT class-max < gt_threshold,
    outside the foreground. `teacher_heat` are probabilities (B, K, H, W), `gt_heat` targets (B, K, H, W)."""
    fp = (gt_heat.amax(1) < gt_threshold) & (teacher_heat.amax(1) > threshold) & (fg == 0)
    scale = torch.zeros(fp.shape, dtype=torch.float32, device=fp.device)
    for b in range(len(fp)):
        if not fp[b].any():
            continue
        if scale_mode == "average":
            scale[b][fp[b]] = 1.0 / float(fp[b].sum())
        else:
            from scipy import ndimage

            labels, n = ndimage.label(fp[b].cpu().numpy())          # 4-connectivity, the official BFS
            lab = torch.from_numpy(labels).to(fp.device)
            sizes = torch.bincount(lab.flatten(), minlength=n + 1).float()
            scale[b] = torch.where(lab > 0, 1.0 / sizes[lab], torch.zeros((), device=fp.device))
    return fp.float(), scale


def region_masks(boxes: list[Tensor], extent: float, cell: float, grid: int, fp: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(fg (B, 1, G, G), bg (B, 1, G, G), combined scale S = max(S_fg, S_bg) (B, 1, G, G)) of a batch; the fp cells
    (B, G, G), when given, leave the background and its count."""
    fg, s_fg = zip(*[box_masks(b, extent, cell, grid) for b in boxes], strict=True)
    fg_t, s_fg_t = torch.stack(fg)[:, None], torch.stack(s_fg)[:, None]
    bg = 1 - fg_t
    if fp is not None:
        bg = bg * (1 - fp[:, None].to(bg.device))
    n_bg = bg.flatten(1).sum(1).clamp_min(1)
    s_bg = (1.0 / n_bg)[:, None, None, None].expand_as(bg)
    return fg_t, bg, torch.maximum(s_fg_t, s_bg)


def spatial_attention(f_t: Tensor, temp: float) -> Tensor:
    """(B, 1, H, W) H W softmax over cells of mean_c |F_T| / temp (detached)."""
    b, _, h, w = f_t.shape
    a = torch.softmax(f_t.detach().abs().mean(1).flatten(1) / temp, dim=1) * h * w
    return a.view(b, 1, h, w)


def channel_attention(f_t: Tensor, temp: float) -> Tensor:
    """(B, C, 1, 1) C softmax over channels of mean_hw |F_T| / temp (detached)."""
    b, c = f_t.shape[:2]
    return (torch.softmax(f_t.detach().abs().mean((2, 3)) / temp, dim=1) * c).view(b, c, 1, 1)


def distillbev_terms(f_s: Tensor, f_t: Tensor, fg: Tensor, bg: Tensor, scale: Tensor, *, w_fg: float, w_bg: float,
                     w_ch: float, w_sp: float, t_sp: float, t_ch: float, spatial_conv: torch.nn.Module | None,
                     use_spatial: bool = True, use_channel: bool = True, fp: Tensor | None = None,
                     fp_scale: Tensor | None = None, w_fp: float = 0.0) -> dict[str, Tensor]:
    """The named loss terms (already weighted, sums / B) of one position; `f_s` is the adapted student feature."""
    b = f_s.shape[0]
    f_t = f_t.detach()
    err = (f_s - f_t) ** 2
    att = torch.ones_like(scale)
    if use_spatial:
        att = att * spatial_attention(f_t, t_sp)
    ch = channel_attention(f_t, t_ch) if use_channel else torch.ones(b, 1, 1, 1, device=f_s.device)
    out = {"fg": w_fg * (err * (fg * scale * att) * ch).sum() / b,
           "bg": w_bg * (err * (bg * scale * att) * ch).sum() / b}
    if fp is not None and w_fp > 0:
        out["fp"] = w_fp * (err * (fp[:, None] * fp_scale[:, None] * att) * ch).sum() / b
    if use_channel and w_ch > 0:
        out["ch"] = w_ch * (f_t.mean((2, 3)) - f_s.mean((2, 3))).abs().sum() / b
    if use_spatial and w_sp > 0 and spatial_conv is not None:
        out["sp"] = w_sp * (f_t.mean(1, keepdim=True) - spatial_conv(f_s.mean(1, keepdim=True))).abs().sum() / b
    return out


def plain_mse(f_s: Tensor, f_t: Tensor, weight: float) -> Tensor:
    """Full-map imitation: weight * sum_c mean_hw (F_S' - F_T)^2, mean over scenes (every cell weighted 1 / HW, the
    background term's scale without regions, size scaling or attention)."""
    b, _, h, w = f_s.shape
    return weight * ((f_s - f_t.detach()) ** 2).sum() / (b * h * w)
