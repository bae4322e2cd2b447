"""Conversion throughput, two comparisons, each in one run, alternating, so they compare as ratios:

- `--compare shards`: the same captioned images converted from an image folder (with .txt captions beside
  them) and from webdataset tar shards of them (written from the folder's files once, 1,000 samples each);
  the figures are the medians of the sidecars' images/s.
- `--compare ffcv`: `supmae convert` against FFCV's bare writer as ffcv-imagenet's write_imagenet.py runs it
  (a torchvision ImageFolder, RGBImageField and IntField, chunks of 100), on the photo corpus
  (benchmarks/photos.py) with the same options and workers; the figures are wall seconds, and
  `convert_vs_ffcv_writer` their ratio (below 1: supmae is faster).

    python -m benchmarks.conversion --images-per-class 200 --workers 2
    python -m benchmarks.conversion --compare ffcv --photos-per-class 250 --workers 2
"""
import contextlib
import dataclasses
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from benchmarks.photos import PHOTOS, photo_folder
from supmae.core.options import Config, configuration, option
from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.convert import convert
from supmae.pipelines.synthetic import default_dataset
from supmae.profiling.measure import commit, device_name, versions


@configuration
class ConversionBenchmark(Config):
    """Images/s converting captioned images from a folder and from tar shards of the same files."""
    images_per_class: int = option(100, "images per class of the embedded dataset (10 classes)", at_least=1)
    workers: int | None = option(None, "conversion processes", at_least=1, shown="all cores")
    repeats: int = option(3, "conversions of each source; the figure is their median", at_least=1)
    compare: str = option("shards", "folder against shards, or supmae convert against FFCV's bare writer",
                          choices=("shards", "ffcv"))
    photos_per_class: int = option(250, "--compare ffcv: photos per class of the photo corpus (8 classes)",
                                   at_least=1)
    json: str | None = option(None, "write the results here", metavar="FILE")


def write_shards(folder: str, out: str, per_shard: int = 1000) -> str:
    """The folder's images and captions as shards `out/NNNNN.tar`; returns their brace pattern."""
    stems = sorted(os.path.join(root, name[:-4]) for root, _, names in os.walk(folder) for name in names
                   if name.endswith(".jpg"))
    count = 0
    for count, first in enumerate(range(0, len(stems), per_shard)):
        with tarfile.open(os.path.join(out, f"{count:05d}.tar"), "w") as tar:
            for i, stem in enumerate(stems[first:first + per_shard], start=first):
                for suffix in (".jpg", ".txt"):
                    tar.add(stem + suffix, arcname=f"{i:08d}{suffix}")
    return os.path.join(out, "{" + f"{0:05d}..{count:05d}" + "}.tar")


def benchmark_conversion(cfg: ConversionBenchmark) -> dict:
    if cfg.compare == "ffcv":
        return _against_ffcv(cfg)
    folder = default_dataset(images_per_class=cfg.images_per_class)
    rates = {"folder": [], "shards": []}
    with tempfile.TemporaryDirectory() as work:
        sources = dict(folder=folder, shards=write_shards(folder, work))
        for repeat in range(cfg.repeats):  # every other repeat in the other order
            for kind, src in list(sources.items())[::1 if repeat % 2 == 0 else -1]:
                out = os.path.join(work, f"{kind}.beton")
                sidecar = convert(ConvertConfig(src=src, out=out, storage=ConvertOptions(), workers=cfg.workers,
                                                force=True, progress=False))
                rates[kind].append(sidecar["images_per_s"])
                print(f"{kind:>7}: {sidecar['images_per_s']:8.1f} images/s", flush=True)
    medians = {kind: statistics.median(r) for kind, r in rates.items()}
    return dict(device=device_name("cpu"), commit=commit(), versions=versions("ffcv", "open-clip-torch"),
                config=dict(images=10 * cfg.images_per_class, workers=cfg.workers, repeats=cfg.repeats),
                images_per_s=rates, median_images_per_s=medians, shards_vs_folder=medians["shards"] / medians["folder"])


def _ffcv_writer(src: str, out: str, options: ConvertOptions, workers: int) -> None:
    """ffcv-imagenet's write_imagenet.py, with supmae's storage options."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder
    writer = DatasetWriter(out, {"image": RGBImageField(write_mode=options.write_mode,
                                                        max_resolution=options.max_resolution or None,  # pyright: ignore[reportArgumentType]
                                                        jpeg_quality=options.jpeg_quality,
                                                        compress_probability=options.compress_probability),
                                 "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(ImageFolder(src), chunksize=100)


def _against_ffcv(cfg: ConversionBenchmark) -> dict:
    folder = photo_folder(cfg.photos_per_class)
    workers, options = cfg.workers or os.cpu_count() or 1, ConvertOptions()
    seconds = {"supmae": [], "ffcv": []}
    with tempfile.TemporaryDirectory() as work:
        runs = dict(supmae=lambda: convert(ConvertConfig(src=folder, out=os.path.join(work, "supmae.beton"),
                                                         storage=options, workers=workers, force=True,
                                                         progress=False)),
                    ffcv=lambda: _ffcv_writer(folder, os.path.join(work, "ffcv.beton"), options, workers))
        for repeat in range(cfg.repeats):  # every other repeat in the other order
            for name, run in list(runs.items())[::1 if repeat % 2 == 0 else -1]:
                with contextlib.redirect_stderr(io.StringIO()):  # FFCV's own progress bar
                    started = time.perf_counter()
                    run()
                    seconds[name].append(time.perf_counter() - started)
                print(f"{name:>7}: {seconds[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    return dict(device=device_name("cpu"), commit=commit(), versions=versions("ffcv", "pillow", "torchvision"),
                config=dict(images=len(PHOTOS) * cfg.photos_per_class, corpus="photos", workers=workers,
                            repeats=cfg.repeats, options=dataclasses.asdict(options)),
                seconds=seconds, median_seconds=medians, convert_vs_ffcv_writer=medians["supmae"] / medians["ffcv"])


def describe(report: dict) -> str:
    if "convert_vs_ffcv_writer" in report:
        return f"supmae convert / FFCV's bare writer, wall time: {report['convert_vs_ffcv_writer']:.2f}x"
    return f"shards / folder: {report['shards_vs_folder']:.2f}x"


if __name__ == "__main__":
    main(ConversionBenchmark, benchmark_conversion, describe)
