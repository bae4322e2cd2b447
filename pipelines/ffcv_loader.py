"""The FFCV engine: .beton samples cropped, decoded (only the part the crop keeps), resized and flipped in one
pass by FFCV's JIT-compiled threads, moved to the device as uint8, augmented (RandAugment, random erasing) and
normalised there.

It follows the shared `Schedule` (FFCV's own quasi-random order is offered for process-cached datasets
larger than memory), and draws its crops and flips from (seed, epoch, index) as the other engines do, so a
run repeated or resumed sees the same views.
"""
import contextlib
import gc
import logging
import sys
import traceback
from collections.abc import Iterator

import numba
import torch

from supmae.pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.pipeline.operation import Operation
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import QuasiRandom

from supmae.core.errors import SupmaeError
from supmae.pipelines.batch import Batch
from supmae.pipelines.ffcv_decoder import ViewDecoder
from supmae.pipelines.order import Schedule
from supmae.pipelines.sources import BetonSource

logger = logging.getLogger(__name__)
_iterating = 0  # FFCV engines iterating now
_previous_hook = sys.unraisablehook  # the process's hook when the first of them began


def _ignore_numba_finalizer_errors(unraisable) -> None:
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if unraisable.exc_type is KeyError and any(f.filename.endswith("numba/core/dispatcher.py") for f in frames):
        return
    _previous_hook(unraisable)


@contextlib.contextmanager
def _numba_finalizer_errors_ignored():
    """FFCV compiles each loader's pipeline into fresh numba dispatchers. When one is garbage-collected,
    numba's finalizer can raise a KeyError that changes nothing (the memory is released either way) but
    that Python prints, traceback and all, in the middle of a run. While an FFCV engine iterates, and until
    its loaders are collected on leaving, that one is silenced; after, the process's hook is as it was."""
    global _iterating, _previous_hook
    if _iterating == 0:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _ignore_numba_finalizer_errors
    _iterating += 1
    try:
        yield
    finally:
        gc.collect()  # the loaders this engine dropped die here, inside the scope
        _iterating -= 1
        if _iterating == 0:
            sys.unraisablehook = _previous_hook


class _Order(TraversalOrder):
    """The shared schedule from `first_epoch` on, less that epoch's first `skip` batches.

    FFCV 1.0 takes a custom order as an instance, which it calls with the loader it belongs to."""

    def __init__(self, schedule: Schedule, *, first_epoch: int, skip: int, quasi_random: bool):
        self.schedule, self.first_epoch, self.skip, self.quasi_random = schedule, first_epoch, skip, quasi_random
        self.quasi = None

    def __call__(self, loader) -> "_Order":
        super().__init__(loader)
        if self.quasi_random:
            self.quasi = QuasiRandom(loader)
        return self

    def sample_order(self, epoch: int):
        epoch += self.first_epoch
        schedule = self.schedule
        if self.quasi is None:
            order = schedule.epoch(epoch)
        else:
            order = self.quasi.sample_order(epoch)[:schedule.batches_per_epoch * schedule.batch_size]
        return order[self.skip * schedule.batch_size:] if epoch == self.first_epoch else order


class FFCVLoader:
    def __init__(self, source, spec):
        if not isinstance(source, BetonSource):
            raise SupmaeError(f"the ffcv loader reads .beton files; convert {source.path} first "
                              f"(supmae convert {source.path} OUT.beton)")
        if spec.order not in ("random", "quasi_random", "sequential"):
            raise SupmaeError(f"unknown order {spec.order!r}; use random or quasi_random")
        if spec.order == "quasi_random" and spec.world_size > 1:
            raise SupmaeError("quasi_random order cannot be sharded across ranks; use random")
        self.source, self.spec = source, spec
        self.schedule = spec.schedule(len(source))
        # FFCV's workers are numba threads, of which numba allows as many as it was started with (the cores).
        self.workers = min(max(1, spec.workers), numba.config.NUMBA_NUM_THREADS)  # pyright: ignore[reportAttributeAccessIssue]
        if self.workers < spec.workers:
            logger.warning(f"the ffcv loader runs at most {self.workers} threads here (numba's NUMBA_NUM_THREADS): "
                           f"using {self.workers}, not {spec.workers}")

    def views(self) -> tuple[ResizedCropRGBImageDecoder, list[Operation]]:
        """The decoder from stored image to uint8 view, and the operations after it."""
        spec = self.spec
        return ViewDecoder((spec.img_size, spec.img_size), seed=spec.seed, train=spec.train,
                           scale=spec.crop_scale, fraction=spec.center_fraction), []

    def _loader(self, first_epoch: int, skip: int) -> tuple[Loader, ResizedCropRGBImageDecoder]:
        """A loader from `first_epoch` on, less its first `skip` batches, and its decoder."""
        spec, device = self.spec, torch.device(self.spec.device)
        decoder, after = self.views()
        images: list[Operation] = [decoder, *after, ToTensor()]
        labels: list[Operation] = [IntDecoder(), ToTensor(), Squeeze(1)]
        tokens: list[Operation] = [NDArrayDecoder(), ToTensor()]
        if device.type == "cuda":  # uint8 crosses on FFCV's own copy streams
            images, labels, tokens = ([*ops, ToDevice(device, non_blocking=True)] for ops in (images, labels, tokens))
        pipelines: dict[str, list[Operation] | None] = {"image": images, "label": labels}
        if self.source.captioned:  # fields FFCV would otherwise decode too: the tokens when asked for, never the text
            pipelines.update(tokens=tokens if spec.text else None, text=None)
        with keep_torch_threads():
            return Loader(self.source.path, batch_size=spec.batch_size, num_workers=self.workers,
                          os_cache=spec.os_cache, seed=spec.seed, drop_last=True,
                          order=_Order(self.schedule, first_epoch=first_epoch, skip=skip,
                                               quasi_random=spec.order == "quasi_random"),
                          pipelines=pipelines), decoder  # pyright: ignore[reportArgumentType] (None: not decoded)

    def pixels(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The views as FFCV's threads deliver them: uint8 (B, H, W, 3) with labels (and tokens), before
        `device_batches` normalises and masks them on the device; on a GPU host, the whole of the host's work."""
        return _quieted(self._pixels())

    def _pixels(self):
        epoch, skip = divmod(self.spec.start, self.schedule.batches_per_epoch)
        if skip:  # FFCV fixes an epoch's length at construction, so a part epoch gets a loader of its own
            yield from self._epoch(*self._loader(epoch, skip), epoch)
            epoch += 1
        loader, decoder = self._loader(epoch, 0)
        while True:
            yield from self._epoch(loader, decoder, epoch)
            if self.schedule.total_batches is not None:  # a single pass
                return
            epoch += 1

    def _epoch(self, loader: Loader, decoder: ResizedCropRGBImageDecoder, epoch: int):
        # FFCV sizes its buffers from the decoder's output size as each epoch starts (as FFCV's ImageNet
        # recipe changes resolution between epochs), so the scheduled side needs no loader of its own.
        side = self.spec.side(epoch)
        decoder.output_size = (side, side)
        if isinstance(decoder, ViewDecoder):  # FFCV's own decoders draw from their generators instead
            decoder.epoch = epoch
        with keep_torch_threads():  # FFCV sets them again for every epoch
            batches = iter(loader)
        yield from batches

    def __iter__(self) -> Iterator[Batch]:
        return self.spec.device_batches(self.pixels())


def _quieted(batches):
    with _numba_finalizer_errors_ignored():
        yield from batches
