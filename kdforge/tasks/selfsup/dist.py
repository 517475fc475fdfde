"""What makes self-distillation exact under DDP: every cross-sample statistic sees the global batch.

DINO couples the samples of a batch three ways: the teacher centre (a batch mean), BatchNorm's
batch statistics and, in AdaSim, the neighbour bank. The official code all-reduces the centre,
all-gathers the bank's features and converts BatchNorm to SyncBatchNorm; torch's SyncBatchNorm
needs a GPU, so `GlobalBatchNorm2d` does the same over any process group (gloo included), with a
differentiable all-reduce: DDP's gradient average then equals the one-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdforge.train.distributed import DistEnv

__all__ = ["GlobalBatchNorm2d", "gather_rows", "global_batchnorm"]


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
