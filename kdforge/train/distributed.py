"""Distributed data parallel set-up for `torchrun --nproc_per_node=N kdforge train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we then join a process group (NCCL on GPU,
gloo on CPU). `data.batch_size` stays the *global* batch: each rank takes its contiguous
share of every global batch, so N processes see exactly the samples one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdforge.errors import KdforgeError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def dist_env_from_environment() -> DistEnv:
    """Read torchrun's variables; join the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world=world, local_rank=local_rank)


def device_for(env: DistEnv, requested: str) -> str:
    """Each rank uses its own GPU (cuda:LOCAL_RANK) when running distributed on CUDA."""
    if env.enabled and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{env.local_rank}"
    return requested


def local_batch(global_batch: int, env: DistEnv) -> int:
    if global_batch % env.world:
        raise KdforgeError(f"data.batch_size={global_batch} must be divisible by the {env.world} processes")
    return global_batch // env.world


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group: after a barrier when every rank finished (`clean`), else at once.

    Without this, a rank that exits while its peer still tears down gloo's connections can die
    with SIGABRT at interpreter exit. After a failure the barrier is skipped: the other ranks may
    never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# -- cross-rank statistics for losses and layers that couple the samples of a batch --------------
# (DINO's centre, a neighbour bank, InfoNCE negatives, batch norm): each sees the global batch, so
# DDP's gradient average equals the one-process gradient. torch's SyncBatchNorm needs a GPU;
# GlobalBatchNorm2d does the same over any process group (gloo included).


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns the sum over ranks of the gradient of the own rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)          # all_reduce, not reduce_scatter: gloo has no reduce_scatter
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's `x` concatenated in rank order (dim 0), differentiable; `x` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_rows(x: Tensor, env: DistEnv) -> Tensor:
    """Concatenate every rank's rows in rank order (= the global batch order of `rank_share`); no gradient."""
    if not env.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def _sum_all(x: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all ranks (any backend)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = _sum_all(torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device).detach())
        mean = _sum_all(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean.view(1, c, 1, 1)
        var = _sum_all(centred.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of `module` (in place) by a GlobalBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values())).device)
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module
