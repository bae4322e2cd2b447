"""Conversion throughput: the same captioned images converted from an image folder (with .txt captions beside
them) and from webdataset tar shards of them, in one run, alternating, so the two compare as a ratio.

    python -m benchmarks.conversion --images-per-class 200 --workers 2

The shards are written from the folder's files once (1,000 samples each), then each source is converted
`repeats` times in turn; the figures are the medians of the sidecars' images/s.
"""
import os
import statistics
import sys
import tarfile
import tempfile

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
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


if __name__ == "__main__":
    main(ConversionBenchmark, benchmark_conversion,
         lambda report: f"shards / folder: {report['shards_vs_folder']:.2f}x")
