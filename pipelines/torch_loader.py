"""The reference engine: PIL decoding and augmentation in DataLoader workers, as the official code does
(RandAugment too, through timm's own transform).

Each sample's view is a function of (seed, epoch, index) alone, so a run restarted at any batch sees
exactly the data it would have seen, whatever the worker count.
"""
import itertools
import signal
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from supmae.core.errors import SupmaeError
from supmae.pipelines.augment import crop_and_flip, crop_resize_flip
from supmae.pipelines.batch import Batch
from supmae.pipelines.decode import UNREADABLE
from supmae.pipelines.loader import PREFETCH_PER_WORKER
from supmae.pipelines.order import Schedule
from supmae.pipelines.randaugment import seeded, timm_rand_augment
from supmae.pipelines.resolution import ResolutionSchedule, side_at
from supmae.pipelines.samples import CaptionError


class _Unreadable(NamedTuple):
    name: str
    reason: str


class _Views(Dataset):
    def __init__(self, source, *, size: int, seed: int, train: bool, scale: tuple[float, float], fraction: float,
                 text: bool = False, rand_augment: str = "", resolution: ResolutionSchedule | None = None):
        self.source, self.size, self.seed, self.text, self.resolution = source, size, seed, text, resolution
        self.train, self.scale, self.fraction = train, scale, fraction
        self.rand_augment = timm_rand_augment(rand_augment, size) if rand_augment else None

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image = self.source.image(index)
        except UNREADABLE as error:
            return _Unreadable(f"image {self.source.describe(index)}", str(error) or type(error).__name__)
        box, flip = crop_and_flip(image.width, image.height, seed=self.seed, epoch=epoch, index=index,
                                  train=self.train, scale=self.scale, fraction=self.fraction)
        view = crop_resize_flip(image, size=side_at(self.resolution, self.size, epoch), box=box, flip=flip)
        if self.rand_augment is not None:
            with seeded((self.seed, epoch, index)):
                view = self.rand_augment(view)
        view = torch.from_numpy(np.array(view))
        if not self.text:
            return view, int(self.source.labels[index])
        try:
            tokens = self.source.tokens(index)
        except CaptionError as error:
            return _Unreadable(f"the caption of {self.source.describe(index)}", str(error))
        return view, int(self.source.labels[index]), torch.from_numpy(tokens)


def _leave_stop_signals_to_the_run(worker_id: int) -> None:
    """A scheduler's SIGTERM reaches the whole process group: the workers must outlive it, so the main process
    can finish its step, checkpoint and close them (torch's own handler would end them at once)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _collate(samples):
    # An exception raised in a worker reaches the main process wrapped in a traceback; a returned
    # value does not, so a bad image travels back as data and becomes one clear error there.
    for sample in samples:
        if isinstance(sample, _Unreadable):
            return sample
    if len(samples[0]) == 3:
        return (torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]),
                torch.stack([s[2] for s in samples]))
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


class _Keys:
    """The DataLoader's batch sampler: (epoch, index) keys of global batches start, start + 1, ... (to the
    schedule's end, when it has one, so the workers decode nothing past a single pass)."""

    def __init__(self, schedule: Schedule, start: int):
        self.schedule, self.start = schedule, start

    def __iter__(self):
        total = self.schedule.total_batches
        for b in itertools.count(self.start) if total is None else range(self.start, total):
            epoch, indices = self.schedule.batch(b)
            yield [(epoch, int(i)) for i in indices]


class TorchLoader:
    def __init__(self, source, spec):
        self.source, self.spec = source, spec
        self.schedule = spec.schedule(len(source))

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        loader = DataLoader(
            _Views(self.source, size=spec.img_size, seed=spec.seed, train=spec.train, scale=spec.crop_scale,
                   fraction=spec.center_fraction, text=spec.text, rand_augment=spec.rand_augment,
                   resolution=spec.resolution),
            batch_sampler=_Keys(self.schedule, spec.start),
            num_workers=spec.workers,
            collate_fn=_collate,
            worker_init_fn=_leave_stop_signals_to_the_run,
            pin_memory=torch.device(spec.device).type == "cuda",
            prefetch_factor=PREFETCH_PER_WORKER if spec.workers else None,
        )
        return spec.device_batches(_raise_unreadable(loader), augmented=True)


def _raise_unreadable(batches):
    for batch in batches:
        if isinstance(batch, _Unreadable):
            raise SupmaeError(f"cannot read {batch.name}: {batch.reason}")
        yield batch
