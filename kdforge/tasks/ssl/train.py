"""Semi-supervised training in rounds: labelled CE plus weighted CE on pseudo-labelled unlabelled data.

Each step draws one batch from the labelled set and one from the unlabelled set (two streams,
as the WAD code's paired loaders) and minimises

    CE(f(x_l), y_l) + mean_u [ w(u) * CE(f(x_u), yhat(u)) ]

A round is one Trainer epoch of `iterations` steps. Before a round the pseudo-labels and
weights of the current unlabelled set come from `knowledge` (a subclass's teacher); after it,
`select` may move unlabelled samples (with their pseudo-labels) into the labelled set, and the
next round starts with a fresh optimizer. With `unlabelled=False` only the labelled CE is
trained (the supervised baseline). The index sets, pseudo-labels, weights and per-round
diagnostics are task state, so a run stopped inside any round resumes exactly.

Both streams are `stream_batch` streams with their own seed parts (seed, stream, round), so a
batch is a pure function of (seed, round, step). Both losses are per-sample means over a
plain MLP and each rank takes its contiguous share of both global batches, so DDP gives the
one-process update (DDP averages the ranks' gradients of equal-sized shares).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.models import create_model
from kdforge.tasks.base import Task, TaskModule, rank_share, stream_batch, top1_counts, top1_rate
from kdforge.tasks.common import predict
from kdforge.tasks.ssl.data import SSLData
from kdforge.train.distributed import DistEnv

__all__ = ["RoundsTask", "SSLBatch", "SSLModule", "known_accuracy", "weighted_pseudo_ce"]

LABELLED_STREAM, UNLABELLED_STREAM = 53, 61   # seed parts of the two index streams


def weighted_pseudo_ce(logits: Tensor, pseudo: Tensor, weights: Tensor) -> Tensor:
    """mean_u w(u) * CE(logits_u, yhat_u): the distillation term of WAD (weights are not normalised)."""
    if logits.dim() != 2 or pseudo.shape != (logits.shape[0],) or weights.shape != pseudo.shape:
        raise KdforgeError(
            f"weighted_pseudo_ce: logits (U, K), pseudo (U,), weights (U,) expected, got "
            f"{tuple(logits.shape)}, {tuple(pseudo.shape)}, {tuple(weights.shape)}"
        )
    return (weights.to(logits.dtype) * F.cross_entropy(logits, pseudo.long(), reduction="none")).mean()


def known_accuracy(student: nn.Module, x_test: Tensor, y_test: Tensor) -> float:
    """Top-1 accuracy (%) on the known-class test samples."""
    pred = predict(student, x_test).argmax(1)
    return 100.0 * float((pred == y_test).float().mean())


@dataclass
class SSLBatch:
    """This rank's labelled batch and (unless supervised) its unlabelled batch with pseudo-labels/weights."""

    x_lab: Tensor
    y_lab: Tensor
    x_unl: Tensor | None = None
    pseudo: Tensor | None = None
    weight: Tensor | None = None


