"""Streaming splits: image data sets too large for memory, decoded per batch by DataLoader workers.

Why the same training semantics hold: augmentation is a function of (seed, epoch, sample index)
and runs batched on the device after loading (`kdforge.data.transforms`), so a worker only has
to decode the uint8 images of the positions it is handed. A streamed batch is therefore
bit-identical to the in-memory `index_select` of the same positions, and the trainer drives both
through one interface: a *batch source* turning this epoch's index chunks into
`(uint8 images, labels, indices)` on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdforge.data.base import ImageTensors
from kdforge.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderStream

Batch3 = tuple[Tensor, Tensor, Tensor]    # uint8 images (B, C, H, W), int64 labels (B,), int64 indices (B,)


class StreamingImages(Dataset):
    """A labelled split read from disk per item, with the attributes of `ImageTensors` but `images`.

    Labels come from the file list (cheap), so they are a tensor like in memory; images are
    decoded on demand (`fetch`, or `loader` in worker processes). Item `i` is
    `(uint8 (C, H, W), label, i)`, `i` being the position in this split (the trainer's index).
    """

    def __init__(self, source: ImageFolderStream, positions: Tensor | None = None, name: str = "image_folder",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.source = source
        self.positions = (torch.arange(len(source)) if positions is None else positions).long().cpu()
        self.labels = torch.tensor(source.targets, dtype=torch.int64)[self.positions]
        self.num_classes = source.num_classes
        self.class_names: list[str] | None = list(source.classes)
        self.name = name
        self.mean, self.std = tuple(mean), tuple(std)
        self.extra: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return int(self.positions.numel())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.source.image_size, self.source.image_size

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        image, label = self.source[int(self.positions[i])]
        return image, label, int(i)

    def subset(self, indices: Tensor) -> StreamingImages:
        """Some samples (e.g. a validation split carved from train), still read from disk."""
        return StreamingImages(self.source, self.positions[torch.as_tensor(indices).long().cpu()], self.name,
                               self.mean, self.std)

    def fetch(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Decode the images at `indices` in this process, as one uint8 (B, C, H, W) batch."""
        index = torch.as_tensor(indices).long().cpu().reshape(-1).tolist()
        if not index:
            return torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return torch.stack([self[i][0] for i in index])

    def loader(self, batches: Iterable[Sequence[int]], workers: int = 0, pin_memory: bool = False,
               persistent: bool = False) -> DataLoader:
        """A DataLoader yielding one `(images, labels, indices)` batch per index chunk of `batches`, in order.

        `batches` is the batch sampler: a list of chunks, or an object whose chunks change between
        iterations (with `persistent`, the workers then outlive one pass over it).
        """
        return DataLoader(self, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                          persistent_workers=persistent and workers > 0)


def image_folder_stream(root: str | Path, split: str | None = None, image_size: int = 32,
                        classes: Sequence[str] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> StreamingImages:
    """`image_folder` without decoding: the same samples, labels and options, images read per batch."""
    return StreamingImages(ImageFolderStream(root, split, image_size, classes), None, "image_folder", mean, std)


# Data sets that can stream (`data.stream=true`), by registered name; same options as the in-memory loader.
STREAMING: dict[str, Callable[..., StreamingImages]] = {"image_folder": image_folder_stream}

Split = ImageTensors | StreamingImages


def fetch_images(split: Split, indices: Tensor) -> Tensor:
    """The uint8 images at `indices` of either kind of split (e.g. the two samples that probe tap shapes)."""
    if isinstance(split, StreamingImages):
        return split.fetch(indices)
    return split.images[indices.to(split.images.device)]


# ------------------------------------------------------------------------------------ batch sources


class TensorBatches:
    """In-memory batch source: the whole uint8 split lives on the device, a batch is an `index_select`."""

    def __init__(self, split: ImageTensors, device: torch.device) -> None:
        self.device = device
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)

    def fetch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        index = index.to(self.device)
        return self.images.index_select(0, index), self.labels.index_select(0, index)

    def epoch(self, order: Tensor, slices: Sequence[slice]) -> Iterator[Batch3]:
        """The batches `order[s]` for each slice `s`, on the device."""
        order = order.to(self.device)
        for s in slices:
            index = order[s]
            images, labels = self.fetch(index)
            yield images, labels, index


class _Chunks:
    """A batch sampler whose chunks are replaced each epoch, so persistent workers serve every epoch."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class LoaderBatches:
    """Streaming batch source: DataLoader workers decode each chunk of the epoch order.

    One loader for the whole run (workers persist across epochs); each epoch sets its index chunks
    (the remaining steps only, for an exact resume) before iterating. Batches are pinned on CUDA
    and moved to the device without blocking.
    """

    def __init__(self, split: StreamingImages, device: torch.device, workers: int) -> None:
        self.split, self.device = split, device
        self.sampler = _Chunks()
        self.loader = split.loader(self.sampler, workers, pin_memory=device.type == "cuda", persistent=True)

    def fetch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        index = index.cpu()
        return self.split.fetch(index).to(self.device), self.split.labels[index].to(self.device)

    def epoch(self, order: Tensor, slices: Sequence[slice]) -> Iterator[Batch3]:
        order = order.cpu()
        self.sampler.chunks = [order[s].tolist() for s in slices]
        for images, labels, index in self.loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                   index.to(self.device, non_blocking=True))


def batch_source(split: Split, device: torch.device, workers: int) -> TensorBatches | LoaderBatches:
    """The batch source that serves `split` (in memory or streamed)."""
    if isinstance(split, StreamingImages):
        return LoaderBatches(split, device, workers)
    return TensorBatches(split, device)
