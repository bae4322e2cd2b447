"""Which samples make up micro-batch i on this rank: the one schedule every engine follows.

The order of an epoch is a function of (seed, epoch) alone; each optimizer step takes the next global batch
of it and each rank its rows of that (`split.Split`), so every engine, worker count, restart point and split
of the same global batch sees the same samples in the same steps.
"""
import numpy as np
import torch

from supmae.pipelines.split import Split


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).numpy()


class Schedule:
    """Batches of `batch_size` sample indices, epoch after epoch; an epoch is a whole number of global batches
    (`accum` micro-batches on each of `world_size` ranks), the samples left over are dropped.

    `sequential`: one pass over every sample in index order (what evaluation reads), the last batch filled
    up with repeats of the last sample, so engines keep their fixed batch shape; `total_batches` ends it."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 accum: int = 1, sequential: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if sequential and world_size > 1:
            raise ValueError("a sequential pass is read by one rank")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.sequential = rank, sequential
        self.split = Split(batch_size, world_size, accum)
        self.batches_per_epoch = (-(-num_samples // batch_size) if sequential
                                  else num_samples // self.split.size * accum)
        self.total_batches = self.batches_per_epoch if sequential else None  # None: endless
        self._cached: tuple[int | None, np.ndarray] = (None, np.empty(0, np.int64))

    def epoch(self, epoch: int) -> np.ndarray:
        """This rank's samples for `epoch`, in order, a whole number of batches long."""
        if self._cached[0] != epoch:
            if self.sequential:
                padding = self.batches_per_epoch * self.batch_size - self.num_samples
                order = np.concatenate([np.arange(self.num_samples), np.full(padding, self.num_samples - 1)])
            else:
                split, steps = self.split, self.batches_per_epoch // self.split.accum
                order = epoch_order(self.num_samples, self.seed, epoch)[:steps * split.size]
                # (step, micro-batch, rank, row): this rank's rows of each step, micro-batch after micro-batch
                order = order.reshape(steps, split.accum, split.world_size, -1)[:, :, self.rank].reshape(-1)
            self._cached = (epoch, order[:self.batches_per_epoch * self.batch_size])
        return self._cached[1]

    def batch(self, index: int) -> tuple[int, np.ndarray]:
        """(epoch, sample indices) of this rank's micro-batch `index`."""
        epoch, b = divmod(index, self.batches_per_epoch)
        return epoch, self.epoch(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
