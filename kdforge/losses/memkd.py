"""MemKD's Normality Recall memory as pure functions (Gu et al., ICCV 2023, card p18).

A memory is L learnable keys K and values V (each (L, C)). A feature vector x recalls
r = sum_j a_j V_j with a = softmax_j(cos(x, K_j) / temperature) (cosine attention; the card's
temperature is 1). Normality embedding learning trains the memory on the teacher's features of
normal exemplars: the memorisation loss asks V to rebuild them when attention is computed
against V itself, and the orthogonality loss pushes every key away from every value
(squared cosines, so it cannot go negative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["cosine_attention", "memorisation_loss", "orthogonality_loss", "recall"]


def _memory(keys: Tensor, values: Tensor, channels: int, name: str) -> None:
    if keys.dim() != 2 or keys.shape != values.shape or keys.shape[1] != channels:
        raise KdforgeError(f"{name}: keys and values must both be (L, {channels}), got {tuple(keys.shape)} and "
                           f"{tuple(values.shape)}")


def cosine_attention(queries: Tensor, keys: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, L) attention of N query vectors (N, C) over L keys: softmax of cosine similarity / temperature."""
    if temperature <= 0:
        raise KdforgeError(f"memory temperature must be > 0, got {temperature}")
    sim = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).t()
    return torch.softmax(sim / temperature, dim=1)


def recall(x: Tensor, keys: Tensor, values: Tensor, temperature: float = 1.0) -> Tensor:
    """The recalled normal feature at every position of a (B, C, H, W) map: sum_j a_j V_j, shape (B, C, H, W)."""
    if x.dim() != 4:
        raise KdforgeError(f"recall: features must be (B, C, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    _memory(keys, values, c, "recall")
    q = x.permute(0, 2, 3, 1).reshape(-1, c)
    r = cosine_attention(q, keys, temperature) @ values
    return r.reshape(b, h, w, c).permute(0, 3, 1, 2)


def memorisation_loss(teacher: Tensor, values: Tensor, temperature: float = 1.0) -> Tensor:
    """L_NM of one scale: mean over positions of ||n(F_T) - n(recall_V(F_T))||^2 on normal exemplars,
    attention computed against V itself (n: L2 normalisation over channels); the teacher is detached."""
    t = teacher.detach()
    r = recall(t, values, values, temperature)
    return (F.normalize(t, dim=1) - F.normalize(r, dim=1)).pow(2).sum(1).mean()


def orthogonality_loss(keys: Tensor, values: Tensor) -> Tensor:
    """L_orth of one scale: mean over all (i, j) of cos(K_i, V_j)^2."""
    _memory(keys, values, keys.shape[-1], "orthogonality_loss")
    return (F.normalize(keys, dim=1) @ F.normalize(values, dim=1).t()).pow(2).mean()
