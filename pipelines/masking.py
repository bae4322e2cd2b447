"""Per-sample random patch masking with MAE's semantics, in static shapes so it compiles.

Each sample draws noise ~ U(0, 1) over its L patches; the patches with the smallest noise are kept.
"""
from typing import NamedTuple

import numpy as np
import torch

from supmae.pipelines.split import Split


class Masking(NamedTuple):
    ids_keep: torch.Tensor     # (B, num_kept) int64: kept patch indices, in ascending-noise order
    ids_restore: torch.Tensor  # (B, L) int64: position of each patch in the shuffled order
    mask: torch.Tensor         # (B, L) float32 in original patch order: 0 kept, 1 removed
    ids_removed: torch.Tensor  # (B, L - num_kept) int64: the other patches, in ascending-noise order


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """How many patches the encoder sees; `int()` truncation as in the official code."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, num_kept: int) -> Masking:
    """Turn noise (B, L) into a Masking that keeps the `num_kept` lowest-noise patches of each sample."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # A patch is removed exactly when its place in the shuffled order is past the kept prefix.
    mask = (ids_restore >= num_kept).to(torch.float32)
    # Contiguous, not views into ids_shuffle: the kernels read them as plain arrays, and a view starting
    # mid-buffer makes inductor treat what depends on it as unaligned.
    return Masking(ids_shuffle[:, :num_kept].contiguous(), ids_restore, mask, ids_shuffle[:, num_kept:].contiguous())


def _generator_seed(*entropy: int) -> int:
    # Well-mixed 64 bits: the CPU generator only uses the low 32 bits of its seed.
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


def step_noise(generator: torch.Generator, batch_size: int, length: int, *, seed: int, index: int, rank: int,
               split: Split | None, stream: tuple[int, ...] = ()) -> torch.Tensor:
    """U(0, 1) noise (batch_size, length) for this rank's micro-batch `index`: its rows of the noise drawn for its
    optimizer step's whole global batch from (seed, step, *stream), so every sample gets the same noise however
    the global batch is split (one process, ranks, micro-batches). Without a split, one process draws per batch."""
    split = split or Split(batch_size)
    if batch_size != split.batch_size:
        raise ValueError(f"a batch of {batch_size} in a split of {split.batch_size} per micro-batch")
    step, micro = split.locate(index)
    generator.manual_seed(_generator_seed(seed, step, *stream))
    return torch.rand(split.size, length, generator=generator, device=generator.device)[split.rows(rank, micro)]


class MaskSampler:
    """Draws the masks of a run on the device, reproducibly.

    The noise for micro-batch `index` depends only on (seed, its step, its rows of the step: `step_noise`), never
    on how many batches came before or how the global batch is split, so a resumed run, a loader restarted
    mid-epoch or a run resumed on another number of ranks draws exactly the masks it would have drawn.
    """

    def __init__(self, num_patches: int, mask_ratio: float, *, seed: int, device: torch.device | str, rank: int = 0,
                 split: Split | None = None):
        self.num_patches, self.mask_ratio = num_patches, mask_ratio
        self.seed, self.rank, self.split = seed, rank, split
        self._generator = torch.Generator(device=torch.device(device))

    def __call__(self, batch_size: int, index: int, num_patches: int | None = None) -> Masking:
        """Micro-batch `index`'s masks over `num_patches` patches (the sampler's own count by default: a smaller
        image's grid, at the same ratio)."""
        length = num_patches or self.num_patches
        noise = step_noise(self._generator, batch_size, length, seed=self.seed, index=index, rank=self.rank,
                           split=self.split)
        return random_masking(noise, num_kept(length, self.mask_ratio))


class TextMaskSampler:
    """Masks of caption tokens for masked-text objectives, drawn on the device as the patch masks are (from a
    stream of their own), so resumes and splits stay exact.

    A row's candidates are its caption's own tokens (not the start and end markers, not the padding); of
    those, round(ratio x their number), at least one and at most `max_masked`, are masked: True in the
    (B, L) mask."""

    def __init__(self, mask_ratio: float, *, special: tuple[int, ...], seed: int, device: torch.device | str,
                 rank: int = 0, split: Split | None = None, pad: int = 0, max_masked: int | None = None):
        if not 0 < mask_ratio < 1:
            raise ValueError(f"a text mask ratio is above 0 and below 1, not {mask_ratio}")
        self.mask_ratio, self.special, self.pad, self.max_masked = mask_ratio, tuple(special), pad, max_masked
        self.seed, self.rank, self.split = seed, rank, split
        self._generator = torch.Generator(device=torch.device(device))

    def __call__(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        noise = step_noise(self._generator, *tokens.shape, seed=self.seed, index=index, rank=self.rank,
                           split=self.split, stream=(1,))  # not the patch mask's stream
        candidate = tokens != self.pad
        for token in self.special:
            candidate &= tokens != token
        count = candidate.sum(1, keepdim=True)
        masked = torch.where(count > 0, (count * self.mask_ratio).round().clamp(min=1, max=self.max_masked), 0)
        order = noise.masked_fill(~candidate, 2.0).argsort(1).argsort(1)  # candidates first, in noise order
        return order < masked
