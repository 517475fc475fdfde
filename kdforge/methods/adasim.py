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

Training is one stage of the one Trainer (`AdaSimTask`, a `SelfDistillTask`): the module holds
student, EMA teacher (cosine momentum per global step) and DINO centre; the bank, its window
and the bootstrap statistics are task state, so `kdforge train --resume` is exact. The partner
draw of batch k of epoch e uses a generator seeded by (seed, e, k). DDP is exact: every rank
keeps the same bank (teacher features are all-gathered), draws the partners of the global batch
and takes its share; the centre and BatchNorm statistics cover the global batch.

Run: `kdforge train configs/methods/adasim.yaml --out runs/adasim [a.b=value ...]`; continue an
interrupted run with `kdforge train --resume runs/adasim`; two processes with
`torchrun --nproc_per_node=2 -m kdforge.cli train configs/methods/adasim.yaml` (batch divisible by 2).
`run_adasim(cfg, run_dir)` is the Python entry point (the demo's arms). Recipe schema:

    method: adasim
    seed: int
    data: {num_classes, num_train, num_test, image_size, seed}   # procedural_cifar splits
    width: int                                                    # TinyCNN backbone width
    dino: {out_dim, hidden, bottleneck, tau_s, tau_t, center_momentum, teacher_momentum,
           global_scale, local_scale, num_local, local_size}
    loop: {epochs, batch_size, optim, schedule, grad_clip, progress}     # LoopConfig
    adasim: {mode: adasim|dino|naive, topk, window, sampling_temperature}
    eval: {knn_k, knn_temperature, probe_steps}
    trainer: {...}                                                # optional TrainerConfig fields

Unknown keys fail with one line naming the key. Labels are read only by the evaluation
(k-NN / linear probe on the test split, after training) and by the neighbour-precision diagnostic.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, TrainerConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.selfsup import DINOSpec, SelfDistillTask, SSLDataConfig, SSLEvalConfig
from kdforge.train.distributed import DistEnv
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["AdaSimConfig", "AdaSimTask", "NeighbourBank", "adaptive_partners", "run_adasim", "vote_scores"]

PARTNER_STREAM = 5     # seed part of the partner draws

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
class AdaSimArgs:
    mode: str = "adasim"
    topk: int = 10
    window: int = 3
    sampling_temperature: float = 0.001


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
        a = self.adasim
        if a.mode not in MODES:
            raise ConfigError(f"adasim recipe: adasim.mode must be one of {', '.join(MODES)}, got {a.mode!r}")
        if a.topk < 1 or a.window < 1 or a.sampling_temperature <= 0:
            raise ConfigError("adasim recipe: adasim.topk and window must be >= 1, sampling_temperature > 0")
        self.loop.check("adasim recipe: loop")
        self.dino.check("adasim recipe: dino")


# ------------------------------------------------------------------------------------- task


class AdaSimTask(SelfDistillTask):
    """DINO whose view 2 comes from a voted neighbour (`adasim`), never (`dino`) or the last top-1 (`naive`)."""

    name = "adasim"

    def __init__(self, cfg: AdaSimConfig) -> None:
        cfg.check()
        super().__init__(cfg.data, cfg.width, cfg.dino, cfg.loop, cfg.seed, cfg.eval)
        self.args = cfg.adasim
        self.counts = {"pairs": 0, "boot": 0, "boot_same": 0, "boot_total": 0, "boot_same_total": 0}
        self.rate_per_epoch: list[float] = []

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        module = super().build(device, env)
        a = self.args
        self.bank = NeighbourBank(len(self.train), self.feature_dim, a.topk, a.window)
        return module

    def partners(self, index: Tensor, epoch: int, step: int) -> Tensor:
        a, bank = self.args, self.bank
        if a.mode == "dino" or not bank.ready:
            out = index
        elif a.mode == "naive":
            nn_, sim = bank.history(index)
            nn_, sim = nn_[-1], sim[-1].masked_fill(nn_[-1] == index[:, None], float("-inf"))
            top = nn_.gather(1, sim.argmax(1, keepdim=True))[:, 0]
            out = torch.where(torch.isfinite(sim.max(1).values), top, index)
        else:
            cand, scores = vote_scores(*bank.history(index), bank.n, a.topk)
            gen = seeded_generator(self.seed, PARTNER_STREAM, epoch, step)
            out = adaptive_partners(index, cand, scores, a.window, a.sampling_temperature, gen)
        moved = out != index
        same = moved & (self.train.labels[out] == self.train.labels[index])
        boot, boot_same = int(moved.sum()), int(same.sum())
        c = self.counts
        c["pairs"] += len(index)
        c["boot"] += boot
        c["boot_same"] += boot_same
        c["boot_total"] += boot
        c["boot_same_total"] += boot_same
        return out

    def observe(self, index: Tensor, feats: Tensor) -> None:
        self.bank.update(index.cpu(), feats.detach().float().cpu())

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        super().on_epoch_end(module, epoch)
        self.bank.end_epoch()
        c = self.counts
        self.rate_per_epoch.append(c["boot"] / max(c["pairs"], 1))
        c.update(pairs=0, boot=0, boot_same=0)

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        c = self.counts
        out = super().result(module, env, autocast)
        out["bootstrap_rate_per_epoch"] = [round(r, 4) for r in self.rate_per_epoch]
        out["neighbour_precision"] = c["boot_same_total"] / c["boot_total"] if c["boot_total"] else None
        return out

    def describe(self) -> dict[str, Any]:
        a = self.args
        return {**super().describe(), "mode": a.mode, "topk": a.topk, "window": a.window}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": self.bank.state_dict(), "counts": dict(self.counts),
                "rate_per_epoch": list(self.rate_per_epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["bank"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.rate_per_epoch = [float(r) for r in state["rate_per_epoch"]]


# ------------------------------------------------------------------------------------- runners


def run_adasim(cfg: AdaSimConfig, run_dir: str | Path, trainer: TrainerConfig | None = None,
               config_text: str | None = None) -> dict[str, Any]:
    """Self-distil on the train split (labels unused) into `run_dir` (one Trainer stage, resumable),
    then k-NN / linear-probe accuracy on the test split; `{"stopped_at_step": s}` when stopped early."""
    task = AdaSimTask(cfg)
    text = config_text if config_text is not None else yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    stage = run_stage(run_dir, None, loop_settings(cfg.loop, cfg.seed, trainer), task, config_text=text)
    if stage.stopped:
        return {"stopped_at_step": stage.result["stopped_at_step"]}
    return stage.result


class AdaSim:
    """Registry entry: AdaSim trains a `SelfDistillTask` (`kdforge.tasks.selfsup`) through the Trainer."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        """Run a `configs/methods/adasim.yaml` recipe into `run_dir` (see the module docstring)."""
        cfg, trainer, text = parse_recipe(tree, source, AdaSimConfig, method="adasim")
        return run_adasim(cfg, run_dir, trainer, config_text=text)


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
