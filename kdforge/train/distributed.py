"""Distributed data parallel set-up for `torchrun --nproc_per_node=N kdforge train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we then join a process group (NCCL on GPU,
gloo on CPU). `data.batch_size` stays the *global* batch: each rank takes its contiguous
share of every global batch, so N processes see exactly the samples one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
