"""Representation gap and training-free weights used by the Auto-KD search.

Linear CKA (Kornblith et al. 2019) compares two representations of the same samples up to an
orthogonal transform and isotropic scale, so student and teacher features of different widths
can be compared directly: CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), with Xc,
Yc the column-centred (N, p) / (N, q) feature matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdforge.errors import KdforgeError


def linear_cka(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """Linear CKA between (N, ...) features of the same N samples (flattened per sample), in [0, 1]."""
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise KdforgeError(f"cka: features {tuple(x.shape)} and {tuple(y.shape)} must describe the same "
                           "samples (same dim 0)")
    if x.shape[0] < 2:
        raise KdforgeError("cka: needs at least 2 samples")
    xc = x.reshape(x.shape[0], -1).double()
    yc = y.reshape(y.shape[0], -1).double()
    xc = xc - xc.mean(0, keepdim=True)
    yc = yc - yc.mean(0, keepdim=True)
    cross = (yc.t() @ xc).pow(2).sum()
    norm = torch.linalg.matrix_norm(xc.t() @ xc) * torch.linalg.matrix_norm(yc.t() @ yc)
    return (cross / norm.clamp_min(eps)).float()


def training_free_weights(gaps: Sequence[float], tau: float = 0.5) -> list[float]:
    """Weights of several layers (or teachers) from their initial representation gaps, no training.

    softmax(gap / tau): a layer whose teacher representation the untrained student is further
    from gets more weight; the weights sum to 1. `tau` -> infinity gives equal weights.
    """
    if not gaps:
        raise KdforgeError("training-free weights: no gaps given")
    if tau <= 0:
        raise KdforgeError(f"training-free weights: tau must be > 0, got {tau}")
    w = torch.softmax(torch.tensor([float(g) for g in gaps], dtype=torch.float64) / tau, dim=0)
    return [float(v) for v in w]
