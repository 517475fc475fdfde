"""Novel class discovery data: labelled known classes plus unlabelled novel classes.

`ncd_split` turns any labelled `ImageTensors` split into an `NCDData`: the chosen known
classes are relabelled 0..K-1 and carry labels during training, the novel classes are
relabelled K..K+U-1 and their labels are only used for evaluation (clustering accuracy).

`procedural_ncd` builds the card's setting from the procedural CIFAR generator: `pairs`
superclasses with two fine classes each (the same pattern family and palette, small
orientation/frequency/tint/marker differences). One class of each pair is known, its partner
is novel, so a novel sample's relation to the known classes (which known class it resembles)
is meaningful, as for "palm tree -> maple, forest" in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kdforge.data.base import ImageTensors
from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import KdforgeError

__all__ = ["NCDData", "ncd_split", "procedural_ncd"]


@dataclass
class NCDData:
    """Images (uint8), remapped labels (known 0..K-1, novel K..K+U-1) and the labelled mask."""

    images: Tensor
    labels: Tensor
    labelled: Tensor
    num_known: int
    num_novel: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    known_classes: list[int]
    novel_classes: list[int]
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def novel(self) -> Tensor:
        """Bool mask of the novel-class samples."""
        return self.labels >= self.num_known

    def to(self, device: torch.device | str) -> NCDData:
        """The same split with its tensors on `device` (a task keeps its data where it trains)."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device),
                       labelled=self.labelled.to(device))

    def subset(self, indices: Tensor) -> NCDData:
        return NCDData(
            self.images[indices],
            self.labels[indices],
            self.labelled[indices],
            self.num_known,
            self.num_novel,
            self.mean,
            self.std,
            self.known_classes,
            self.novel_classes,
            self.name,
        )


def ncd_split(data: ImageTensors, known: Sequence[int], novel: Sequence[int]) -> NCDData:
    """Keep the samples of `known` and `novel` classes; relabel known first, then novel, in that order."""
    known, novel = [int(c) for c in known], [int(c) for c in novel]
    if not known or not novel:
        raise KdforgeError("ncd_split: need at least one known and one novel class")
    if len(set(known + novel)) != len(known) + len(novel):
        raise KdforgeError(f"ncd_split: known {known} and novel {novel} classes must be distinct")
    bad = [c for c in known + novel if not 0 <= c < data.num_classes]
    if bad:
        raise KdforgeError(f"ncd_split: classes {bad} are not in 0..{data.num_classes - 1}")
    mapping = torch.full((data.num_classes,), -1, dtype=torch.long)
    mapping[torch.tensor(known + novel)] = torch.arange(len(known) + len(novel))
    new = mapping[data.labels]
    keep = (new >= 0).nonzero().flatten()
    labels = new[keep]
    return NCDData(
        data.images[keep],
        labels,
        labels < len(known),
        len(known),
        len(novel),
        tuple(data.mean),
        tuple(data.std),
        known,
        novel,
        data.name,
    )


def procedural_ncd(
    split: str = "train",
    pairs: int = 10,
    num_train: int = 2000,
    num_test: int = 1000,
    image_size: int = 16,
    seed: int = 0,
) -> NCDData:
    """Procedural CIFAR, `pairs` superclasses x 2 fine classes: first of each pair known, the other novel."""
    if pairs < 2:
        raise KdforgeError(f"procedural_ncd: pairs must be >= 2, got {pairs}")
    data = procedural_cifar(
        split,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        num_classes=2 * pairs,
        num_superclasses=pairs,
        image_size=image_size,
    )
    out = ncd_split(data, known=list(range(0, 2 * pairs, 2)), novel=list(range(1, 2 * pairs, 2)))
    out.name = f"procedural_ncd({pairs} pairs)"
    return out
