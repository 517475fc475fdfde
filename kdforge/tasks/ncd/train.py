"""NCD as two Tasks of the one Trainer: supervised pretraining, then UNO discovery.

* `PretrainTask`: cross-entropy on the known head (cosine logits / temperature) over the
  labelled samples only; its weights start discovery and, frozen, are the teacher snapshot.
* `DiscoveryTask`: UNO (Fini et al., ICCV 2021). Every batch mixes labelled and unlabelled
  samples; each of `num_views` seeded crop/flip views is forwarded; targets are one-hot labels
  (labelled rows) or Sinkhorn-Knopp assignments of the novel-head logits (unlabelled rows), and
  each view's targets supervise the joint known + novel prediction of the other views (swapped
  prediction), averaged over heads. The novel heads are re-initialised from the run seed. A
  method adds its own term by overriding `make_term(teacher)` (CrKD's relation distillation);
  the term sees the views and the stacked outputs of the step. The head with the lowest summed
  training loss is the "best head" (task state; a training signal, never the test split).

Prototypes are re-normalised before each forward (as UNO does) and after each optimizer step,
so checkpoints and the final model hold unit prototypes.

Distributed runs use per-rank batch statistics, as multi-GPU NCD code usually does: each rank
takes its contiguous share of every global batch; BatchNorm, Sinkhorn's equipartition and
CrKD's weight normalisation see that share only (not bitwise equal to one process; on GPUs
`trainer.sync_bn=true` synchronises BatchNorm). The per-head loss sums are averaged over ranks
every step, so every rank picks the same best head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Autocast, Task, TaskModule, rank_share, stream_batch, top1_counts, top1_rate
from kdforge.tasks.ncd.data import NCDData
from kdforge.tasks.ncd.evaluate import evaluate_ncd, known_accuracy
from kdforge.tasks.ncd.losses import discovery_targets, swapped_prediction_loss
from kdforge.tasks.ncd.model import DiscoveryNet
from kdforge.tasks.ncd.views import NCDBatch, NCDSpec, ncd_batch
from kdforge.train.distributed import DistEnv

__all__ = ["DiscoveryModule", "DiscoveryTask", "ExtraLoss", "PretrainModule", "PretrainTask", "reset_novel_heads"]

# (views, outputs {"logits_lab": (V, N, C_l), "logits_unlab": (V, H, N, C_u)}, labelled mask (N,))
#   -> (loss, detached logs)
ExtraLoss = Callable[[list[Tensor], dict[str, Tensor], Tensor], tuple[Tensor, dict[str, Tensor]]]
NetFactory = Callable[[], DiscoveryNet]

PRETRAIN_STREAM, DISCOVERY_STREAM = 31, 37   # seed parts of the two batch streams


def reset_novel_heads(net: DiscoveryNet, seed: int) -> None:
    """Fresh novel heads (projectors, BN statistics, prototypes) drawn from `seed`, as every discovery run starts."""
    torch.manual_seed(seed)
    for m in net.head_unlab.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    net.normalize_prototypes()


# ------------------------------------------------------------------------------------- modules


class PretrainModule(TaskModule):
    """The discovery network (`student`) trained with CE on the known head; the novel heads are not trained here."""

    def __init__(self, net: DiscoveryNet, temperature: float) -> None:
        super().__init__()
        self.student, self.temperature = net, float(temperature)
        net.head_unlab.requires_grad_(False)   # unused by the loss (DDP needs every trained parameter used)

    def forward(self, batch: NCDBatch) -> Step:
        self.student.normalize_prototypes()
        logits = [self.student(x)["logits_lab"] for x in batch.views]
        loss = torch.stack([F.cross_entropy(z / self.temperature, batch.labels) for z in logits]).mean()
        return Step(outputs=logits[0], losses={"ce": loss}, groups={"ce": "task"})

    def after_optimizer_step(self, step: int) -> None:
        self.student.normalize_prototypes()


class DiscoveryModule(TaskModule):
    """Discovery network (`student`, so `trainer.sync_bn` finds it), the frozen teacher snapshot (`teachers`:
    never trained or checkpointed) and the method's extra term."""

    def __init__(self, net: DiscoveryNet, teacher: DiscoveryNet, spec: NCDSpec, term: ExtraLoss | None = None) -> None:
        super().__init__()
        self.student, self.spec, self.term = net, spec, term
        teacher.eval().requires_grad_(False)
        teacher.normalize_prototypes()
        self.teachers = nn.ModuleDict({"teacher": teacher})

    def forward(self, batch: NCDBatch) -> Step:
        spec, net = self.spec, self.student
        net.normalize_prototypes()
        outs = [net(x) for x in batch.views]
        lab = torch.stack([o["logits_lab"] for o in outs])  # (V, N, C_l)
        unlab = torch.stack([o["logits_unlab"] for o in outs])  # (V, H, N, C_u)
        logits = torch.cat([lab.unsqueeze(1).expand(-1, unlab.shape[1], -1, -1), unlab], dim=-1)
        targets = discovery_targets(unlab[: spec.num_large].detach(), batch.labels, batch.labelled,
                                    net.num_known, spec.sk_iters, spec.sk_epsilon)
        per_head = swapped_prediction_loss(logits, targets, spec.temperature)
        losses, groups = {"cluster": per_head.mean()}, {"cluster": "task"}
        extras = {"head_loss": per_head.detach().float()}
        if self.term is not None:     # distillation reads the large crops only, as the targets do (official CrKD)
            big = spec.num_large
            extra, logs = self.term(batch.views[:big], {"logits_lab": lab[:big], "logits_unlab": unlab[:big]},
                                    batch.labelled)
            losses["rkd"], groups["rkd"] = extra, "distill"
            extras.update(logs)
        return Step(outputs=logits.detach(), losses=losses, groups=groups, extras=extras)

    def after_optimizer_step(self, step: int) -> None:
        self.student.normalize_prototypes()


