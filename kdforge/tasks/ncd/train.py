"""NCD loops: supervised pretraining on the known classes, UNO discovery, and evaluation.

* `pretrain_known`: cross-entropy on the known head (cosine logits / temperature) over the
  labelled samples only; this model becomes the discovery initialisation (and, for CrKD, the
  frozen teacher).
* `train_discovery`: UNO (Fini et al., ICCV 2021). Every batch mixes labelled and unlabelled
  samples; each of `num_views` seeded crop/flip views is forwarded; targets are one-hot labels
  (labelled rows) or Sinkhorn-Knopp assignments of the novel-head logits (unlabelled rows), and
  each view's targets supervise the joint known + novel prediction of the other views
  (swapped prediction), averaged over heads. A method adds its own term through `extra_loss`,
  which sees the views and the stacked outputs of the step (CrKD's relation distillation).
  The head with the lowest summed training loss is reported as the "best head" (a training
  signal, never the test split).
* `evaluate_ncd`: task-aware novel clustering accuracy (novel heads, Hungarian matching, on the
  novel samples), known-class accuracy (known head), and task-agnostic all/old/new accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import ConfigError
from kdforge.tasks.common import (
    LoopConfig,
    augment_images,
    epoch_batches,
    fit,
    predict,
    prepare_images,
    seeded_generator,
)
from kdforge.tasks.ncd.data import NCDData
from kdforge.tasks.ncd.losses import discovery_targets, swapped_prediction_loss
from kdforge.tasks.ncd.metrics import cluster_accuracy, split_cluster_accuracy
from kdforge.tasks.ncd.model import DiscoveryNet

__all__ = ["ExtraLoss", "NCDSpec", "evaluate_ncd", "make_views", "pretrain_known", "train_discovery"]

# (views, outputs {"logits_lab": (V, N, C_l), "logits_unlab": (V, H, N, C_u)}, labelled mask (N,))
#   -> (loss, logs)
ExtraLoss = Callable[[list[Tensor], dict[str, Tensor], Tensor], tuple[Tensor, dict[str, float]]]


@dataclass
class NCDSpec:
    """Discovery settings (UNO defaults: temperature 0.1, Sinkhorn 3 iterations with epsilon 0.05)."""

    temperature: float = 0.1
    num_views: int = 2
    num_large: int = 2  # the first `num_large` views produce targets (UNO's large crops)
    sk_iters: int = 3
    sk_epsilon: float = 0.05
    crop_padding: int = 2
    flip: bool = True

    def check(self, where: str) -> None:
        if self.temperature <= 0 or self.sk_epsilon <= 0 or self.sk_iters < 0:
            raise ConfigError(f"{where}: temperature and sk_epsilon must be > 0 and sk_iters >= 0")
        if self.num_views < 2 or not 1 <= self.num_large <= self.num_views:
            raise ConfigError(
                f"{where}: need num_views >= 2 and 1 <= num_large <= num_views, got "
                f"{self.num_views}, {self.num_large}"
            )


def make_views(data: NCDData, idx: Tensor, epoch: int, seed: int, spec: NCDSpec, count: int) -> list[Tensor]:
    """`count` independently seeded crop/flip views of the samples `idx` (view v uses seed * 16 + v)."""
    return [
        augment_images(
            data.images[idx], idx, epoch, seed * 16 + v, data.mean, data.std, spec.crop_padding, spec.flip
        )
        for v in range(count)
    ]


def pretrain_known(
    model: DiscoveryNet, data: NCDData, loop: LoopConfig, spec: NCDSpec, seed: int = 0, views: int = 1
) -> list[dict[str, float]]:
    """Supervised stage: CE(known-head logits / temperature, label) on labelled samples."""
    loop.check("ncd pretrain")
    lab_idx = data.labelled.nonzero().flatten()
    gen = seeded_generator(seed, 31)
    batches: list[Tensor] = []
    steps = max(1, len(lab_idx) // loop.batch_size)

    def on_epoch(epoch: int) -> None:
        batches[:] = [lab_idx[b] for b in epoch_batches(len(lab_idx), loop.batch_size, gen)]

    def step_fn(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        idx = batches[i % len(batches)]
        model.normalize_prototypes()
        losses = [
            F.cross_entropy(model(x)["logits_lab"] / spec.temperature, data.labels[idx])
            for x in make_views(data, idx, epoch, seed, spec, views)
        ]
        return torch.stack(losses).mean(), {}

    model.train()
    torch.manual_seed(seed)
    history = fit(list(model.parameters()), step_fn, steps, loop, "ncd pretrain", on_epoch_start=on_epoch)
    model.normalize_prototypes()
    return history


def train_discovery(
    model: DiscoveryNet,
    data: NCDData,
    loop: LoopConfig,
    spec: NCDSpec,
    seed: int = 0,
    extra_loss: ExtraLoss | None = None,
    desc: str = "ncd discovery",
) -> tuple[list[dict[str, float]], int]:
    """UNO discovery training in place; returns the epoch logs and the best head (lowest training loss)."""
    loop.check(desc)
    spec.check(desc)
    gen = seeded_generator(seed, 37)
    batches: list[Tensor] = []
    steps = max(1, len(data) // loop.batch_size)
    loss_per_head = torch.zeros(model.num_heads)

    def on_epoch(epoch: int) -> None:
        batches[:] = epoch_batches(len(data), loop.batch_size, gen)

    def step_fn(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        idx = batches[i % len(batches)]
        labelled, labels = data.labelled[idx], data.labels[idx]
        views = make_views(data, idx, epoch, seed, spec, spec.num_views)
        model.normalize_prototypes()
        outs = [model(x) for x in views]
        lab = torch.stack([o["logits_lab"] for o in outs])  # (V, N, C_l)
        unlab = torch.stack([o["logits_unlab"] for o in outs])  # (V, H, N, C_u)
        logits = torch.cat([lab.unsqueeze(1).expand(-1, unlab.shape[1], -1, -1), unlab], dim=-1)
        targets = discovery_targets(
            unlab[: spec.num_large].detach(),
            labels,
            labelled,
            model.num_known,
            spec.sk_iters,
            spec.sk_epsilon,
        )
        per_head = swapped_prediction_loss(logits, targets, spec.temperature)
        loss_per_head.add_(per_head.detach())
        loss = per_head.mean()
        logs = {"cluster": float(loss.detach())}
        if extra_loss is not None:
            extra, extra_logs = extra_loss(views, {"logits_lab": lab, "logits_unlab": unlab}, labelled)
            loss = loss + extra
            logs.update(extra_logs)
        return loss, logs

    model.train()
    torch.manual_seed(seed)
    history = fit(list(model.parameters()), step_fn, steps, loop, desc, on_epoch_start=on_epoch)
    model.normalize_prototypes()
    return history, int(torch.argmin(loss_per_head))


@torch.no_grad()
def evaluate_ncd(
    model: DiscoveryNet, data: NCDData, best_head: int | None = None, batch_size: int = 500
) -> dict[str, float]:
    """Accuracies in %: `novel` (task-aware clustering, mean over heads), `novel_best` (best head),
    `known` (known head on known samples), `all`/`old`/`new` (task-agnostic, mean over heads)."""
    out = predict(
        model,
        data.images,
        batch_size,
        lambda x: prepare_images(x, data.mean, data.std),
        lambda o: {"logits_lab": o["logits_lab"], "logits_unlab": o["logits_unlab"].transpose(0, 1)},
    )
    out["logits_unlab"] = out["logits_unlab"].transpose(0, 1)  # (H, N, C_u)
    k = data.num_known
    novel = data.novel
    heads = out["logits_unlab"].shape[0]
    per_head = [
        cluster_accuracy(data.labels[novel] - k, out["logits_unlab"][h, novel].argmax(1))
        for h in range(heads)
    ]
    agnostic = [
        split_cluster_accuracy(
            data.labels, torch.cat([out["logits_lab"], out["logits_unlab"][h]], 1).argmax(1), k
        )
        for h in range(heads)
    ]
    known = ~novel
    res = {
        "novel": 100 * sum(per_head) / heads,
        "known": 100 * float((out["logits_lab"][known].argmax(1) == data.labels[known]).float().mean()),
    }
    if best_head is not None:
        res["novel_best"] = 100 * per_head[best_head]
    for key in ("all", "old", "new"):
        res[key] = 100 * sum(a[key] for a in agnostic) / heads
    return res
