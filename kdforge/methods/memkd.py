"""MemKD (Gu et al., ICCV 2023): memory-guided KD for unsupervised anomaly detection, on RD.

A teacher-student detector suffers "normality forgetting": the student generalises so well that it
reconstructs anomalous features too. MemKD gives the student a Normality Recall memory per scale
(`NRMemory`: learnable keys K and values V, L = 50 slots): every student feature S^l queries the
keys by cosine attention, the recalled value mix is concatenated with S^l and fused by a 1x1
conv, and the fused map is both the student's output at that scale and the input of the next
decoder block. Normality embedding learning trains the memories on the teacher's features of N
normal exemplars drawn from the training set (`sample_exemplars`):

    L = L_KD + lambda1 * sum_l L_NM(F_T^l(x_e), V^l) + lambda2 * sum_l L_orth(K^l, V^l)

(`kdforge.losses.memkd`). Memory at test time: queried by the student features as in training.

Recipe (`configs/methods/memkd.yaml`; `kdforge train configs/methods/memkd.yaml --out runs/memkd`):
the `rd` schema (`kdforge.methods.rd`: data, teacher, model, train, score, seed) plus
`memkd: {slots, lambda1, lambda2, exemplars, temperature}`. `configs/anomaly/rd.yaml` is the
baseline at the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.memkd import memorisation_loss, orthogonality_loss, recall
from kdforge.methods.rd import RDRecipe, run_anomaly
from kdforge.registry import METHODS
from kdforge.tasks.anomaly.models import OneClassBottleneck, ReverseDecoder
from kdforge.tasks.anomaly.task import AnomalyBatch, RDModule, normalise
from kdforge.tasks.base import seeded_generator
from kdforge.train.stages import parse_recipe

__all__ = ["MemKDArgs", "MemKDModule", "MemKDRecipe", "MemoryFusion", "NRMemory", "sample_exemplars"]


@dataclass
class MemKDArgs:
    slots: int = 50                  # L, the card's best
    lambda1: float = 1.0             # normality memorisation weight (unverified: configurable)
    lambda2: float = 1.0             # key/value orthogonality weight (unverified: configurable)
    exemplars: int = 16              # N normal exemplar images from the training set
    temperature: float = 1.0         # cosine-attention softmax temperature (card: plain softmax of cos)


@dataclass
class MemKDRecipe(RDRecipe):
    method: str = "memkd"
    memkd: MemKDArgs = field(default_factory=MemKDArgs)


class NRMemory(nn.Module):
    """Normality Recall memory of one scale: keys K and values V, (L, C) learnable parameters."""

    def __init__(self, channels: int, slots: int = 50, temperature: float = 1.0) -> None:
        super().__init__()
        if channels < 1 or slots < 1:
            raise KdforgeError(f"NRMemory needs channels >= 1 and slots >= 1, got {channels}, {slots}")
        self.keys = nn.Parameter(torch.randn(slots, channels))
        self.values = nn.Parameter(torch.randn(slots, channels))
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return recall(x, self.keys, self.values, self.temperature)


class MemoryFusion(nn.Module):
    """The decoder adapter of one scale: concat[S, recall(S)] -> 1x1 conv -> the student's feature."""

    def __init__(self, channels: int, slots: int = 50, temperature: float = 1.0) -> None:
        super().__init__()
        self.memory = NRMemory(channels, slots, temperature)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, s: Tensor) -> Tensor:
        return self.fuse(torch.cat([s, self.memory(s)], 1))


def sample_exemplars(labels: Tensor, count: int, seed: int) -> Tensor:
    """`count` distinct training positions (seeded), all of them normal images (label 0)."""
    normal = (labels == 0).nonzero().flatten()
    if len(normal) == 0:
        raise KdforgeError("memkd: the training set holds no normal image to draw exemplars from")
    if count < 1:
        raise ConfigError(f"memkd.exemplars must be >= 1, got {count}")
    pick = torch.randperm(len(normal), generator=seeded_generator(seed, 23))[:count]
    return normal[pick].sort().values


class MemKDModule(RDModule):
    """RD with an NR memory fused at every decoder scale and the normality-embedding losses."""

    def __init__(self, teacher: nn.Module, bottleneck: nn.Module, decoder: ReverseDecoder, exemplars: Tensor,
                 args: MemKDArgs) -> None:
        super().__init__(teacher, bottleneck, decoder)
        self.args = args
        self.exemplar_images = exemplars          # uint8 normal training images (not trained, not saved)
        self._exemplar_feats: list[Tensor] | None = None

    def memories(self) -> list[NRMemory]:
        """The per-scale memories, finest scale first (aligned with the teacher's taps)."""
        return [a.memory for a in reversed(self.student["decoder"].adapters)]

    def exemplar_features(self, device: torch.device) -> list[Tensor]:
        """The frozen teacher's features of the exemplars, computed once (the teacher never changes)."""
        if self._exemplar_feats is None or self._exemplar_feats[0].device != device:
            self._exemplar_feats = self.teachers["teacher"](normalise(self.exemplar_images).to(device))
        return self._exemplar_feats

    def extra_losses(self, batch: AnomalyBatch, teacher: list[Tensor], student: list[Tensor]) -> dict[str, Tensor]:
        a = self.args
        feats = self.exemplar_features(batch.images.device)
        memories = self.memories()
        out: dict[str, Tensor] = {}
        if a.lambda1:
            out["nm"] = a.lambda1 * sum(memorisation_loss(f, m.values, m.temperature) for f, m in zip(feats, memories))
        if a.lambda2:
            out["orth"] = a.lambda2 * sum(orthogonality_loss(m.keys, m.values) for m in memories)
        return out


def memkd_module(cfg: MemKDRecipe, shapes: list[tuple[int, int]], teacher: nn.Module, train: Any) -> MemKDModule:
    a = cfg.memkd
    adapters = [MemoryFusion(c, a.slots, a.temperature) for c, _ in shapes]
    index = sample_exemplars(train.labels, a.exemplars, cfg.seed)
    return MemKDModule(teacher, OneClassBottleneck(shapes, cfg.model.embed),
                       ReverseDecoder(shapes, cfg.model.embed, adapters), train.images[index], a)


def check_args(a: MemKDArgs, source: str) -> None:
    if a.slots < 1 or a.exemplars < 1:
        raise ConfigError(f"{source}: memkd.slots and memkd.exemplars must be >= 1, got {a.slots}, {a.exemplars}")
    if a.lambda1 < 0 or a.lambda2 < 0:
        raise ConfigError(f"{source}: memkd.lambda1 and memkd.lambda2 must be >= 0, got {a.lambda1}, {a.lambda2}")
    if a.temperature <= 0:
        raise ConfigError(f"{source}: memkd.temperature must be > 0, got {a.temperature}")


class MemKD:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, MemKDRecipe, method="memkd")
        cfg.check(source)
        check_args(cfg.memkd, source)
        return run_anomaly(cfg, run_dir, trainer, text, build=memkd_module)


METHODS.register(
    "memkd", MemKD, family="anomaly",
    paper="Remembering Normality: Memory-guided Knowledge Distillation for Unsupervised Anomaly Detection "
          "(ICCV 2023)",
    summary="RD student with a key-value Normality Recall memory fused at every scale, trained on normal "
            "exemplars (memorisation loss) with key/value orthogonality", task="anomaly")
