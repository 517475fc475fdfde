"""SAM's loose triplet feature loss (vision -> audio dense distillation, card p09).

Teacher (visual) features v (N, V, C) and student (audio) features a (N, A, C) have different
position counts and no position-to-position correspondence, so each teacher position picks its own
positive among the audio positions, the most similar one, and is pushed further from the others:

    s(j, k) = cos(v(j), a(k))
    k+(j)   = argmax_k s(j, k)                                    (the "loosely defined" positive)
    L       = 1/V sum_j sum_{k' in N(k+)} max(0, m - s(j, k+) + s(j, k'))        (mean over the batch)

N(k+) is every other audio position (`neg="all"`, the formula as written: a sum, not a mean), or one
random grid neighbour of k+ (`neg="adjacent"`, drawn from `generator`; the card's fallback when
the loss stalls). The argmax is not differentiated (it only selects); gradients reach a through
both similarities. The teacher side is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["NEGATIVES", "adjacent_negatives", "loose_triplet_feature_kd"]

NEGATIVES = ("all", "adjacent")


def adjacent_negatives(positive: Tensor, grid: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """One random 4-neighbour (on the (h, w) audio grid, row-major) of each index in `positive`."""
    h, w = grid
    if h * w < 2:
        raise KdforgeError(f"loose triplet: an adjacent negative needs an audio grid of >= 2 positions, got {grid}")
    row, col = positive // w, positive % w
    steps = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]], device=positive.device)
    ok = torch.stack([(row + dr >= 0) & (row + dr < h) & (col + dc >= 0) & (col + dc < w) for dr, dc in steps.tolist()],
                     dim=-1)                                                     # (..., 4) valid neighbours
    noise = torch.rand(ok.shape, generator=generator).to(positive.device)
    pick = torch.where(ok, noise, -1.0).argmax(-1)                               # a uniform valid neighbour
    d = steps[pick]
    return (row + d[..., 0]) * w + (col + d[..., 1])


def loose_triplet_feature_kd(teacher: Tensor, student: Tensor, margin: float = 0.3, neg: str = "all",
                             grid: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """SAM's loose triplet loss of teacher features (N, V, C) against student features (N, A, C) (module doc)."""
    if teacher.dim() != 3 or student.dim() != 3 or teacher.shape[0] != student.shape[0] \
            or teacher.shape[2] != student.shape[2]:
        raise KdforgeError(f"loose triplet: need teacher (N, V, C) and student (N, A, C) features with the same N and "
                           f"C, got {tuple(teacher.shape)} and {tuple(student.shape)}")
    if neg not in NEGATIVES:
        raise KdforgeError(f"loose triplet: neg must be one of {', '.join(NEGATIVES)}, got {neg!r}")
    if student.shape[1] < 2:
        raise KdforgeError("loose triplet: the student needs >= 2 positions (a positive and a negative)")
    sim = F.normalize(teacher.detach().float(), dim=-1) @ F.normalize(student.float(), dim=-1).transpose(1, 2)
    positive = sim.detach().argmax(-1)                                           # (N, V)
    s_pos = sim.gather(-1, positive.unsqueeze(-1))                               # (N, V, 1)
    if neg == "all":
        hinge = (margin - s_pos + sim).clamp_min(0.0)
        hinge = hinge.scatter(-1, positive.unsqueeze(-1), 0.0)                   # k' != k+
        return hinge.sum(-1).mean()
    if grid is None or grid[0] * grid[1] != student.shape[1]:
        raise KdforgeError(f"loose triplet: neg='adjacent' needs the student's grid (h, w) with h * w = "
                           f"{student.shape[1]}, got {grid}")
    other = adjacent_negatives(positive, grid, generator)
    s_neg = sim.gather(-1, other.unsqueeze(-1))
    return (margin - s_pos + s_neg).clamp_min(0.0).mean()
