"""Data parallelism through torchrun: one process per device, NCCL between GPUs, gloo between CPUs.

A plain model is made data-parallel by two small functions, `apply_ddp` and `apply_global_batchnorm`;
nothing in the model knows. Every rank reads a disjoint share of each global batch (see
`pipelines.order`) and draws the mask rows a single process would draw for those samples, so a run on
W ranks of batch B follows a one-process run of batch W*B step for step.
"""
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from supmae.core.errors import SupmaeError

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: dist.ProcessGroup | None = None  # a gloo group for host-side agreement (stop requests), even NCCL's

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """torchrun's environment -> (World, this rank's device). A lone process is a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SupmaeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torchrun restarts a failed job's workers against the same agent store, where the ranks' addresses from
        # the attempt before are still published: a restarted rank could connect to a dead one's. Each attempt
        # gets keys of its own.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=dist.PrefixStore(f"supmae/attempt-{attempt}", store),
                                device_id=device if device.type == "cuda" else None)
    control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    assert isinstance(control, dist.ProcessGroup)
    return World(rank, world_size, local_rank, control), device


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is true on any: a host-side collective that never waits on the GPU."""
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=world.control)
    return bool(value.item())


def mean_over_ranks(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= world.world_size
    return tensor


def earliest_over_ranks(step: torch.Tensor, world: World) -> int | None:
    """The smallest non-negative value of a 0-d step tensor (-1: none on this rank) across ranks; None if
    no rank has one."""
    none = torch.iinfo(step.dtype).max
    step = torch.where(step < 0, none, step).view(1)
    if world.distributed:
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
    return None if int(step) == none else int(step)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier(group=world.control)


def apply_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    # The only buffers are the classification head's BatchNorm statistics, which training never reads:
    # broadcasting them every step would cost a collective for nothing (--sync-bn keeps them equal anyway).
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) whose gradient is the all-reduced gradient: every rank's loss reaches every input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch: statistics are summed across ranks with autograd-aware
    all-reduces, so forward and gradients are those of one process holding every rank's samples.
    Unlike nn.SyncBatchNorm it runs on CPUs (gloo) as well as GPUs, and it keeps BatchNorm1d's
    parameter names, so checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dtype, x = x.dtype, x.float()
        count = torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device) * dist.get_world_size()
        mean = _SumOverRanks.apply(x.sum(0)) / count
        centred = x - mean
        var = _SumOverRanks.apply((centred ** 2).sum(0)) / count  # two passes, as BatchNorm computes it
        if self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # BatchNorm's: an exponential average, or a cumulative one where momentum is None
                factor = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1), factor)
        return (centred * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(dtype)


def apply_global_batchnorm(model: M) -> M:
    """Swap every BatchNorm1d (the classification head's) for GlobalBatchNorm1d, sharing its tensors."""
    for module in model.modules():
        if type(module) is nn.BatchNorm1d:
            module.__class__ = GlobalBatchNorm1d
    return model
