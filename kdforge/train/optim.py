"""Optimizers and per-step learning-rate schedules built from the run config.

Schedules are functions of the global step (warm-up in fractional epochs, then multistep or
cosine), so resuming at any step reproduces the learning rate exactly.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import nn

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError


def param_groups(cfg: OptimConfig, named: Iterable[tuple[str, nn.Parameter]]) -> list[nn.Parameter] | list[dict]:
    """The optimizer's parameter groups: `optim.groups` (first matching pattern wins), then `no_decay_1d`.

    Without groups and `no_decay_1d` it is the plain parameter list (one group, as before). A pattern
    that matches no trainable parameter is a config error (a typo would otherwise be silently ignored).
    """
    named = list(named)
    if not cfg.groups and not cfg.no_decay_1d:
        return [p for _, p in named]
    for gi, group in enumerate(cfg.groups):
        if not group.params or group.lr_scale < 0 or (group.weight_decay is not None and group.weight_decay < 0):
            raise ConfigError(f"optim.groups.{gi}: needs params (name patterns), lr_scale >= 0 and weight_decay >= 0")
        for pat in group.params:
            if not any(fnmatch.fnmatchcase(name, pat) for name, _ in named):
                example = f" (names look like {named[0][0]!r})" if named else ""
                raise ConfigError(f"optim.groups.{gi}.params: pattern {pat!r} matches no trainable parameter{example}")
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named:
        scale, decay = 1.0, cfg.weight_decay
        if cfg.no_decay_1d and p.ndim < 2:
            decay = 0.0
        for group in cfg.groups:
            if any(fnmatch.fnmatchcase(name, pat) for pat in group.params):
                scale = group.lr_scale
                decay = decay if group.weight_decay is None else group.weight_decay
                break
        buckets.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * scale, "weight_decay": decay} for (scale, decay), ps in buckets.items()]


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer:
    """SGD, AdamW or DOT (which takes task and distill losses separately); `params` may be groups."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        if len(cfg.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {cfg.betas}")
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "dot":
        from kdforge.methods.dot import DOT

        return DOT(params, lr=cfg.lr, momentum=cfg.momentum, delta=cfg.delta, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim.name must be sgd, adamw or dot, not '{cfg.name}'")


def wants_loss_groups(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers with `step_losses(task, distill)` (DOT) get the two groups separately."""
    return callable(getattr(optimizer, "step_losses", None))


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr at global `step` (0-based, before the step's update)."""
    epoch_pos = step / max(1, steps_per_epoch)          # fractional epoch
    warm = cfg.warmup_epochs
    if warm > 0 and epoch_pos < warm:
        return (step + 1) / (warm * steps_per_epoch)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "multistep":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    if cfg.name == "cosine":
        total = max(1e-9, epochs - warm)
        progress = min(1.0, max(0.0, (epoch_pos - warm) / total))
        floor = cfg.min_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule.name must be multistep, cosine or constant, not '{cfg.name}'")


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
