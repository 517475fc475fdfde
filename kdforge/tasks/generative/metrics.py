"""Edit metrics: does the attribute classifier see the target attribute, and how close is the edit to its input."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdforge.tasks.common import predict

__all__ = ["attribute_scores", "edit_metrics"]


def attribute_scores(classifier: nn.Module, images: Tensor, target: int) -> tuple[Tensor, Tensor]:
    """(predicted class == target (N,) bool, softmax probability of target (N,)) in eval mode."""
    logits = predict(classifier, images, batch_size=256)
    return logits.argmax(1) == target, logits.softmax(1)[:, target]


def edit_metrics(classifier: nn.Module, inputs: Tensor, edited: Tensor, target: int) -> dict[str, float]:
    """edit_success (% classified as target), edit_score (mean target probability, %), fidelity_mse (to the
    input, per pixel, [-1, 1] images) and fidelity_psnr (dB)."""
    hit, prob = attribute_scores(classifier, edited, target)
    mse = (edited - inputs).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))          # peak-to-peak range 2 ([-1, 1] images)
    return {"edit_success": 100.0 * float(hit.float().mean()), "edit_score": 100.0 * float(prob.mean()),
            "fidelity_mse": float(mse.mean()), "fidelity_psnr": float(psnr.mean())}
