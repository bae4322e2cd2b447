"""One loader interface, three engines: `create_loader(engine, source, spec)` yields `Batch`es forever.

Whatever the engine, batch i holds the samples `Schedule.batch(i)` names, with the mask `MaskSampler`
draws for i, in fixed shapes (partial batches are dropped), so the training loop never knows which
engine feeds it.
"""
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from supmae.core.errors import SupmaeError
from supmae.pipelines.augment import CROP_SCALE, EVAL_CROP_FRACTION
from supmae.pipelines.batch import Batch, to_device_batches
from supmae.pipelines.config import parse_policy
from supmae.pipelines.device_augment import RandAugment, RandomErasing
from supmae.pipelines.engines import ENGINES, PACKAGES
from supmae.pipelines.masking import MaskSampler, TextMaskSampler
from supmae.pipelines.order import Schedule
from supmae.pipelines.resolution import ResolutionSchedule, side_at

PREFETCH_PER_WORKER = 4  # batches each torch worker prepares ahead; DALI (2) and FFCV (3) hold fewer


class Source(Protocol):
    """A labelled, indexable set of images (`sources.open_source`): a folder, a file list or a .beton, with a
    caption per image where `captioned`."""
    path: str
    classes: list[str]       # a label is an index into this list
    labels: np.ndarray       # (N,) int64
    captioned: bool

    def __len__(self) -> int: ...

    def fingerprint(self) -> str:
        """A digest of what the samples are, so a resumed run can tell it reads the data it began with."""
        ...

    def describe(self, index: int) -> str:
        """How an error names sample `index`: its file, or the .beton and position."""
        ...

    def encoded(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Sample `index` as encoded bytes (for engines that decode themselves) and its upright (width, height)."""
        ...

    def image(self, index: int) -> Image.Image:
        """Sample `index` decoded: upright RGB."""
        ...

    def tokens(self, index: int) -> np.ndarray:
        """Sample `index`'s caption as (77,) int32 token ids (`text.encode`; stored ones for a .beton)."""
        ...

    def prepare_text(self) -> None:
        """Made ready to give tokens, in the main process before any worker starts."""
        ...


@dataclasses.dataclass(kw_only=True)
class LoaderSpec:
    batch_size: int
    img_size: int
    mask_sampler: MaskSampler | None   # None: batches without masks (evaluation, fine-tuning)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    workers: int = 4            # decoding processes or threads
    seed: int = 0
    start: int = 0              # this rank's micro-batch to begin at (a resumed run's position)
    train: bool = True          # random resized crop + flip; False: the centre crop
    crop_scale: tuple[float, float] = CROP_SCALE  # the share of the image a random crop covers
    center_fraction: float = EVAL_CROP_FRACTION  # without train: the centre square's share of the shorter side
    rank: int = 0
    world_size: int = 1
    accum: int = 1              # micro-batches per optimizer step: an epoch is whole steps (`split.Split`)
    # random (shared by all engines) | quasi_random (ffcv, page-aware) | sequential (one pass in index order)
    order: str = "random"
    os_cache: bool = True       # ffcv: rely on the OS page cache (False: its own process cache)
    text: bool = False          # deliver each sample's caption tokens (the source must have captions)
    text_mask_sampler: TextMaskSampler | None = None  # with text: a text mask per batch
    rand_augment: str = ""      # a RandAugment policy in timm's notation for every view ("": none)
    erase: float = 0.0          # the share of views given a randomly erased box (timm's, pixel mode)
    resolution: ResolutionSchedule | None = None  # the side of each epoch's views (None: img_size throughout)

    def side(self, epoch: int) -> int:
        """The side of epoch `epoch`'s views."""
        return side_at(self.resolution, self.img_size, epoch)

    def device_batches(self, pixel_batches, *, augmented: bool = False) -> Iterator[Batch]:
        """An engine's pixel batches as `Batch`es on the device, with what is drawn there: masks and text masks,
        random erasing, and RandAugment unless the engine has `augmented` its views itself (as the torch engine
        does, through timm's transform, in its workers)."""
        augment = RandAugment(parse_policy(self.rand_augment), self.seed) if self.rand_augment and not augmented \
            else None
        return to_device_batches(pixel_batches, self.device, self.mask_sampler, start=self.start, dtype=self.dtype,
                                 text_mask_sampler=self.text_mask_sampler, augment=augment,
                                 erase=RandomErasing(self.erase, self.seed) if self.erase > 0 else None,
                                 resolution=self.resolution)

    def schedule(self, num_samples: int) -> Schedule:
        schedule = Schedule(num_samples, self.batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size,
                            accum=self.accum, sequential=self.order == "sequential")
        if schedule.batches_per_epoch < 1:
            raise SupmaeError(f"{num_samples} images make no global batch of {schedule.split}; lower --batch-size")
        return schedule


class Engine(Protocol):
    """A loader engine, registered by name in `engines.ENGINES`. Built from a source and a spec, its iterator
    yields `Batch`es forever: batch i holds the samples `spec.schedule(len(source)).batch(spec.start + i)`
    names, with mask i from `spec.mask_sampler`, normalised on `spec.device` in `spec.dtype`. An iterator
    with a `close()` has it called when the run leaves it (`open_batches`)."""

    def __init__(self, source: Source, spec: LoaderSpec) -> None: ...
    # With `spec.text`, each batch also holds its samples' tokens (and the text mask `spec.text_mask_sampler`
    # draws for batch i).

    def __iter__(self) -> Iterator[Batch]: ...


def buffered_batches(spec: LoaderSpec) -> int:
    """The most batches any engine can hold ready before it is first asked for one: a loader timed over
    fewer batches than this, right after it starts, measures its buffer rather than its rate."""
    return PREFETCH_PER_WORKER * max(1, spec.workers) + 4


def choose_engine(engine: str, source) -> str:
    """Resolve "auto" to the engine measured to feed the step best: ffcv for a .beton where it is
    installed, the torch engine otherwise. DALI is not picked: on an H100 it fed the ViT-B/16 step 58%
    end to end where ffcv and torch fed 97% (benchmarks/results/nvidia-h100-2026-11-24/)."""
    if engine != "auto":
        return engine
    from supmae.pipelines.sources import BetonSource
    return "ffcv" if isinstance(source, BetonSource) and importlib.util.find_spec("ffcv") else "torch"


def create_loader(engine: str, source: Source, spec: LoaderSpec) -> Engine:
    engine = choose_engine(engine, source)
    if spec.text and not source.captioned:
        raise SupmaeError(f"{source.path} holds no captions; give image-text data (supmae convert reads shards, "
                          "file lists with a caption column and folders with a .txt beside each image)")
    if spec.text:
        source.prepare_text()
    if spec.order == "quasi_random" and engine != "ffcv":
        raise SupmaeError(f"order {spec.order!r} is an ffcv loader option; the {engine} loader reads in random order")
    module, name = ENGINES[engine].split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise SupmaeError(f"the {engine} loader needs the {PACKAGES.get(engine, engine)} package, "
                          f"which failed to import: {error}") from None
    return cls(source, spec)


def ordered_batches(engine: str, source: Source, *, img_size: int, batch_size: int, workers: int, device,
                    text: bool = False, center_fraction: float = EVAL_CROP_FRACTION) -> Iterator[Batch]:
    """Every sample once, in index order, centre-cropped (the square of `center_fraction` of the shorter side),
    with no mask (and with its caption's tokens where `text`), through any engine: what evaluation,
    fine-tuning's validation and visualisation read. The last batch holds what is left (the engines' padding is
    cut off)."""
    spec = LoaderSpec(batch_size=batch_size, img_size=img_size, mask_sampler=None, device=device, workers=workers,
                      train=False, order="sequential", text=text, center_fraction=center_fraction)
    with open_batches(create_loader(engine, source, spec)) as batches:
        for first in range(0, len(source), batch_size):
            batch = next(batches)
            left = len(source) - first
            yield batch if left >= batch_size else Batch(batch.images[:left], batch.labels[:left], None,
                                                         None if batch.tokens is None else batch.tokens[:left])


@contextlib.contextmanager
def open_batches(loader):
    """Iterate `loader`; on leaving, even by an error, close it, so its workers stop then and not whenever
    the iterator is collected."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        gc.collect()
