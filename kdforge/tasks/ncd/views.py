"""Discovery settings and the seeded views of a batch.

A view of sample i in epoch e is a crop/flip hashed from (seed * 16 + view, e, i) by
`kdforge.data.transforms`, so every batch is a pure function of (seed, epoch, step) and a run
stopped at any step resumes to the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdforge.errors import ConfigError
from kdforge.tasks.common import augment_images
from kdforge.tasks.ncd.data import NCDData

__all__ = ["NCDBatch", "NCDSpec", "make_views", "ncd_batch"]


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


@dataclass
class NCDBatch:
    """One training batch: normalised views (V x (N, C, H, W)), labels, labelled mask, data set positions."""

    views: list[Tensor]
    labels: Tensor
    labelled: Tensor
    index: Tensor


def make_views(data: NCDData, idx: Tensor, epoch: int, seed: int, spec: NCDSpec, count: int) -> list[Tensor]:
    """`count` independently seeded crop/flip views of the samples `idx` (view v uses seed * 16 + v)."""
    idx = idx.to(data.images.device)
    return [
        augment_images(
            data.images[idx], idx, epoch, seed * 16 + v, data.mean, data.std, spec.crop_padding, spec.flip
        )
        for v in range(count)
    ]


def ncd_batch(data: NCDData, idx: Tensor, epoch: int, seed: int, spec: NCDSpec, count: int) -> NCDBatch:
    """The views, labels and labelled mask of positions `idx`, on the data's device."""
    idx = idx.to(data.images.device)
    return NCDBatch(make_views(data, idx, epoch, seed, spec, count), data.labels[idx], data.labelled[idx], idx)
