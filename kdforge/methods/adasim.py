"""AdaSim: adaptive similarity bootstrapping for self-distillation SSL (Lebailly et al., ICCV 2023).

Plain DINO (`kdforge.tasks.selfsup`) distils an EMA teacher's view of x_i into the student's
other view of x_i. Nearest-neighbour bootstrapping takes the second view from a *neighbour*
x_j instead; naively it hurts negative-free self-distillation, because early neighbours are
often other concepts. AdaSim (official `tileb1/AdaSim`, card p14) bootstraps adaptively:

* a bank F (N x D) of L2-normalised teacher backbone features of view 1; every batch, before
  overwriting F[I], records the top-k (index, cosine) of f_I against F, so the image's own
  *previous* embedding competes with its neighbours;
* at the end of each epoch the epoch's top-k record enters a FIFO window of the last V epochs;
* once V epochs are in the window, for image i: score(j) = Σ_epochs sim_i,e(j) over candidates
  j seen in the window, C = top-k candidates. If C[0] != i the space is not trusted around i
  and x2 = x_i; else j* ~ softmax(score(C) / V / τ_s) and x2 = x_{j*} (j* may be i).
* DINO loss across view 1 of x_i and view 2 of x2 (two global views, no local crops by default).

`mode: dino` is the baseline (same loop, never bootstrap); `mode: naive` always takes the
latest top-1 neighbour other than i (from epoch V on), the card's naive-NN diagnostic arm.

Recipe schema (`configs/methods/adasim.yaml`; `python -m kdforge.tasks.common configs/methods/adasim.yaml`):

    method: adasim
    seed: int
    data: {num_classes, num_train, num_test, image_size, seed}   # procedural_cifar splits
    width: int                                                    # TinyCNN backbone width
    dino: {out_dim, hidden, bottleneck, tau_s, tau_t, center_momentum, teacher_momentum,
           global_scale, local_scale, num_local, local_size}
    loop: {epochs, batch_size, optim, schedule, grad_clip, progress}     # LoopConfig
    adasim: {mode: adasim|dino|naive, topk, window, sampling_temperature}
    eval: {knn_k, knn_temperature, probe_steps}

Unknown keys fail with one line naming the key. Labels are read only by the evaluation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig, load_task_config, predict, prepare_images, seeded_generator
from kdforge.tasks.datafree.model import TinyCNN
from kdforge.tasks.selfsup import (
    DINOHead,
    DINOSpec,
    SelfDistillNet,
    knn_accuracy,
    linear_probe_accuracy,
    train_self_distillation,
)

__all__ = ["AdaSimConfig", "NeighbourBank", "adaptive_partners", "run_adasim", "vote_scores"]

MODES = ("adasim", "dino", "naive")


def vote_scores(hist_nn: Tensor, hist_sim: Tensor, num_items: int, topk: int) -> tuple[Tensor, Tensor]:
    """Sum each candidate's similarity over the window and keep the top-k: (candidates, scores), (B, k).

    `hist_nn`/`hist_sim`: (V, B, k) neighbour ids / similarities of B images over V epochs;
    non-finite similarities mark empty slots. Absent candidates score -inf.
    """
    if hist_nn.shape != hist_sim.shape or hist_nn.dim() != 3:
        raise KdforgeError(f"adasim: history must be (V, B, k) ids and sims, got {tuple(hist_nn.shape)}")
    v, b, k = hist_nn.shape
    ids = hist_nn.permute(1, 0, 2).reshape(b, v * k)
    sims = hist_sim.permute(1, 0, 2).reshape(b, v * k)
    ok = torch.isfinite(sims)
    total = torch.zeros(b, num_items, dtype=sims.dtype).scatter_add_(1, ids, torch.where(ok, sims, 0))
    present = torch.zeros(b, num_items, dtype=torch.bool).scatter_(1, ids, ok)
    for_rank = total.masked_fill(~present, float("-inf"))
    scores, cand = for_rank.topk(min(topk, num_items), dim=1)
    return cand, scores


def adaptive_partners(
    index: Tensor, cand: Tensor, scores: Tensor, window: int, temperature: float, gen: torch.Generator
) -> Tensor:
    """x2's dataset id per image: itself unless it tops its own vote; then softmax(score/V/τ) sampling."""
    if temperature <= 0 or window < 1:
        raise KdforgeError(f"adasim: need sampling temperature > 0 and window >= 1, got {temperature}, {window}")
    trusted = cand[:, 0] == index
    probs = torch.softmax(scores.double() / window / temperature, dim=1)
    probs = torch.nan_to_num(probs, nan=0.0)
    probs[:, 0] = torch.where(probs.sum(1) > 0, probs[:, 0], torch.ones_like(probs[:, 0]))
    pick = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    chosen = cand.gather(1, pick[:, None]).squeeze(1)
    return torch.where(trusted, chosen, index)


