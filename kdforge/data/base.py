"""In-memory image data: one uint8 tensor per split, so batches are tensor slices."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdforge.errors import KdforgeError


@dataclass
class ImageTensors:
    """A labelled image split held as `images` uint8 (N, C, H, W) and `labels` int64 (N,).

    `mean`/`std` are per-channel statistics in [0, 1] units used for normalisation;
    `extra` holds optional per-sample side labels (e.g. `coarse` superclass ids).
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str = ""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    class_names: list[str] | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise KdforgeError(f"data set '{self.name}': images must be uint8 (N, C, H, W), got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise KdforgeError(f"data set '{self.name}': {self.images.shape[0]} images but labels of "
                               f"shape {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Tensor) -> ImageTensors:
        """A view of some samples (e.g. a validation split carved from train)."""
        return ImageTensors(self.images[indices], self.labels[indices], self.num_classes, self.name,
                            self.mean, self.std, self.class_names,
                            {k: v[indices] for k, v in self.extra.items()})
