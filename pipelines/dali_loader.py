"""The DALI engine: encoded bytes (image files or .beton samples) go to DALI, which decodes only each
sample's crop (nvJPEG and the hardware JPEG decoder on a GPU, libjpeg-turbo on CPU), resizes, and flips
and normalises into (B, 3, H, W) in one pass, handing batches over on the device (with RandAugment, flipped
uint8 pixels, which are augmented on the device and normalised there).

Crop boxes and flips are drawn in Python by the same function as the torch engine's, from
(seed, epoch, index), so the two engines produce the same views; only decoder and resampler differ.
"""
# pyright: reportAttributeAccessIssue=false, reportCallIssue=false, reportArgumentType=false
# (DALI makes its operators and types at import time, so its stubs do not describe them.)
import os
import pickle
import signal
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from supmae.core.errors import SupmaeError
from supmae.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, crop_and_flip
from supmae.pipelines.batch import Batch
from supmae.pipelines.decode import without_png_profile
from supmae.pipelines.order import Schedule
from supmae.pipelines.resolution import ResolutionSchedule, side_at


class _Samples:
    """DALI's per-sample source: what global batch `start + iteration` holds at `idx_in_batch`.

    Runs in DALI's Python worker processes, which is where the file reads and crop draws happen."""

    def __init__(self, source, schedule: Schedule, *, start: int, seed: int, train: bool, scale: tuple[float, float],
                 fraction: float, size: int, resolution: ResolutionSchedule | None):
        self.source, self.schedule, self.start, self.seed = source, schedule, start, seed
        self.train, self.scale, self.fraction = train, scale, fraction
        self.size, self.resolution = size, resolution

    def __call__(self, info):
        epoch, indices = self.schedule.batch(self.start + info.iteration)
        index = int(indices[info.idx_in_batch])
        data, (width, height) = self.source.encoded(index)
        data = without_png_profile(data)
        (left, top, w, h), flip = crop_and_flip(width, height, seed=self.seed, epoch=epoch, index=index,
                                                train=self.train, scale=self.scale, fraction=self.fraction)
        side = side_at(self.resolution, self.size, epoch)
        return (data, np.array(self.source.labels[index], np.int64), np.array([left, top], np.float32),
                np.array([w, h], np.float32), np.array(flip, np.int32), np.array([side, side], np.float32))


class _CallbackFile:
    """DALI's callback pickler for spawned workers: the pickled callback, which holds the source's
    per-sample tables and so grows with the dataset, goes to one file and each worker is sent its name.
    Sent inline, a payload over a pipe's 64 KiB makes each Process.start() wait for its child to start
    Python and import the main module, so the workers start one after another (a first batch after
    171 s with 15 workers and 10,000 images on an H100 host)."""

    path: str | None = None

    def dumps(self, callback) -> str:
        fd, self.path = tempfile.mkstemp(prefix="supmae-dali-", suffix=".pickle")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(callback, f, protocol=pickle.HIGHEST_PROTOCOL)
        return self.path

    def loads(self, path: str):
        """In the worker, which leaves the stop signals a scheduler sends the whole process group to the main
        process (forked workers inherit its handler instead)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        with open(path, "rb") as f:
            return pickle.load(f)

    def remove(self) -> None:
        if self.path is not None:
            os.unlink(self.path)


def _start_method(on_gpu: bool) -> str:
    return "spawn" if on_gpu else "fork"  # forking a process that holds a CUDA context is unsafe


# The share of JPEGs the mixed decoder sends to the hardware decoder (the rest go to nvJPEG's CUDA path,
# on the SMs the training step needs); NVIDIA's A100 measurements peak near 0.75 (DALI's default: 0.65).
HW_DECODER_LOAD = 0.75


@pipeline_def
def _views(samples: _Samples, on_gpu: bool, parallel: bool, half: bool, normalize: bool):
    data, labels, anchor, shape, flip, size = fn.external_source(
        samples, num_outputs=6, batch=False, parallel=parallel,
        dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT])
    decoder = dict(device="mixed", hw_decoder_load=HW_DECODER_LOAD) if on_gpu else dict(device="cpu")
    images = fn.decoders.image_slice(data, anchor, shape, axis_names="WH", normalized_anchor=False,
                                     normalized_shape=False, output_type=types.RGB, **decoder)
    images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC, antialias=True)  # the epoch's side
    if not normalize:  # flipped uint8 pixels, for RandAugment on the device before normalisation
        return fn.flip(images, horizontal=flip), labels.gpu() if on_gpu else labels
    # Flip, normalise and transpose in one pass, in half precision when the step computes in 16 bits.
    images = fn.crop_mirror_normalize(images, mirror=flip, output_layout="CHW",
                                      dtype=types.FLOAT16 if half else types.FLOAT,
                                      mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
    return images, labels.gpu() if on_gpu else labels


class DALILoader:
    def __init__(self, source, spec):
        self.source, self.spec = source, spec
        self.schedule = spec.schedule(len(source))

    def _pixels(self, normalize: bool):
        spec, device = self.spec, torch.device(self.spec.device)
        on_gpu = device.type == "cuda"
        samples = _Samples(self.source, self.schedule, start=spec.start, seed=spec.seed, train=spec.train,
                           scale=spec.crop_scale, fraction=spec.center_fraction, size=spec.img_size,
                           resolution=spec.resolution)
        start = _start_method(on_gpu)
        callback_file = _CallbackFile() if start == "spawn" else None
        pipe = _views(samples, on_gpu=on_gpu, parallel=spec.workers > 0,
                      half=spec.dtype.itemsize == 2, normalize=normalize, batch_size=spec.batch_size,
                      num_threads=max(1, spec.workers), seed=spec.seed,
                      device_id=(device.index if device.index is not None else torch.cuda.current_device())
                      if on_gpu else None,
                      py_num_workers=max(1, spec.workers), py_start_method=start, py_callback_pickler=callback_file)
        try:
            try:
                pipe.build()  # returns once every worker has loaded its callback
            finally:
                if callback_file is not None:
                    callback_file.remove()
            for index, (out,) in enumerate(DALIGenericIterator([pipe], ["images", "labels"], size=-1),
                                           start=spec.start):
                if spec.text:  # read here, a few hundred bytes a sample, rather than through DALI's workers
                    yield out["images"], out["labels"], self._tokens(index)
                else:
                    yield out["images"], out["labels"]
        except RuntimeError as error:
            raise SupmaeError(f"the dali loader failed: {_first_line(error)}") from None

    def _tokens(self, index: int) -> torch.Tensor:
        _, indices = self.schedule.batch(index)
        return torch.from_numpy(np.stack([self.source.tokens(int(i)) for i in indices]))

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        return spec.device_batches(self._pixels(normalize=not spec.rand_augment))


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "rror" in line), lines[0] if lines else type(error).__name__)
