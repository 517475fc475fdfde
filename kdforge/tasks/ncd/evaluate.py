"""NCD evaluation: task-aware novel clustering, known-class accuracy and task-agnostic all/old/new."""

from __future__ import annotations

import torch

from kdforge.tasks.common import predict, prepare_images
from kdforge.tasks.ncd.data import NCDData
from kdforge.tasks.ncd.metrics import cluster_accuracy, split_cluster_accuracy
from kdforge.tasks.ncd.model import DiscoveryNet

__all__ = ["evaluate_ncd", "known_accuracy"]


def _outputs(model: DiscoveryNet, data: NCDData, batch_size: int) -> dict[str, torch.Tensor]:
    """Known logits (N, C_l) and novel logits (H, N, C_u) of every sample, on the CPU."""
    device = next(model.parameters()).device
    out = predict(
        model,
        data.images,
        batch_size,
        lambda x: prepare_images(x.to(device), data.mean, data.std),
        lambda o: {"logits_lab": o["logits_lab"].cpu(), "logits_unlab": o["logits_unlab"].transpose(0, 1).cpu()},
    )
    out["logits_unlab"] = out["logits_unlab"].transpose(0, 1)
    return out


@torch.no_grad()
def known_accuracy(model: DiscoveryNet, data: NCDData, batch_size: int = 500) -> float:
    """Known-head accuracy (%) on the known-class samples (the supervised stage's metric)."""
    known = (~data.novel).cpu()
    logits = _outputs(model, data.subset(known.nonzero().flatten().to(data.labels.device)), batch_size)
    return 100 * float((logits["logits_lab"].argmax(1) == data.labels.cpu()[known]).float().mean())


@torch.no_grad()
def evaluate_ncd(
    model: DiscoveryNet, data: NCDData, best_head: int | None = None, batch_size: int = 500
) -> dict[str, float]:
    """Accuracies in %: `novel` (task-aware clustering, mean over heads), `novel_best` (best head),
    `known` (known head on known samples), `all`/`old`/`new` (task-agnostic, mean over heads)."""
    out = _outputs(model, data, batch_size)
    labels = data.labels.cpu()
    k = data.num_known
    novel = labels >= k
    heads = out["logits_unlab"].shape[0]
    per_head = [
        cluster_accuracy(labels[novel] - k, out["logits_unlab"][h, novel].argmax(1)) for h in range(heads)
    ]
    agnostic = [
        split_cluster_accuracy(labels, torch.cat([out["logits_lab"], out["logits_unlab"][h]], 1).argmax(1), k)
        for h in range(heads)
    ]
    known = ~novel
    res = {
        "novel": 100 * sum(per_head) / heads,
        "known": 100 * float((out["logits_lab"][known].argmax(1) == labels[known]).float().mean()),
    }
    if best_head is not None:
        res["novel_best"] = 100 * per_head[best_head]
    for key in ("all", "old", "new"):
        res[key] = 100 * sum(a[key] for a in agnostic) / heads
    return res
