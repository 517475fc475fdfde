"""TinyCLIP's affinity mimicking (Wu et al., ICCV 2023) and CLIP's contrastive loss it replaces.

Affinity mimicking transfers cross-modal alignment directly: within a batch the student's
image->text and text->image softmax distributions are matched to the teacher's with soft-target
cross-entropy (card p06; official `clip_soft_loss.py`). In one process the "global" batch is the
local one, so the affinity matrices are plain (B, B) products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["affinity_mimicking_loss", "clip_contrastive_loss"]


def _soft_ce(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Mean over rows of -sum(softmax(target) * log_softmax(logits))."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def _check(img: Tensor, txt: Tensor, who: str) -> None:
    if img.dim() != 2 or txt.dim() != 2 or img.shape[0] != txt.shape[0]:
        raise KdforgeError(f"affinity_mimicking_loss: {who} image / text embeddings must be (B, D) and (B, D'), "
                           f"got {tuple(img.shape)} and {tuple(txt.shape)}")


def affinity_mimicking_loss(img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor,
                            scale_s: Tensor | float, scale_t: Tensor | float) -> Tensor:
    """0.5 CE(A_s, softmax(A_t)) + 0.5 CE(A_s^T, softmax(A_t^T)) with A = scale * img @ txt^T.

    Embeddings are L2-normalised here; `scale_*` are multipliers (exp of a logit scale), the
    teacher's usually fixed (TinyCLIP: 50). Teacher inputs are detached. Student and teacher may
    have different embedding sizes (only the B x B affinities are compared).
    """
    _check(img_s, txt_s, "student")
    _check(img_t, txt_t, "teacher")
    if img_s.shape[0] != img_t.shape[0]:
        raise KdforgeError(f"affinity_mimicking_loss: student batch {img_s.shape[0]} != teacher batch "
                           f"{img_t.shape[0]} (the affinities must come from the same batch)")
    img_s, txt_s = F.normalize(img_s, dim=1), F.normalize(txt_s, dim=1)
    with torch.no_grad():
        a_t = scale_t * F.normalize(img_t.detach(), dim=1) @ F.normalize(txt_t.detach(), dim=1).T
    a_s = scale_s * img_s @ txt_s.T
    return 0.5 * _soft_ce(a_s, a_t) + 0.5 * _soft_ce(a_s.T, a_t.T)


def clip_contrastive_loss(img: Tensor, txt: Tensor, scale: Tensor | float) -> Tensor:
    """CLIP's symmetric InfoNCE: pair i is the positive of row i, both directions averaged."""
    _check(img, txt, "the")
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
