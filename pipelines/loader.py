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
from typing import Iterator

import torch

from supmae.errors import SupmaeError
from supmae.pipelines.batch import Batch
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.order import Schedule

# engine -> "module:class"; imported on use, so an engine's package is only needed when it is picked.
ENGINES = {
    "torch": "supmae.pipelines.torch_loader:TorchLoader",
    "ffcv": "supmae.pipelines.ffcv_loader:FFCVLoader",
    "dali": "supmae.pipelines.dali_loader:DALILoader",
}
_PACKAGES = {"ffcv": "ffcv", "dali": "nvidia-dali-cuda130"}
PREFETCH_PER_WORKER = 4  # batches each torch worker prepares ahead; DALI (2) and FFCV (3) hold fewer


@dataclasses.dataclass
class LoaderSpec:
    batch_size: int
    img_size: int
    mask_sampler: MaskSampler
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    workers: int = 4            # decoding processes or threads
    seed: int = 0
    start: int = 0              # the global batch to begin at (a resumed run's position)
    train: bool = True          # random resized crop + flip; False: the centre crop
    rank: int = 0
    world_size: int = 1
    order: str = "random"       # random (shared by all engines) | quasi_random (ffcv, page-aware)
    os_cache: bool = True       # ffcv: rely on the OS page cache (False: its own process cache)

    def schedule(self, num_samples: int) -> Schedule:
        schedule = Schedule(num_samples, self.batch_size, self.seed, self.rank, self.world_size)
        if schedule.batches_per_epoch < 1:
            raise SupmaeError(f"{num_samples} images make no batch of {self.batch_size} on each of "
                              f"{self.world_size} rank(s); lower --batch-size")
        return schedule


def buffered_batches(spec: LoaderSpec) -> int:
    """The most batches any engine can hold ready before it is first asked for one: a loader timed over
    fewer batches than this, right after it starts, measures its buffer rather than its rate."""
    return PREFETCH_PER_WORKER * max(1, spec.workers) + 4


def check_engine(engine: str) -> None:
    if engine != "auto" and engine not in ENGINES:
        raise SupmaeError(f"unknown loader {engine!r}; available: auto, {', '.join(ENGINES)}")


def choose_engine(engine: str, source) -> str:
    """Resolve "auto" to the engine measured to feed the step best: ffcv for a .beton where it is
    installed, the torch engine otherwise. DALI is not picked: on an H100 it fed the ViT-B/16 step 58%
    end to end where ffcv and torch fed 97% (benchmarks/results/nvidia-h100-2026-11-24/)."""
    check_engine(engine)
    if engine != "auto":
        return engine
    from supmae.pipelines.sources import BetonSource
    return "ffcv" if isinstance(source, BetonSource) and importlib.util.find_spec("ffcv") else "torch"


def create_loader(engine: str, source, spec: LoaderSpec) -> Iterator[Batch]:
    engine = choose_engine(engine, source)
    if spec.order != "random" and engine != "ffcv":
        raise SupmaeError(f"order {spec.order!r} is an ffcv loader option; the {engine} loader reads in random order")
    module, name = ENGINES[engine].split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise SupmaeError(f"the {engine} loader needs the {_PACKAGES.get(engine, engine)} package, "
                          f"which failed to import: {error}") from None
    return cls(source, spec)


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