class NeighbourBank:
    """Teacher-feature bank, per-epoch top-k records and the FIFO voting window (all resumable tensors)."""

    def __init__(self, num_items: int, dim: int, topk: int = 10, window: int = 5) -> None:
        if num_items < 1 or dim < 1 or topk < 1 or window < 1:
            raise KdforgeError(f"adasim: bank sizes must be >= 1, got N={num_items} D={dim} k={topk} V={window}")
        self.n, self.k, self.window = num_items, min(topk, num_items), window
        self.feats = torch.zeros(num_items, dim)
        self.filled = torch.zeros(num_items, dtype=torch.bool)
        self.cur_nn = torch.arange(num_items)[:, None].repeat(1, self.k)
        self.cur_sim = torch.full((num_items, self.k), float("-inf"))
        self.hist: deque[tuple[Tensor, Tensor]] = deque(maxlen=window)

    @torch.no_grad()
    def update(self, index: Tensor, feats: Tensor) -> None:
        """Record top-k of `feats` (L2-normalised) against the bank *before* writing them in."""
        sims = feats @ self.feats.T
        sims[:, ~self.filled] = float("-inf")
        s, nn_ = sims.topk(self.k, dim=1)
        self.cur_nn[index], self.cur_sim[index] = nn_, s
        self.feats[index] = feats
        self.filled[index] = True

    def end_epoch(self) -> None:
        self.hist.append((self.cur_nn.clone(), self.cur_sim.clone()))

    @property
    def ready(self) -> bool:
        return len(self.hist) == self.window

    def history(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.stack([h[0][index] for h in self.hist]), torch.stack([h[1][index] for h in self.hist]))

    def state_dict(self) -> dict[str, Any]:
        return {"feats": self.feats, "filled": self.filled, "cur_nn": self.cur_nn, "cur_sim": self.cur_sim,
                "hist_nn": [h[0] for h in self.hist], "hist_sim": [h[1] for h in self.hist]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feats, self.filled = state["feats"].clone(), state["filled"].clone()
        self.cur_nn, self.cur_sim = state["cur_nn"].clone(), state["cur_sim"].clone()
        self.hist = deque(zip(state["hist_nn"], state["hist_sim"], strict=True), maxlen=self.window)


# ------------------------------------------------------------------------------------- recipe


@dataclass
class SSLDataConfig:
    num_classes: int = 10
    num_train: int = 1500
    num_test: int = 1000
    image_size: int = 16
    seed: int = 0


@dataclass
class AdaSimArgs:
    mode: str = "adasim"
    topk: int = 10
    window: int = 3
    sampling_temperature: float = 0.001


@dataclass
class SSLEvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_steps: int = 300


@dataclass
class AdaSimConfig:
    method: str = "adasim"
    seed: int = 0
    data: SSLDataConfig = field(default_factory=SSLDataConfig)
    width: int = 16
    dino: DINOSpec = field(default_factory=DINOSpec)
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            epochs=15, batch_size=100, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=0.04),
            schedule=ScheduleConfig(name="cosine", warmup_epochs=1), grad_clip=3.0,
        )
    )
    adasim: AdaSimArgs = field(default_factory=AdaSimArgs)
    eval: SSLEvalConfig = field(default_factory=SSLEvalConfig)

    def check(self) -> None:
        if self.method != "adasim":
            raise ConfigError(f"adasim recipe: method must be 'adasim', got {self.method!r}")
        a = self.adasim
        if a.mode not in MODES:
            raise ConfigError(f"adasim recipe: adasim.mode must be one of {', '.join(MODES)}, got {a.mode!r}")
        if a.topk < 1 or a.window < 1 or a.sampling_temperature <= 0:
            raise ConfigError("adasim recipe: adasim.topk and window must be >= 1, sampling_temperature > 0")
        self.loop.check("adasim recipe: loop")