# ------------------------------------------------------------------------------------- tasks


class _NCDTask(Task):
    """Shared data handling: both splits live on the training device; batches are index-addressable."""

    stream = 0

    def __init__(self, train: NCDData, test: NCDData, make_net: NetFactory, spec: NCDSpec, seed: int,
                 batch_size: int) -> None:
        if batch_size < 1:
            raise KdforgeError(f"ncd: batch_size must be >= 1, got {batch_size}")
        self.train, self.test, self.make_net = train, test, make_net
        self.spec, self.seed, self.batch_size = spec, int(seed), int(batch_size)
        self.device = torch.device("cpu")
        self._positions: Tensor | None = None

    def _place(self, device: torch.device, env: DistEnv) -> None:
        self.device, self.env = device, env
        self.train, self.test = self.train.to(device), self.test.to(device)

    def positions(self) -> Tensor:
        """The data set positions (CPU) this task draws batches from: every training sample."""
        if self._positions is None:
            self._positions = self.select_positions()
        return self._positions

    def select_positions(self) -> Tensor:
        return torch.arange(len(self.train))

    def steps_per_epoch(self) -> int:
        return max(1, len(self.positions()) // self.batch_size)

    def batch_index(self, epoch: int, step: int, env: DistEnv) -> Tensor:
        """This rank's share of global batch `step` of `epoch`: a pure function of (seed, epoch, step)."""
        pos = self.positions()
        k = epoch * self.steps_per_epoch() + step
        return rank_share(pos[stream_batch(len(pos), self.batch_size, k, self.seed, self.stream)], env)

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        if split != "test":
            raise KdforgeError(f"ncd: no '{split}' split (the setting has train and test only)")
        return evaluate_ncd(module.student, self.test)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.train.name, "known_classes": self.train.num_known,
                "novel_classes": self.train.num_novel}


