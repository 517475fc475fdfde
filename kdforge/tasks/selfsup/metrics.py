"""Frozen-feature evaluation of self-supervised backbones: weighted k-NN and a linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["knn_accuracy", "linear_probe_accuracy"]


def knn_accuracy(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
    k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
) -> float:
    """DINO's weighted k-NN (%): cosine top-k neighbours vote with weight exp(sim / T)."""
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise KdforgeError("knn_accuracy: features and labels differ in length")
    c = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, len(train_feats))
    sims = F.normalize(test_feats, dim=1) @ F.normalize(train_feats, dim=1).T
    top_s, top_i = sims.topk(k, dim=1)
    votes = torch.zeros(len(test_feats), c, device=sims.device)
    votes.scatter_add_(1, train_labels[top_i].to(sims.device), (top_s / temperature).exp())
    return 100.0 * float((votes.argmax(1) == test_labels).float().mean())


def linear_probe_accuracy(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
    steps: int = 300, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0,
) -> float:
    """Full-batch multinomial logistic regression on standardised frozen features; test accuracy (%)."""
    mu, sd = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mu) / sd, (test_feats - mu) / sd
    c = int(max(int(train_labels.max()), int(test_labels.max())) + 1)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], c).to(xtr.device)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), train_labels).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float((lin(xte).argmax(1) == test_labels).float().mean())