def run_adasim(cfg: AdaSimConfig) -> dict[str, Any]:
    """Self-distil on the train split (labels unused), then k-NN / linear-probe accuracy on the test split."""
    cfg.check()
    d, a = cfg.data, cfg.adasim
    kw = {"num_classes": d.num_classes, "num_superclasses": d.num_classes, "image_size": d.image_size}
    train = procedural_cifar("train", d.num_train, d.num_test, d.seed, **kw)
    test = procedural_cifar("test", d.num_train, d.num_test, d.seed, **kw)
    torch.manual_seed(cfg.seed)
    backbone = TinyCNN(0, cfg.width)
    s = cfg.dino
    student = SelfDistillNet(backbone, DINOHead(backbone.feature_dim, s.out_dim, s.hidden, s.bottleneck))
    bank = NeighbourBank(d.num_train, backbone.feature_dim, a.topk, a.window)
    gen = seeded_generator(cfg.seed, 5)
    stats = {"pairs": 0.0, "boot": 0.0, "boot_same": 0.0}
    rate_per_epoch: list[float] = []

    def partner(index: Tensor, epoch: int) -> Tensor:
        if a.mode == "dino" or not bank.ready:
            out = index
        elif a.mode == "naive":
            nn_, sim = bank.history(index)
            nn_, sim = nn_[-1], sim[-1].masked_fill(nn_[-1] == index[:, None], float("-inf"))
            out = torch.where(torch.isfinite(sim.max(1).values), nn_.gather(1, sim.argmax(1, keepdim=True))[:, 0],
                              index)
        else:
            cand, scores = vote_scores(*bank.history(index), d.num_train, a.topk)
            out = adaptive_partners(index, cand, scores, a.window, a.sampling_temperature, gen)
        moved = out != index
        stats["pairs"] += len(index)
        stats["boot"] += float(moved.sum())
        stats["boot_same"] += float((moved & (train.labels[out] == train.labels[index])).sum())
        return out

    def epoch_end(epoch: int) -> None:
        bank.end_epoch()
        rate_per_epoch.append(stats["boot"] / max(stats["pairs"], 1.0))
        stats.update(pairs=0.0, boot=0.0)

    totals = {"boot": 0.0, "boot_same": 0.0}

    def count_partner(index: Tensor, epoch: int) -> Tensor:
        before_b, before_s = stats["boot"], stats["boot_same"]
        out = partner(index, epoch)
        totals["boot"] += stats["boot"] - before_b
        totals["boot_same"] += stats["boot_same"] - before_s
        return out

    teacher, history = train_self_distillation(
        student, train.images, train.mean, train.std, s, cfg.loop, cfg.seed, count_partner, bank.update, epoch_end
    )
    prep = lambda v: prepare_images(v, train.mean, train.std)  # noqa: E731
    f_tr = predict(_Feat(teacher), train.images, 500, prep)
    f_te = predict(_Feat(teacher), test.images, 500, prep)
    e = cfg.eval
    return {
        "knn_top1": knn_accuracy(f_tr, train.labels, f_te, test.labels, e.knn_k, e.knn_temperature, d.num_classes),
        "linear_top1": linear_probe_accuracy(f_tr, train.labels, f_te, test.labels, e.probe_steps, seed=cfg.seed),
        "bootstrap_rate_per_epoch": [round(r, 4) for r in rate_per_epoch],
        "neighbour_precision": totals["boot_same"] / totals["boot"] if totals["boot"] else None,
        "feature_std": float(torch.nn.functional.normalize(f_te, dim=1).std(0).mean()),
        "final_teacher_entropy": history[-1]["teacher_entropy"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
    }


class _Feat(torch.nn.Module):
    """Frozen backbone feature of a self-distillation net (what k-NN and the probe read)."""

    def __init__(self, model: SelfDistillNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.backbone.features(x)


class AdaSim:
    """Registry entry: AdaSim runs in the self-distillation loop (`kdforge.tasks.selfsup`)."""

    @classmethod
    def build_module(cls, **_: Any) -> Any:
        raise KdforgeError(
            "adasim runs in the self-supervised self-distillation loop, not the classification Trainer: "
            "python -m kdforge.tasks.common configs/methods/adasim.yaml"
        )

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
        """Run a `configs/methods/adasim.yaml` recipe (see the module docstring)."""
        return run_adasim(load_task_config(AdaSimConfig, tree, name=source))


METHODS.register(
    "adasim",
    AdaSim,
    family="self-supervised",
    paper="Adaptive Similarity Bootstrapping for Self-Distillation based Representation Learning "
    "(Lebailly et al., ICCV 2023)",
    summary="DINO self-distillation whose second view comes from a neighbour only where the voted "
    "similarity says the latent space is trustworthy",
    task="selfsup",
)