class PretrainTask(_NCDTask):
    """Supervised stage: CE on the known classes over the labelled samples (the teacher of discovery)."""

    name = "ncd_pretrain"
    stream = PRETRAIN_STREAM

    def __init__(self, *args: Any, views: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.views = int(views)

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self._place(device, env)
        return PretrainModule(self.make_net(), self.spec.temperature).to(device)

    def select_positions(self) -> Tensor:
        return self.train.labelled.cpu().nonzero().flatten()

    def batch(self, epoch: int, step: int, env: DistEnv) -> NCDBatch:
        idx = self.batch_index(epoch, step, env)
        return ncd_batch(self.train, idx, epoch, self.seed, self.spec, self.views)

    def train_counts(self, out: Step, batch: NCDBatch) -> dict[str, Tensor]:
        return top1_counts(out.outputs, batch.labels)

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return top1_rate(counts, "train_known_top1")

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        return {"test_known": known_accuracy(module.student, self.test)}


class DiscoveryTask(_NCDTask):
    """UNO discovery from the pretrained weights, with an optional method term (`make_term`)."""

    name = "ncd_discovery"
    stream = DISCOVERY_STREAM

    def __init__(self, *args: Any, pretrained: dict[str, Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec.check("ncd discovery")
        self.pretrained = pretrained
        self.head_loss: Tensor | None = None        # summed per-head training loss (best head)
        self.epoch_loss = [0.0, 0]                  # running epoch: summed total loss, steps
        self.last_epoch_loss: float | None = None

    def make_term(self, teacher: DiscoveryNet) -> ExtraLoss | None:
        """The method's extra loss on top of UNO (None: plain UNO)."""
        return None

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self._place(device, env)
        net = self.make_net()
        net.load_state_dict(self.pretrained)
        teacher = copy.deepcopy(net)
        reset_novel_heads(net, self.seed)
        module = DiscoveryModule(net, teacher, self.spec, self.make_term(teacher)).to(device)
        self.head_loss = torch.zeros(net.num_heads, dtype=torch.float64, device=device)
        return module

    def batch(self, epoch: int, step: int, env: DistEnv) -> NCDBatch:
        idx = self.batch_index(epoch, step, env)
        return ncd_batch(self.train, idx, epoch, self.seed, self.spec, self.spec.num_views)

    def forward(self, model: Callable[[Any], Step], batch: NCDBatch) -> Step:
        out = model(batch)
        packed = torch.cat([out.extras["head_loss"].double(), out.total().detach().double().reshape(1)])
        packed = self.env.all_reduce_sum(packed) / self.env.world   # the mean over ranks: one value everywhere
        self.head_loss += packed[:-1]
        self.epoch_loss = [self.epoch_loss[0] + packed[-1], self.epoch_loss[1] + 1]
        return out

    def train_counts(self, out: Step, batch: NCDBatch) -> dict[str, Tensor]:
        logs = {k: v.detach().double().sum() for k, v in out.extras.items() if k != "head_loss"}
        return {**logs, "steps": torch.ones((), dtype=torch.float64, device=batch.labels.device)}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        steps = max(1.0, counts.get("steps", 0.0))
        return {f"train_{k}": v / steps for k, v in counts.items() if k != "steps"}

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        total, steps = self.epoch_loss
        self.last_epoch_loss = float(total) / max(1, steps)
        self.epoch_loss = [0.0, 0]

    def best_head(self) -> int:
        return int(torch.argmin(self.head_loss))

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        net, best = module.student, self.best_head()
        novel_train = self.train.subset(self.train.novel.nonzero().flatten())
        res: dict[str, Any] = {"best_head": best, "final_loss": self.last_epoch_loss}
        res.update({f"train_{k}": v for k, v in evaluate_ncd(net, novel_train, best).items() if k.startswith("novel")})
        res.update({f"test_{k}": v for k, v in evaluate_ncd(net, self.test, best).items()})
        res["teacher_test_known"] = known_accuracy(module.teachers["teacher"], self.test)
        return res

    def state_dict(self) -> dict[str, Any]:
        return {"head_loss": self.head_loss.cpu(), "epoch_loss": [float(self.epoch_loss[0]), int(self.epoch_loss[1])],
                "last_epoch_loss": self.last_epoch_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"head_loss", "epoch_loss", "last_epoch_loss"}:
            raise KdforgeError(f"ncd discovery: checkpoint task state has keys {sorted(state)}; not a discovery run")
        self.head_loss = torch.as_tensor(state["head_loss"], dtype=torch.float64).to(self.device)
        self.epoch_loss = [float(state["epoch_loss"][0]), int(state["epoch_loss"][1])]
        self.last_epoch_loss = state["last_epoch_loss"]
