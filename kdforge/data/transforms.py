"""Batched tensor augmentation that runs on the batch's device and is reproducible per sample.

Why counter-based: the crop/flip of a sample is a pure function of (seed, epoch, sample index),
computed by integer hashing instead of a stateful RNG. A view therefore does not depend on batch
size, shuffling, the number of workers or the device, and any augmented view (e.g. the one a
teacher saw) can be rebuilt later from its parameters with `apply_crop_flip`.

The hash keeps every intermediate below 2**63 (32-bit state, multipliers below 2**31), so the
same code gives bit-identical results on Python ints and on int64 tensors on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError

_MASK32 = 0xFFFFFFFF
STREAM_DX, STREAM_DY, STREAM_FLIP = 1, 2, 3


def _mix32(x: Any) -> Any:
    """A 32-bit avalanche mix (Prospector-style) on a Python int or an int64 tensor in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def hash_u32(indices: Tensor, seed: int, epoch: int, stream: int) -> Tensor:
    """Uniform 32-bit hashes of (stream, seed, epoch, index) as int64 values in [0, 2**32)."""
    h = _mix32((int(stream) * 0x9E3779B9) & _MASK32)
    for word in (int(seed) & _MASK32, (int(seed) >> 32) & _MASK32, int(epoch) & _MASK32):
        h = _mix32(h ^ word)
    idx = indices.to(torch.int64)
    h = _mix32(torch.bitwise_xor(idx & _MASK32, h))
    return _mix32(h ^ ((idx >> 32) & _MASK32))


def _as_index_tensor(indices: Tensor | Sequence[int], device: torch.device) -> Tensor:
    idx = torch.as_tensor(indices, dtype=torch.int64, device=device)
    if idx.dim() != 1:
        raise KdforgeError(f"augmentation indices must be 1-D, got shape {tuple(idx.shape)}")
    return idx


def crop_flip_params(indices: Tensor | Sequence[int], epoch: int, seed: int, padding: int = 4,
                     flip: bool = True, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Per-sample crop offsets and flips for (seed, epoch, index).

    `dx`/`dy` are the top-left corner of the crop in the zero-padded image, in [0, 2*padding]
    (a shift of `dx - padding` pixels); `flip` is a bool per sample (horizontal mirror).
    """
    if padding < 0:
        raise KdforgeError(f"padding must be >= 0, got {padding}")
    if device is None:
        device = indices.device if isinstance(indices, Tensor) else torch.device("cpu")
    idx = _as_index_tensor(indices, torch.device(device))
    span = 2 * padding + 1
    dx = hash_u32(idx, seed, epoch, STREAM_DX) % span
    dy = hash_u32(idx, seed, epoch, STREAM_DY) % span
    if flip:
        flips = ((hash_u32(idx, seed, epoch, STREAM_FLIP) >> 16) & 1) == 1
    else:
        flips = torch.zeros_like(idx, dtype=torch.bool)
    return {"dx": dx, "dy": dy, "flip": flips}


def apply_crop_flip(images: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Zero-pad by `padding`, crop back to the input size at (dy, dx), then mirror where `flip`.

    Vectorised: one pad and one advanced-indexing gather for the whole batch; keeps the dtype.
    """
    if images.dim() != 4:
        raise KdforgeError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    dev = images.device
    dx, dy, flip = dx.to(dev).long(), dy.to(dev).long(), flip.to(dev).bool()
    if not (dx.shape == dy.shape == flip.shape == (n,)):
        raise KdforgeError(f"crop params must have shape ({n},), got {tuple(dx.shape)}, "
                           f"{tuple(dy.shape)}, {tuple(flip.shape)}")
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    hp, wp = h + 2 * padding, w + 2 * padding
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h                                           # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
    # one gather over each flattened padded image is ~20x faster than 4-D advanced indexing
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, hp * wp).gather(2, flat_index).reshape(n, c, h, w)


def to_float(images: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; floating input is returned unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images
    raise KdforgeError(f"to_float expects uint8 or floating images, got {images.dtype}")


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
              inplace: bool = False) -> Tensor:
    """Per-channel (x - mean) / std for (N, C, H, W) float images in [0, 1] units.

    `inplace=True` overwrites `images` (for fresh tensors in the input pipeline: saves two copies).
    """
    c = images.shape[1]
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    if m.shape[1] != c or s.shape[1] != c:
        raise KdforgeError(f"normalize: {c} channels but mean/std of length {m.shape[1]}/{s.shape[1]}")
    if inplace:
        return images.sub_(m).div_(s)
    return (images - m) / s


def to_normalized(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 [0, 255] -> (x / 255 - mean) / std in one fused pass (x * a - b) over a fresh float tensor.

    The input pipeline's hot path: one conversion and two in-place ops instead of three
    full-size temporaries. Floating input is normalized as `normalize` does.
    """
    if images.dtype != torch.uint8:
        return normalize(to_float(images), mean, std)
    c = images.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    if m.shape[1] != c or s.shape[1] != c:
        raise KdforgeError(f"normalize: {c} channels but mean/std of length {m.shape[1]}/{s.shape[1]}")
    return images.to(torch.float32).mul_(1.0 / (255.0 * s)).sub_(m / s)


def random_crop_flip(images_uint8: Tensor, indices: Tensor | Sequence[int], epoch: int, seed: int,
                     padding: int = 4, flip: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """CIFAR-style pad-crop + horizontal flip of a batch; returns float [0, 1] views and params.

    `indices` are the samples' positions in the data set (not in the batch), so a sample's view
    depends only on (seed, epoch, index).
    """
    params = crop_flip_params(indices, epoch, seed, padding, flip, device=images_uint8.device)
    if params["dx"].shape[0] != images_uint8.shape[0]:
        raise KdforgeError(f"{images_uint8.shape[0]} images but {params['dx'].shape[0]} indices")
    out = apply_crop_flip(images_uint8, params["dx"], params["dy"], params["flip"], padding)
    return to_float(out), params


@dataclass(frozen=True)
class CropFlip:
    """Configured crop/flip augmentation: `CropFlip(seed=1)(images, indices, epoch)`."""

    padding: int = 4
    flip: bool = True
    seed: int = 0

    def params(self, indices: Tensor | Sequence[int], epoch: int) -> dict[str, Tensor]:
        return crop_flip_params(indices, epoch, self.seed, self.padding, self.flip)

    def __call__(self, images: Tensor, indices: Tensor | Sequence[int], epoch: int) -> Tensor:
        return random_crop_flip(images, indices, epoch, self.seed, self.padding, self.flip)[0]
