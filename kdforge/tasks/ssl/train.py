"""Semi-supervised training step: labelled CE plus weighted CE on pseudo-labelled unlabelled data.

Each iteration draws one batch from the labelled set and one from the unlabelled set (two
endless seeded streams, as the WAD code's paired loaders do) and minimises

    CE(f(x_l), y_l) + mean_u [ w(u) * CE(f(x_u), yhat(u)) ]

`pseudo=None` trains on the labelled set only (the supervised baseline); w = 1 everywhere is
plain pseudo-labelling. An optional `augment(x, generator)` makes the views of both batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.tasks.common import IndexStream, LoopConfig, fit, predict, seeded_generator

__all__ = ["known_accuracy", "train_weighted", "weighted_pseudo_ce"]


def weighted_pseudo_ce(logits: Tensor, pseudo: Tensor, weights: Tensor) -> Tensor:
    """mean_u w(u) * CE(logits_u, yhat_u): the distillation term of WAD (weights are not normalised)."""
    if logits.dim() != 2 or pseudo.shape != (logits.shape[0],) or weights.shape != pseudo.shape:
        raise KdforgeError(
            f"weighted_pseudo_ce: logits (U, K), pseudo (U,), weights (U,) expected, got "
            f"{tuple(logits.shape)}, {tuple(pseudo.shape)}, {tuple(weights.shape)}"
        )
    return (weights.to(logits.dtype) * F.cross_entropy(logits, pseudo.long(), reduction="none")).mean()


def train_weighted(
    student: nn.Module,
    x: Tensor,
    labelled: Tensor,
    labels: Tensor,
    loop: LoopConfig,
    iterations: int,
    unlabelled: Tensor | None = None,
    pseudo: Tensor | None = None,
    weights: Tensor | None = None,
    seed: int = 0,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    desc: str = "ssl",
) -> list[dict[str, float]]:
    """`iterations` steps of labelled CE (+ weighted pseudo-label CE when `pseudo` is given), in place.

    `labelled`/`unlabelled` index `x`; `labels` (len(labelled),) and `pseudo`/`weights`
    (len(unlabelled),) are aligned with them. A fresh optimizer is built (as each WAD round does).
    """
    loop.check(desc)
    if len(labelled) != len(labels) or len(labelled) == 0:
        raise KdforgeError(f"{desc}: {len(labelled)} labelled indices but {len(labels)} labels")
    use_unl = pseudo is not None
    if use_unl:
        if unlabelled is None or len(unlabelled) != len(pseudo) or len(unlabelled) == 0:
            raise KdforgeError(f"{desc}: pseudo-labels must align with a non-empty unlabelled index set")
        weights = torch.ones(len(pseudo)) if weights is None else weights
        if len(weights) != len(pseudo):
            raise KdforgeError(f"{desc}: {len(weights)} weights for {len(pseudo)} pseudo-labels")
    aug_gen = seeded_generator(seed, 59)
    lab_stream = IndexStream(len(labelled), loop.batch_size, seeded_generator(seed, 53))
    unl_stream = (
        IndexStream(len(unlabelled), loop.batch_size, seeded_generator(seed, 61)) if use_unl else None
    )

    def view(v: Tensor) -> Tensor:
        return augment(v, aug_gen) if augment is not None else v

    def step_fn(epoch: int, i: int) -> tuple[Tensor, dict[str, float]]:
        li = next(lab_stream)
        sup = F.cross_entropy(student(view(x[labelled[li]])), labels[li].long())
        if unl_stream is None:
            return sup, {"sup": float(sup.detach())}
        ui = next(unl_stream)
        unsup = weighted_pseudo_ce(student(view(x[unlabelled[ui]])), pseudo[ui], weights[ui])
        return sup + unsup, {"sup": float(sup.detach()), "unsup": float(unsup.detach())}

    student.train()
    return fit(list(student.parameters()), step_fn, iterations, replace(loop, epochs=1), desc)


def known_accuracy(student: nn.Module, x_test: Tensor, y_test: Tensor) -> float:
    """Top-1 accuracy (%) on the known-class test samples."""
    pred = predict(student, x_test).argmax(1)
    return 100.0 * float((pred == y_test).float().mean())
