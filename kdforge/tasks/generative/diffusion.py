"""The conditional diffusion model: a `diffusers` UNet2DModel with class embeddings and its DDPM schedule.

Built from a small config with random initialisation (trained here on procedural images), or
loaded from a user's local directory written by `save_pretrained` (`config.json` + weights,
optionally `scheduler_config.json` beside them) through the same `from_pretrained` call. A name
that is not a local directory fails in one line: nothing is ever downloaded.

Class conditioning uses `num_class_embeds = classes + 1`; the last index is the null class of
classifier-free guidance (labels are dropped to it during training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.generative import require_diffusers

__all__ = ["DiffusionModelConfig", "build_scheduler", "build_unet", "check_local_dir", "guided_eps", "load_diffusion",
           "sample", "save_diffusion"]


@dataclass
class DiffusionModelConfig:
    """Sizes of the UNet (random init) and its noise schedule, or `local_dir`: a saved UNet to load instead."""

    channels: list[int] = field(default_factory=lambda: [16, 32])   # block_out_channels, one per resolution
    layers_per_block: int = 1
    attention: bool = False          # self-attention in the coarsest block
    norm_groups: int = 8
    timesteps: int = 200             # T of the DDPM schedule
    beta_schedule: str = "squaredcos_cap_v2"   # any DDPMScheduler beta_schedule
    local_dir: str | None = None     # a directory written by save_pretrained (UNet2DModel with class embeddings)

    def check(self, where: str) -> None:
        if not self.channels or any(c < 1 or c % self.norm_groups for c in self.channels):
            raise ConfigError(f"{where}: channels must be positive multiples of norm_groups ({self.norm_groups}), "
                              f"got {self.channels}")
        if self.layers_per_block < 1 or self.timesteps < 10:
            raise ConfigError(f"{where}: need layers_per_block >= 1 and timesteps >= 10, got "
                              f"{self.layers_per_block}, {self.timesteps}")


def build_unet(cfg: DiffusionModelConfig, size: int, classes: int, in_channels: int = 1) -> nn.Module:
    """A randomly initialised class-conditional UNet2DModel (null class = index `classes`)."""
    diffusers = require_diffusers()
    n = len(cfg.channels)
    down = ["DownBlock2D"] * n
    if cfg.attention:
        down[-1] = "AttnDownBlock2D"
    up = [b.replace("Down", "Up") for b in reversed(down)]
    if size % (2 ** (n - 1)):
        raise ConfigError(f"diffusion: image size {size} is not divisible by 2^{n - 1} ({n} resolutions)")
    return diffusers.UNet2DModel(sample_size=size, in_channels=in_channels, out_channels=in_channels,
                                 block_out_channels=tuple(cfg.channels), down_block_types=tuple(down),
                                 up_block_types=tuple(up), layers_per_block=cfg.layers_per_block,
                                 norm_num_groups=cfg.norm_groups, num_class_embeds=classes + 1)


def build_scheduler(cfg: DiffusionModelConfig) -> Any:
    diffusers = require_diffusers()
    try:
        return diffusers.DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule)
    except NotImplementedError:
        raise ConfigError(f"diffusion.beta_schedule {cfg.beta_schedule!r} is not a DDPMScheduler schedule") from None


def load_diffusion(local_dir: str | Path, cfg: DiffusionModelConfig, size: int, classes: int) -> tuple[nn.Module, Any]:
    """(UNet, scheduler) from a local `save_pretrained` directory; one line when it is not one.

    The scheduler is the directory's `scheduler_config.json` when present, else the recipe's.
    """
    diffusers = require_diffusers()
    path = check_local_dir(local_dir)
    try:
        config = diffusers.UNet2DModel.load_config(str(path), local_files_only=True)
    except Exception as exc:        # noqa: BLE001 (diffusers raises many kinds)
        raise KdforgeError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    if config.get("_class_name") != "UNet2DModel":
        raise KdforgeError(f"diffusion.local_dir {path} holds a {config.get('_class_name')!r}, not a UNet2DModel")
    embeds = config.get("num_class_embeds") or 0
    if embeds < classes + 1 or config.get("sample_size") not in (size, [size, size], (size, size)):
        raise KdforgeError(f"diffusion.local_dir {path}: need a {size} px UNet with >= {classes + 1} class "
                           f"embeddings ({classes} classes + the null class), found sample_size "
                           f"{config.get('sample_size')} and num_class_embeds {embeds}")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:        # noqa: BLE001
        raise KdforgeError(f"cannot load the UNet in {path}: {str(exc).splitlines()[0]}") from None
    if (path / "scheduler_config.json").is_file():
        scheduler = diffusers.DDPMScheduler.from_pretrained(str(path), local_files_only=True)
    else:
        scheduler = build_scheduler(cfg)
    return unet, scheduler


def check_local_dir(local_dir: str | Path) -> Path:
    """`local_dir` as a Path when it holds a saved model's config.json, else one line (nothing downloads)."""
    path = Path(local_dir)
    if not (path / "config.json").is_file():
        raise KdforgeError(f"diffusion.local_dir {str(local_dir)!r} is not a saved UNet directory (no config.json); "
                           "nothing is downloaded: pass a local directory written by save_pretrained")
    return path


def save_diffusion(unet: nn.Module, scheduler: Any, path: str | Path) -> Path:
    """`save_pretrained` of the UNet and its scheduler into one directory (what `load_diffusion` reads)."""
    path = Path(path)
    unet.save_pretrained(str(path))
    scheduler.save_pretrained(str(path))
    return path


def guided_eps(unet: nn.Module, x_t: Tensor, t: Tensor, labels: Tensor, null: int, scale: float) -> Tensor:
    """Classifier-free guided noise prediction eps_u + scale * (eps_c - eps_u) (scale 1: conditional only)."""
    if scale == 1.0:
        return unet(x_t, t, class_labels=labels).sample
    both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                class_labels=torch.cat([torch.full_like(labels, null), labels])).sample
    eps_u, eps_c = both.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def sample(unet: nn.Module, scheduler: Any, labels: Tensor, null: int, scale: float, size: int, seed: int,
           steps: int | None = None, start: Tensor | None = None, start_step: int | None = None) -> Tensor:
    """Ancestral DDPM samples of class `labels` with classifier-free guidance `scale`.

    With `start` (clean images) and `start_step` t0, the images are noised to t0 and denoised
    from there (SDEdit); otherwise sampling starts from pure noise at T.
    """
    import copy

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps or sched.config.num_train_timesteps)
    g = seeded_generator(seed, 4242)
    device = next(unet.parameters()).device
    labels = labels.to(device)
    shape = (len(labels), unet.config.in_channels, size, size)
    x = torch.randn(shape, generator=g).to(device)
    timesteps = sched.timesteps
    if start is not None:
        t0 = int(start_step if start_step is not None else timesteps[0])
        x = sched.add_noise(start.to(device), x, torch.full((len(labels),), t0, dtype=torch.long))
        timesteps = timesteps[timesteps <= t0]
    was = unet.training
    unet.eval()
    for t in timesteps:
        eps = guided_eps(unet, x, t.expand(len(labels)).to(device), labels, null, scale)
        x = sched.step(eps, t, x, generator=g).prev_sample
    unet.train(was)
    return x.clamp(-1, 1)
