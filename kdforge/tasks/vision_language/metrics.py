"""Held-out image-text metrics: zero-shot classification from prompts and retrieval recall@k.

Both read cosine similarities of (normalised) embeddings. Retrieval counts a hit when fewer than
k candidates score strictly higher than the paired one, so identical captions (several pairs
share one) tie with the true partner rather than being ranked arbitrarily.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["retrieval_recall", "similarity", "zero_shot_accuracy"]


def similarity(img: Tensor, txt: Tensor) -> Tensor:
    """Cosine similarities (N_img, N_txt)."""
    return F.normalize(img.float(), dim=1) @ F.normalize(txt.float(), dim=1).T


def zero_shot_accuracy(img: Tensor, prompts: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%) of classifying each image by its most similar class prompt."""
    if len(img) != len(labels):
        raise KdforgeError(f"zero_shot_accuracy: {len(img)} images but {len(labels)} labels")
    pred = similarity(img, prompts).argmax(1).cpu()
    return 100.0 * float((pred == labels.cpu()).float().mean())


def retrieval_recall(sim: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k (%) of a square similarity matrix whose diagonal pairs match."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise KdforgeError(f"retrieval_recall: need a square (N, N) similarity matrix, got {tuple(sim.shape)}")
    pos = sim.diagonal()
    above_i2t = (sim > pos.unsqueeze(1)).sum(1)       # texts scoring above the image's own caption
    above_t2i = (sim > pos.unsqueeze(0)).sum(0)       # images scoring above the caption's own image
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((above_i2t < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((above_t2i < k).float().mean())
    return out
