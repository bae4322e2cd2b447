"""Data parallelism through torchrun: one process per device, NCCL between GPUs, gloo between CPUs.

A plain model is made data-parallel by two small functions, `apply_ddp` and `apply_batchnorm_groups`;
nothing in the model knows. Every rank reads its rows of each global batch (`pipelines.split`) and draws
the mask rows a single process would draw for those samples, so a run on W ranks of batch B follows a
one-process run of batch W*B (or of B in W micro-batches) step for step.
"""
import os
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
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
    """all_reduce(sum) over `group` whose gradient is the all-reduced gradient: every rank's loss reaches every
    input. A functional collective, which torch.compile traces into the step's graph."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return functional_collectives.all_reduce(tensor, "sum", group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return functional_collectives.all_reduce(grad.contiguous(), "sum", ctx.group), None


class GroupBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over fixed groups of the global batch, however it is split: a micro-batch holds `ghosts`
    contiguous groups (ghost batches), or a group is the micro-batches of the ranks in `ranks`, whose statistics
    are summed with autograd-aware all-reduces, so forward and gradients are those of one process holding the
    group. Unlike nn.SyncBatchNorm it runs on CPUs (gloo) as well as GPUs, and it keeps BatchNorm1d's parameter
    names, so checkpoints are unchanged. The running statistics, which training never reads, take the mean of
    the groups' statistics once per forward."""
    group_size: int      # images per group
    ghosts: int = 1      # groups per micro-batch
    ranks: dist.ProcessGroup | None = None  # the ranks whose micro-batches make one group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dtype, groups = x.dtype, x.float().unflatten(0, (self.ghosts, -1))  # (ghosts, images, features)

        def total(t: torch.Tensor) -> torch.Tensor:
            return t if self.ranks is None else _SumOverRanks.apply(t, self.ranks)

        count = self.group_size
        mean = total(groups.sum(1)) / count
        centred = groups - mean.unsqueeze(1)
        var = total((centred ** 2).sum(1)) / count  # two passes, as BatchNorm computes it
        if self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # BatchNorm's: an exponential average, or a cumulative one where momentum is None
                factor = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.mean(0), factor)
                self.running_var.lerp_(var.mean(0) * count / (count - 1), factor)
        normed = centred * torch.rsqrt(var + self.eps).unsqueeze(1)
        if self.affine:
            normed = normed * self.weight + self.bias
        return normed.flatten(0, 1).to(dtype)


def apply_batchnorm_groups(model: M, group: int, batch_size: int, world: World) -> M:
    """Make every BatchNorm1d (the classification head's) normalise over groups of `group` images when micro-batches
    hold `batch_size`: ghost groups where `group` divides the micro-batch, else the micro-batches of `group //
    batch_size` consecutive ranks (which the caller has checked divides the world). Nothing changes where the
    micro-batch is the group."""
    if group == batch_size:
        return model
    ghosts, ranks = 1, None
    if batch_size % group == 0:
        ghosts = batch_size // group
    elif group // batch_size == world.world_size:
        ranks = dist.group.WORLD
    else:
        ranks, _ = dist.new_subgroups(group // batch_size)  # every rank creates every subgroup, in the same order
    for module in model.modules():
        if type(module) is nn.BatchNorm1d:
            module.__class__ = GroupBatchNorm1d
            grouped = cast(GroupBatchNorm1d, module)
            grouped.group_size, grouped.ghosts, grouped.ranks = group, ghosts, ranks
    return model