class SSLModule(TaskModule):
    """The classifier: `sup` = labelled CE, `unsup` = weighted pseudo-label CE (both per-sample means)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: SSLBatch) -> Step:
        logits = self.student(batch.x_lab)
        losses = {"sup": F.cross_entropy(logits, batch.y_lab)}
        groups = {"sup": "task"}
        if batch.x_unl is not None:
            losses["unsup"] = weighted_pseudo_ce(self.student(batch.x_unl), batch.pseudo, batch.weight)
            groups["unsup"] = "distill"
        return Step(outputs=logits, losses=losses, groups=groups)


class RoundsTask(Task):
    """A known-class MLP classifier trained in rounds on a labelled and an unlabelled stream.

    Subclasses give the pseudo-labels (`knowledge`) and the samples to move after a round
    (`select`); the default moves nothing.
    """

    name = "ssl"

    def __init__(self, data: SSLData, hidden: Sequence[int], batch_size: int, iterations: int,
                 rounds: int = 1, seed: int = 0, unlabelled: bool = True) -> None:
        if batch_size < 1 or iterations < 1 or rounds < 1:
            raise KdforgeError(f"ssl task: need batch_size, iterations and rounds >= 1, got "
                               f"{batch_size}, {iterations}, {rounds}")
        if len(data.labelled) == 0 or (unlabelled and len(data.unlabelled) == 0):
            raise KdforgeError("ssl task: the labelled (and unlabelled) sets must not be empty")
        self.data = data
        self.hidden = tuple(hidden)
        self.batch_size = batch_size
        self.iterations = iterations
        self.rounds = rounds
        self.seed = seed
        self.use_unlabelled = unlabelled
        self.load_state_dict({})

    # -- hooks of a method --------------------------------------------------------------------------

    def knowledge(self, labelled: Tensor, labels: Tensor, unlabelled: Tensor) -> tuple[Tensor, Tensor]:
        """(pseudo-labels, weights) of the `unlabelled` pool positions, given the labelled set (CPU)."""
        raise NotImplementedError

    def select(self, round_: int, logits: Tensor, pseudo: Tensor) -> Tensor:
        """Positions (into the current unlabelled set) to move to the labelled set after round `round_`."""
        return torch.zeros(0, dtype=torch.long)

    # -- set-up ----------------------------------------------------------------------------------------

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        self.x = self.data.x.float().to(device)
        self.x_test, self.y_test = self.data.x_test.float().to(device), self.data.y_test.to(device)
        student = create_model("mlp", num_classes=self.data.num_known, in_features=self.data.x[0].numel(),
                               hidden=self.hidden)
        return SSLModule(student).to(device)

    def steps_per_epoch(self) -> int:
        return self.iterations

    def fresh_optimizer(self, epoch: int) -> bool:
        return epoch > 0       # each round rebuilds Adam, as the official code does

    # -- rounds ----------------------------------------------------------------------------------------

    def on_epoch_start(self, module: nn.Module, epoch: int) -> None:
        """Pseudo-labels and weights of this round (once: a resumed round keeps the saved ones)."""
        if not self.use_unlabelled or self.ready == epoch:
            return
        pseudo, weight = self.knowledge(self.labelled, self.labels, self.unlabelled)
        if pseudo.shape != self.unlabelled.shape or weight.shape != self.unlabelled.shape:
            raise KdforgeError(f"ssl task: knowledge gave {tuple(pseudo.shape)} pseudo-labels and "
                               f"{tuple(weight.shape)} weights for {len(self.unlabelled)} unlabelled samples")
        self.pseudo, self.weight = pseudo.long().cpu(), weight.float().cpu()
        self.ready = epoch
        truth = self.data.labels[self.unlabelled]
        unk = truth < 0
        info: dict[str, Any] = {
            "round": epoch + 1,
            "labelled": len(self.labelled),
            "unlabelled": len(self.unlabelled),
            "pseudo_acc_known": 100 * float((self.pseudo[~unk] == truth[~unk]).float().mean()),
            "mean_w_known": float(self.weight[~unk].mean()),
            "mean_w_unknown": float(self.weight[unk].mean()) if bool(unk.any()) else None,
        }
        self.history = [*self.history[:epoch], info]

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        """Diagnostic test accuracy of the round (nothing is selected on it), then move `select`ed samples."""
        if not self.use_unlabelled:
            return
        student = module.student
        info = dict(self.history[epoch])
        info["acc"] = known_accuracy(student, self.x_test, self.y_test)
        logits = predict(student, self.x[self.unlabelled.to(self.device)])
        picked = self.select(epoch + 1, logits, self.pseudo).long().cpu()
        if len(picked):
            moved = self.unlabelled[picked]
            truth = self.data.labels[moved]
            info.update({"moved": len(picked), "moved_unknown": int((truth < 0).sum()),
                         "moved_correct": int((self.pseudo[picked] == truth).sum())})
            self.labelled = torch.cat([self.labelled, moved])
            self.labels = torch.cat([self.labels, self.pseudo[picked]])
            keep = torch.ones(len(self.unlabelled), dtype=torch.bool)
            keep[picked] = False
            self.unlabelled = self.unlabelled[keep]
            if len(self.unlabelled) == 0:
                raise KdforgeError("ssl task: every unlabelled sample moved to the labelled set; lower the fraction")
        self.history[epoch] = info
        self.ready = -1

    # -- batches ---------------------------------------------------------------------------------------

    def batch(self, epoch: int, step: int, env: DistEnv) -> SSLBatch:
        """Step `step` of round `epoch`: this rank's share of a labelled and an unlabelled global batch."""
        li = rank_share(stream_batch(len(self.labelled), self.batch_size, step, self.seed, LABELLED_STREAM, epoch),
                        env)
        dev = self.device
        out = SSLBatch(self.x[self.labelled[li].to(dev)], self.labels[li].to(dev))
        if self.use_unlabelled:
            ui = rank_share(stream_batch(len(self.unlabelled), self.batch_size, step, self.seed,
                                         UNLABELLED_STREAM, epoch), env)
            out.x_unl = self.x[self.unlabelled[ui].to(dev)]
            out.pseudo, out.weight = self.pseudo[ui].to(dev), self.weight[ui].to(dev)
        return out

    def train_counts(self, out: Step, batch: SSLBatch) -> dict[str, Tensor]:
        return top1_counts(out.outputs, batch.y_lab)

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return top1_rate(counts, "train_labelled_top1")

    # -- results and state -----------------------------------------------------------------------------

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        if split != "test":
            raise KdforgeError(f"ssl task: no '{split}' split (only the known-class test split)")
        return {"acc": known_accuracy(module.student, self.x_test, self.y_test)}

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        """Known-class test accuracy, the per-round diagnostics and their headline numbers (flat keys,
        so an experiment's premise can read them): the first round's pseudo-label accuracy on the
        known part of the pool and mean weight of its known / unknown samples (the teacher's
        knowledge before any sample moved), and how many samples the rounds moved (unknown ones)."""
        out: dict[str, Any] = self.evaluate(module, "test", env)
        if self.history:
            first = self.history[0]
            out.update(pseudo_acc_known_round1=first["pseudo_acc_known"], mean_w_known_round1=first["mean_w_known"],
                       mean_w_unknown_round1=first["mean_w_unknown"],
                       moved_total=sum(r.get("moved", 0) for r in self.history),
                       moved_unknown_total=sum(r.get("moved_unknown", 0) for r in self.history))
        return {**out, "rounds": [dict(r) for r in self.history]}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "student": f"mlp {self.hidden}", "iterations": self.iterations,
                "batch_size": self.batch_size, "labelled_start": len(self.data.labelled)}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"labelled": self.labelled, "labels": self.labels, "unlabelled": self.unlabelled,
                                 "ready": self.ready, "history": [dict(r) for r in self.history]}
        if self.pseudo is not None:
            state.update(pseudo=self.pseudo, weight=self.weight)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sets, pseudo-labels and diagnostics; an empty state is the start of training."""
        d = self.data
        self.labelled = state.get("labelled", d.labelled).long().cpu().clone()
        self.labels = state.get("labels", d.labels[d.labelled]).long().cpu().clone()
        self.unlabelled = state.get("unlabelled", d.unlabelled).long().cpu().clone()
        self.pseudo: Tensor | None = state.get("pseudo")
        self.weight: Tensor | None = state.get("weight")
        self.ready = int(state.get("ready", -1))
        self.history: list[dict[str, Any]] = [dict(r) for r in state.get("history", [])]
