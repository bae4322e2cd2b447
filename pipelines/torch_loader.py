"""The reference loader: PIL decoding and augmentation in DataLoader workers, as the official code does.

Order and augmentation are functions of (seed, epoch, index) alone, so a run restarted at any batch
sees exactly the data it would have seen, whatever the worker count.
"""
import itertools
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from supmae.errors import SupmaeError
from supmae.pipelines.augment import random_resized_crop_flip
from supmae.pipelines.batch import Batch, to_device_batches
from supmae.pipelines.imagefolder import ImageFolder
from supmae.pipelines.masking import MaskSampler


class _Unreadable(NamedTuple):
    path: str
    reason: str


class _AugmentedImages(Dataset):
    def __init__(self, samples: list[tuple[str, int]], size: int, seed: int):
        self.samples, self.size, self.seed = samples, size, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.samples[index]
        rng = np.random.default_rng((self.seed, epoch, index))
        try:
            with Image.open(path) as image:
                image = random_resized_crop_flip(image.convert("RGB"), self.size, rng)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return _Unreadable(path, str(error) or type(error).__name__)
        return torch.from_numpy(np.array(image)), label


def _collate(samples):
    # An exception raised in a worker reaches the main process wrapped in a traceback; a returned
    # value does not, so a bad image travels back as data and becomes one clear error there.
    for sample in samples:
        if isinstance(sample, _Unreadable):
            return sample
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class _EpochBatches:
    """Batches of (epoch, index) keys, every epoch in a fresh order, from batch `start` on, forever."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int):
        self.num_samples, self.batch_size, self.seed, self.start = num_samples, batch_size, seed, start

    def __iter__(self):
        per_epoch = self.num_samples // self.batch_size  # the partial last batch is dropped
        epoch, skip = divmod(self.start, per_epoch)
        for epoch in itertools.count(epoch):
            order = epoch_order(self.num_samples, self.seed, epoch).tolist()
            for b in range(skip, per_epoch):
                yield [(epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
            skip = 0


class TorchLoader:
    """Yields `Batch`es forever, starting at global batch `start` (epoch = start // batches_per_epoch)."""

    def __init__(self, folder: ImageFolder, batch_size: int, img_size: int, mask_sampler: MaskSampler,
                 device: torch.device, workers: int = 4, seed: int = 0, start: int = 0,
                 dtype: torch.dtype = torch.float32):
        if len(folder.samples) < batch_size:
            raise SupmaeError(f"{folder.root} has {len(folder.samples)} images, fewer than one batch of {batch_size}")
        self.folder, self.batch_size, self.img_size = folder, batch_size, img_size
        self.mask_sampler, self.device, self.dtype = mask_sampler, torch.device(device), dtype
        self.workers, self.seed, self.start = workers, seed, start
        self.batches_per_epoch = len(folder.samples) // batch_size

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            _AugmentedImages(self.folder.samples, self.img_size, self.seed),
            batch_sampler=_EpochBatches(len(self.folder.samples), self.batch_size, self.seed, self.start),
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
        )
        return to_device_batches(_raise_unreadable(loader), self.device, self.mask_sampler, self.start, self.dtype)


def _raise_unreadable(batches):
    for batch in batches:
        if isinstance(batch, _Unreadable):
            raise SupmaeError(f"cannot read image {batch.path}: {batch.reason}")
        yield batch
