"""UNO's discovery objective: Sinkhorn-Knopp pseudo-labels and the swapped-prediction loss.

Unlabelled samples get soft cluster assignments from Sinkhorn-Knopp on their novel-head
logits (equipartition over the batch: every cluster receives mass 1/C_u, every sample 1),
labelled samples get one-hot known-class targets; the targets of one view supervise the
predictions (over the joint known + novel logits) of the other views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["discovery_targets", "sinkhorn_knopp", "swapped_prediction_loss"]


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, num_iters: int = 3, epsilon: float = 0.05) -> Tensor:
    """Soft assignments (B, K) whose rows sum to 1 and whose columns are pushed towards B/K each.

    Q = exp(logits / epsilon), normalised to total mass 1; then `num_iters` times: rows of Q^T
    (clusters) to 1/K each, columns (samples) to 1/B each; finally scaled so each sample sums to 1.
    The max logit is subtracted first (the normalisation makes it a no-op, the exp cannot overflow).
    """
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise KdforgeError(f"sinkhorn_knopp: logits must be (B, K) with B >= 1, got {tuple(logits.shape)}")
    if epsilon <= 0 or num_iters < 0:
        raise KdforgeError(f"sinkhorn_knopp: need epsilon > 0 and num_iters >= 0, got {epsilon}, {num_iters}")
    z = logits.detach().double() / epsilon
    q = torch.exp(z - z.max()).t()  # (K, B)
    q = q / q.sum()
    k, b = q.shape
    for _ in range(num_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t().to(logits.dtype)


def swapped_prediction_loss(logits: Tensor, targets: Tensor, temperature: float = 0.1) -> Tensor:
    """Per-head loss (H,): mean over large views v and views v' != v of CE(logits[v'] / temp, targets[v]).

    `logits` (V, H, N, C) for all views; `targets` (V_large, H, N, C) from the first V_large views.
    """
    if logits.dim() != 4 or targets.dim() != 4 or logits.shape[1:] != targets.shape[1:]:
        raise KdforgeError(
            f"swapped_prediction_loss: logits (V, H, N, C) and targets (V_large, H, N, C) must "
            f"agree, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    views, large = logits.shape[0], targets.shape[0]
    if views < 2 or not 1 <= large <= views:
        raise KdforgeError(
            f"swapped_prediction_loss: need >= 2 views and 1..V large views, got {views}, {large}"
        )
    logp = F.log_softmax(logits / temperature, dim=-1)
    total = logits.new_zeros(logits.shape[1])
    for v in range(large):
        for other in range(views):
            if other != v:
                total = total + (-(targets[v] * logp[other]).sum(-1)).mean(-1)
    return total / (large * (views - 1))


def discovery_targets(
    logits_unlab: Tensor,
    labels: Tensor,
    labelled: Tensor,
    num_known: int,
    num_iters: int = 3,
    epsilon: float = 0.05,
) -> Tensor:
    """Targets (V, H, N, C_l + C_u): one-hot known labels (labelled rows), else Sinkhorn on novel logits."""
    views, heads, n, num_novel = logits_unlab.shape
    targets = logits_unlab.new_zeros(views, heads, n, num_known + num_novel)
    if bool(labelled.any()):
        targets[:, :, labelled, :num_known] = F.one_hot(labels[labelled], num_known).to(targets.dtype)
    unl = ~labelled
    if bool(unl.any()):
        for v in range(views):
            for h in range(heads):
                targets[v, h, unl, num_known:] = sinkhorn_knopp(logits_unlab[v, h, unl], num_iters, epsilon)
    return targets
