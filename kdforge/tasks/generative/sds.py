"""Score distillation (SDS) from a frozen diffusion model, and SDD's timestep selection (HQS).

SDS: for an image y, noise it to x_t = sqrt(a_t) y + sqrt(1 - a_t) eps, let the frozen model
predict eps_hat (classifier-free guided toward the target class) and use
g = w(t) (eps_hat - eps), w(t) = 1 - a_t, as the gradient of y, skipping the UNet's Jacobian.
`sds_loss(y, g)` = 0.5 ||y - sg(y - g)||^2 has exactly that gradient, so it composes with the
Trainer's ordinary `loss.backward()`. Optional top-k sparsification keeps the k largest |g|
entries of each image (the released config keeps 1024 of a 4x64x64 latent).

HQS (Hybrid Quality Score): for each t of a grid, the gradient d_t of the SDS loss w.r.t. the
images (here: g itself; pixel-space model, nothing between the loss and y); per image the
entropy H_t of the softmax over pixels of its channel-mean (low = focused guidance) and its L1
magnitude N_t; both min-max normalised over the t grid per image; HQS_t = mean over images of
(N_t - H_t). Training then draws t from {t : HQS_t > xi} (`hqs`), the argmax (`hqs_top`), the
whole grid (`all`) or uniformly from [t_min, t_max] (`random`, the released code's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.generative.diffusion import guided_eps

__all__ = ["POLICIES", "HQSResult", "confidence_entropy", "hqs_scores", "hqs_search", "minmax_over_t",
           "sample_timesteps", "sds_gradient", "sds_loss", "select_timesteps", "sparsify_topk"]

POLICIES = ("hqs", "hqs_top", "all", "random")


def sparsify_topk(g: Tensor, k: int) -> Tensor:
    """Keep the k largest |g| entries of each sample (first dim), zero the rest; k <= 0 keeps all."""
    flat = g.flatten(1)
    if k <= 0 or k >= flat.shape[1]:
        return g
    idx = flat.abs().topk(k, dim=1).indices
    return torch.zeros_like(flat).scatter(1, idx, flat.gather(1, idx)).view_as(g)


@torch.no_grad()
def sds_gradient(unet: nn.Module, alphas_cumprod: Tensor, y: Tensor, t: Tensor, noise: Tensor, target: Tensor,
                 null: int, scale: float, topk: int = 0) -> Tensor:
    """g = (1 - a_t) (eps_hat(x_t, t, target) - eps), per sample t; no gradient through the UNet."""
    a = alphas_cumprod.to(y.device)[t].view(-1, *([1] * (y.dim() - 1)))
    x_t = a.sqrt() * y + (1 - a).sqrt() * noise
    eps_hat = guided_eps(unet, x_t, t, target, null, scale)
    return sparsify_topk((1 - a) * (eps_hat - noise), topk)


def sds_loss(y: Tensor, g: Tensor) -> Tensor:
    """0.5 * ||y - sg(y - g)||^2 summed: its gradient w.r.t. y is exactly g (the SDS surrogate)."""
    return 0.5 * (y - (y - g).detach()).pow(2).sum()


def confidence_entropy(grad: Tensor) -> Tensor:
    """(N,) entropy of the softmax over pixels of each image's channel-mean gradient (N, C, H, W)."""
    logp = torch.log_softmax(grad.mean(1).flatten(1), dim=1)
    return -(logp.exp() * logp).sum(1)


def minmax_over_t(v: Tensor) -> Tensor:
    """Min-max normalise (T, N) values over the t axis, per image (a flat curve becomes 0)."""
    lo, hi = v.min(0, keepdim=True).values, v.max(0, keepdim=True).values
    return (v - lo) / (hi - lo).clamp_min(1e-12)


def hqs_scores(grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(HQS (T,), entropy H (T, N), magnitude N (T, N)) from the gradients (T, N, C, H, W) over a t grid."""
    ent = torch.stack([confidence_entropy(d) for d in grads])
    mag = grads.abs().flatten(2).sum(2)
    return (minmax_over_t(mag) - minmax_over_t(ent)).mean(1), ent, mag


@dataclass
class HQSResult:
    grid: list[int]
    hqs: list[float]
    entropy: list[float]             # mean over images, per t
    magnitude: list[float]


@torch.no_grad()
def hqs_search(unet: nn.Module, alphas_cumprod: Tensor, images: Tensor, target: int, null: int, scale: float,
               grid: list[int], seed: int, batch: int = 64) -> HQSResult:
    """HQS over `grid` for editing `images` toward class `target` (seeded noise, one draw per image and t)."""
    g = seeded_generator(seed, 5150)
    grads = []
    for t in grid:
        noise = torch.randn(images.shape, generator=g).to(images.device)
        parts = []
        for s in range(0, len(images), batch):
            y = images[s:s + batch]
            tt = torch.full((len(y),), t, dtype=torch.long, device=y.device)
            lab = torch.full((len(y),), target, dtype=torch.long, device=y.device)
            parts.append(sds_gradient(unet, alphas_cumprod, y, tt, noise[s:s + batch], lab, null, scale))
        grads.append(torch.cat(parts).cpu())
    hqs, ent, mag = hqs_scores(torch.stack(grads))
    return HQSResult(list(grid), hqs.tolist(), ent.mean(1).tolist(), mag.mean(1).tolist())


def select_timesteps(policy: str, grid: list[int], hqs: list[float] | None, xi: float,
                     t_range: tuple[int, int]) -> list[int]:
    """The timesteps training draws from under `policy` (hqs falls back to the argmax if none passes xi)."""
    if policy == "random":
        return list(range(t_range[0], t_range[1] + 1))
    if policy == "all":
        return list(grid)
    if policy not in POLICIES:
        raise ConfigError(f"sdd.timesteps must be one of {', '.join(POLICIES)}, got {policy!r}")
    if hqs is None:
        raise ConfigError(f"sdd.timesteps {policy} needs the HQS search")
    best = max(range(len(grid)), key=lambda i: hqs[i])
    if policy == "hqs_top":
        return [grid[best]]
    chosen = [t for t, h in zip(grid, hqs) if h > xi]
    return chosen or [grid[best]]


def sample_timesteps(candidates: list[int], n: int, generator: torch.Generator) -> Tensor:
    """n timesteps drawn uniformly from `candidates`."""
    pool = torch.tensor(candidates, dtype=torch.long)
    return pool[torch.randint(len(pool), (n,), generator=generator)]
