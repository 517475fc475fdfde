"""Self-supervised self-distillation as a Task: unlabelled procedural images, DINO views, k-NN/probe.

Batch k of epoch e takes the dataset ids `stream_batch(n, B, e * steps + k, seed, 3)`; the
partner ids of view 2 come from `partners` (itself for plain DINO; AdaSim overrides it), and
the crop/flip/jitter draws of the whole global batch come from `seeded_generator(seed, 3, e, k)`,
so a batch is a pure function of (seed, epoch, step) and a run resumes exactly at any step.
Under DDP every rank draws the global batch and takes its `rank_share`; teacher features of
view 1 are all-gathered for `observe` (AdaSim's bank), so every rank keeps the same bank.

Labels are read only by `result()` (k-NN and linear probe on the test split, after training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.synthetic import procedural_cifar
from kdforge.data.transforms import to_normalized
from kdforge.distill.distiller import Step
from kdforge.tasks.base import Autocast, Task, rank_share, seeded_generator, stream_batch
from kdforge.tasks.common import LoopConfig, predict
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.selfsup.dino import DINOHead, DINOModule, DINOSpec, SelfDistillNet, ViewBatch
from kdforge.tasks.selfsup.metrics import knn_accuracy, linear_probe_accuracy
from kdforge.tasks.selfsup.views import apply_view, slice_params, view_params
from kdforge.train.distributed import DistEnv, gather_rows, global_batchnorm

__all__ = ["SSLDataConfig", "SSLEvalConfig", "SelfDistillTask"]

VIEW_STREAM = 3      # seed part of the sample order and of the view draws


@dataclass
class SSLDataConfig:
    num_classes: int = 10
    num_train: int = 1500
    num_test: int = 1000
    image_size: int = 16
    seed: int = 0


@dataclass
class SSLEvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_steps: int = 300


class SelfDistillTask(Task):
    """DINO on a TinyCNN backbone; subclasses choose view 2's item (`partners`) and read features (`observe`)."""

    name = "selfsup"

    def __init__(self, data: SSLDataConfig, width: int, spec: DINOSpec, loop: LoopConfig, seed: int,
                 evaluation: SSLEvalConfig) -> None:
        spec.check("dino")
        self.data_cfg, self.width, self.spec, self.loop = data, width, spec, loop
        self.seed, self.eval_cfg = seed, evaluation
        self.history: list[dict[str, float]] = []     # per-epoch loss and teacher entropy
        self._acc: dict[str, Tensor] = {}

    # -- set-up -------------------------------------------------------------------------------------

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        d = self.data_cfg
        kw = {"num_classes": d.num_classes, "num_superclasses": d.num_classes, "image_size": d.image_size}
        self.train = procedural_cifar("train", d.num_train, d.num_test, d.seed, **kw)
        self.test = procedural_cifar("test", d.num_train, d.num_test, d.seed, **kw)
        self.device, self.env = device, env
        self.images = self.train.images.to(device)
        torch.manual_seed(self.seed)            # the nets' initialisation does not depend on the data cache
        backbone = TinyCNN(0, self.width)
        s = self.spec
        student = SelfDistillNet(backbone, DINOHead(backbone.feature_dim, s.out_dim, s.hidden, s.bottleneck))
        if env.enabled:       # BatchNorm statistics over the global batch, like the official SyncBatchNorm
            global_batchnorm(student)
        self.feature_dim = backbone.feature_dim
        total = max(1, self.loop.epochs) * self.steps_per_epoch()
        self.module = DINOModule(student, s, total, env).to(device)
        self._reset_acc()
        return self.module

    def steps_per_epoch(self) -> int:
        return max(len(self.train) // self.loop.batch_size, 1)

    # -- hooks of a method --------------------------------------------------------------------------

    def partners(self, index: Tensor, epoch: int, step: int) -> Tensor:
        """Dataset ids of view 2 for the global batch `index` (plain DINO: the images themselves)."""
        return index

    def observe(self, index: Tensor, feats: Tensor) -> None:
        """L2-normalised teacher backbone features of view 1 of the global batch (after its forward)."""

    # -- training -----------------------------------------------------------------------------------

    def batch(self, epoch: int, step: int, env: DistEnv) -> ViewBatch:
        bs = self.loop.batch_size
        index = stream_batch(len(self.train), bs, epoch * self.steps_per_epoch() + step, self.seed, VIEW_STREAM)
        partner = self.partners(index, epoch, step)
        s, n, size = self.spec, len(index), self.images.shape[-1]
        gscale = tuple(s.global_scale or (0.4, 1.0))
        lscale = tuple(s.local_scale or (0.1, 0.4))
        gen = seeded_generator(self.seed, VIEW_STREAM, epoch, step)
        p1, p2 = view_params(n, gscale, gen), view_params(n, gscale, gen)
        plocal = [view_params(n, lscale, gen) for _ in range(s.num_local)]
        mine = rank_share(torch.arange(n), env)
        i1, i2 = index[mine], partner[mine]
        mean, std = self.train.mean, self.train.std

        def view(ids: Tensor, params: dict[str, Tensor], out: int) -> Tensor:
            return apply_view(self.images[ids.to(self.device)], slice_params(params, mine), out, mean, std)

        return ViewBatch(index=i1, partner=i2, g1=view(i1, p1, size), g2=view(i2, p2, size),
                         locals=[view(i1, p, s.local_size) for p in plocal], epoch=epoch, step=step)

    def forward(self, model: Any, batch: ViewBatch) -> Step:
        out = model(batch)
        env = self.env
        index = batch.index.to(self.device)         # NCCL gathers device tensors only
        self.observe(gather_rows(index, env), gather_rows(out.extras["feat"], env))
        loss = out.losses["dino"].detach().float()
        if env.enabled:
            loss = env.all_reduce_sum(loss) / env.world
        self._acc["loss"] += loss
        self._acc["teacher_entropy"] += out.extras["teacher_entropy"]
        self._acc["steps"] += 1
        return out

    def train_counts(self, out: Step, batch: ViewBatch) -> dict[str, Tensor]:
        one = torch.ones((), device=out.losses["dino"].device)
        moved = (batch.partner != batch.index).sum().to(one.device)
        return {"teacher_entropy": out.extras["teacher_entropy"], "steps": one, "bootstrapped": moved,
                "pairs": one * len(batch.index)}

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        if not counts:
            return {}
        return {"train_teacher_entropy": counts["teacher_entropy"] / max(counts["steps"], 1.0),
                "train_bootstrap_rate": counts["bootstrapped"] / max(counts["pairs"], 1.0)}

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        steps = max(float(self._acc["steps"]), 1.0)
        self.history.append({"loss": float(self._acc["loss"]) / steps,
                             "teacher_entropy": float(self._acc["teacher_entropy"]) / steps})
        self._reset_acc()

    def _reset_acc(self) -> None:
        self._acc = {k: torch.zeros((), device=self.device) for k in ("loss", "teacher_entropy", "steps")}

    # -- evaluation ---------------------------------------------------------------------------------

    def features(self, module: nn.Module, images: Tensor) -> Tensor:
        """Frozen teacher backbone features (what k-NN and the probe read), on the CPU."""
        backbone = module.eval_model().backbone
        prep = lambda v: to_normalized(v.to(self.device), self.train.mean, self.train.std)  # noqa: E731
        return predict(_Features(backbone), images, 500, prep).float().cpu()

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        """k-NN and linear-probe top-1 (%) of `split` with the train split's features as the memory."""
        data = {"test": self.test, "train": self.train}[split]
        f_tr, f_ev = self.features(module, self.train.images), self.features(module, data.images)
        e = self.eval_cfg
        return {
            "knn_top1": knn_accuracy(f_tr, self.train.labels, f_ev, data.labels, e.knn_k, e.knn_temperature,
                                     self.data_cfg.num_classes),
            "linear_top1": linear_probe_accuracy(f_tr, self.train.labels, f_ev, data.labels, e.probe_steps,
                                                 seed=self.seed),
            "feature_std": float(F.normalize(f_ev, dim=1).std(0).mean()),
        }

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {**self.evaluate(module, "test", env, autocast),
                "final_teacher_entropy": last.get("teacher_entropy"), "final_loss": last.get("loss")}

    def describe(self) -> dict[str, Any]:
        d = self.data_cfg
        return {"task": self.name, "backbone": f"tinycnn w{self.width}", "head_out_dim": self.spec.out_dim,
                "data": f"procedural_cifar {d.num_classes} classes {d.image_size}px, {d.num_train} train "
                        f"(labels unused in training), {d.num_test} test"}

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "acc": {k: v.cpu() for k, v in self._acc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self._reset_acc()
        for k, v in state.get("acc", {}).items():
            self._acc[k] = v.to(self.device)


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.features(x)
