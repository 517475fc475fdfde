"""Classification metrics and the evaluation loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.base import ImageTensors
from kdforge.data.stream import StreamingImages


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k predictions, for each k."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred == target[:, None]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def _sequential_batches(data: ImageTensors | StreamingImages, lo: int, hi: int, batch_size: int,
                        device: torch.device, workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images, labels) of positions lo..hi in order: tensor slices, or decoded by DataLoader workers."""
    if isinstance(data, StreamingImages):
        chunks = [list(range(start, min(hi, start + batch_size))) for start in range(lo, hi, batch_size)]
        for images, labels, _ in data.loader(chunks, workers, pin_memory=device.type == "cuda"):
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return
    for start in range(lo, hi, batch_size):
        stop = min(hi, start + batch_size)
        yield (data.images[start:stop].to(device, non_blocking=True),
               data.labels[start:stop].to(device, non_blocking=True))


@torch.no_grad()
def evaluate_counts(model: nn.Module, data: ImageTensors | StreamingImages, prepare: Callable[[Tensor], Tensor],
                    batch_size: int = 256, device: torch.device | str = "cpu",
                    autocast: Callable[[], object] | None = None,
                    shard: tuple[int, int] = (0, 1), workers: int = 0) -> Tensor:
    """[top-1 hits, top-5 hits, summed cross-entropy, samples] on shard `(rank, world)` of a split.

    Counts (not rates) so distributed ranks can sum them before dividing. A streamed split is read
    by `workers` DataLoader processes.
    """
    was_training = model.training
    model.eval()
    rank, world = shard
    n_all = len(data)
    lo, hi = n_all * rank // world, n_all * (rank + 1) // world
    correct1 = correct5 = 0
    loss_sum = 0.0
    for images, y in _sequential_batches(data, lo, hi, batch_size, torch.device(device), workers):
        x = prepare(images)
        if autocast is not None:
            with autocast():
                logits = model(x)
        else:
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        c1, c5 = topk_correct(logits, y)
        correct1 += c1
        correct5 += c5
    model.train(was_training)
    return torch.tensor([correct1, correct5, loss_sum, hi - lo], dtype=torch.float64)


def rates(counts: Tensor) -> dict[str, float]:
    """Counts from `evaluate_counts` (possibly summed over ranks) -> top1/top5 in %, mean loss."""
    c1, c5, loss_sum, n = (float(v) for v in counts)
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n}


def evaluate(model: nn.Module, data: ImageTensors | StreamingImages, prepare: Callable[[Tensor], Tensor],
             batch_size: int = 256, device: torch.device | str = "cpu",
             autocast: Callable[[], object] | None = None, workers: int = 0) -> dict[str, float]:
    """top-1 / top-5 accuracy (%) and mean cross-entropy of `model` on a whole split."""
    return rates(evaluate_counts(model, data, prepare, batch_size, device, autocast, workers=workers))
