"""The FFCV engine's view decoder (only the crop decoded, at a DCT scale) against FFCV's stock decoder (every
whole JPEG decoded, then cropped and area-resized), in images/s per busy core, on the photo corpus stored at
several longest sides. The two take turns in each round of one run, so a slow spell of the machine falls on both.

The headline is the views alone, the host's whole share on a GPU node (normalising and masking run on the
device there); whole batches, normalised and masked on this CPU, are measured beside them.

    python -m benchmarks.crop_decode --max-res 256,320,512 --rounds 3 --json crop-decode.json
"""
import os
import statistics
import sys

import torch

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from benchmarks.loaders import NODE_CORES_PER_GPU, per_core
from benchmarks.photos import photo_beton
from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, items, option
from supmae.pipelines.augment import CROP_RATIO, CROP_SCALE, FLIP_PROBABILITY
from supmae.pipelines.ffcv_loader import FFCVLoader
from supmae.pipelines.loader import LoaderSpec
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.sources import open_source
from supmae.pipelines.torch_threads import keep_torch_threads
from supmae.profiling.measure import commit, device_name, versions
from supmae.profiling.profiler import measure_loader
from supmae.runtime.hardware import loader_workers

with keep_torch_threads():
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip


class StockFFCVLoader(FFCVLoader):
    """The FFCV engine with FFCV's own decoder and flip: what it ran before it decoded only the crop."""

    def views(self):
        size = (self.spec.img_size, self.spec.img_size)
        return (RandomResizedCropRGBImageDecoder(size, scale=self.spec.crop_scale, ratio=CROP_RATIO),
                [RandomHorizontalFlip(FLIP_PROBABILITY)])


DECODERS = {"crop": FFCVLoader, "stock": StockFFCVLoader}


@configuration
class CropDecodeBenchmark(Config):
    """The FFCV engine's view decoder against FFCV's stock decoder, per busy core, on photos."""
    max_res: str = option("256,320,512", "the photo corpus's longest sides, comma-separated", flag="--max-res",
                          metavar="PIXELS", listed=True)
    photos_per_class: int = option(250, "images per class (8 classes)", at_least=1)
    workers: int | None = option(None, "FFCV threads (default: one per core)", at_least=1)
    batch_size: int = option(64, "images per batch", at_least=1)
    img_size: int = option(224, "the views' side", at_least=16)
    warmup: int = option(8, "untimed batches after the first", at_least=0)
    batches: int = option(10, "batches per timed pass", at_least=1)
    passes: int = option(5, "timed passes; a round's figure is their median", at_least=1)
    rounds: int = option(3, "rounds, each decoder in turn; the figure is the median round", at_least=1)
    json: str | None = option(None, "write the results here", metavar="FILE")


# What is timed: the views alone, uint8 as the engine's threads deliver them (the host's whole share on a GPU
# node, where normalising, masking and augmenting run on the device), and whole batches, normalised and masked,
# as this CPU-only machine makes them (the same work for both decoders, done here by the host as well).
STAGES = {"views": FFCVLoader.pixels, "batches": iter}


def benchmark_crop_decode(cfg: CropDecodeBenchmark) -> dict:
    workers = loader_workers(cfg.workers or os.cpu_count())
    cpu = torch.device("cpu")
    sides = [int(side) for side in items(cfg.max_res) if side.isdigit() and int(side) >= 8]
    if len(sides) != len(items(cfg.max_res)):
        raise SupmaeError(f"--max-res takes sides of 8 pixels or more, comma-separated, not {cfg.max_res!r}")
    runs: dict[str, dict[str, dict[str, list]]] = {}
    for side in sides:
        source = open_source(photo_beton(cfg.photos_per_class, side, workers))
        for r in range(cfg.rounds):
            for stage in STAGES:
                for decoder in (list(DECODERS) if r % 2 == 0 else list(DECODERS)[::-1]):
                    spec = LoaderSpec(batch_size=cfg.batch_size, img_size=cfg.img_size, device=cpu,
                                      workers=workers, seed=0, crop_scale=CROP_SCALE,
                                      mask_sampler=MaskSampler((cfg.img_size // 16) ** 2, 0.75, seed=0, device=cpu))
                    measured = measure_loader(STAGES[stage](DECODERS[decoder](source, spec)), spec,
                                              steps=cfg.batches * cfg.passes, warmup=cfg.warmup + 1,
                                              window=cfg.batches)
                    runs.setdefault(f"{side}", {}).setdefault(stage, {}).setdefault(decoder, []).append(measured)
                    print(f"{side:>4} px, {stage:>7}, {decoder:>5}: {measured['images_per_s']['median']:7.1f} "
                          f"images/s, {per_core(measured):6.0f} per busy core", flush=True)
    summary = {side: {stage: {decoder: dict(images_per_s=statistics.median(m["images_per_s"]["median"] for m in ms),
                                            images_per_s_per_core=statistics.median(per_core(m) for m in ms),
                                            rounds=ms)
                              for decoder, ms in by_decoder.items()}
                      for stage, by_decoder in by_stage.items()}
               for side, by_stage in runs.items()}
    # Each round's pair was measured back to back: a ratio is the median of the rounds' ratios.
    ratios = {stage: {side: statistics.median(per_core(c) / per_core(s) for c, s in
                                              zip(by_stage[stage]["crop"], by_stage[stage]["stock"]))
                      for side, by_stage in runs.items()}
              for stage in STAGES}
    for side, by_stage in summary.items():
        for stage, figures in by_stage.items():
            crop, stock = figures["crop"]["images_per_s_per_core"], figures["stock"]["images_per_s_per_core"]
            node = f" (a GPU of an 8-GPU node with {NODE_CORES_PER_GPU} cores: {crop * NODE_CORES_PER_GPU:.0f})" \
                if stage == "views" else ""
            print(f"{side:>4} px, {stage}: crop decode {crop:.0f} images/s per busy core{node}, stock {stock:.0f}; "
                  f"{ratios[stage][side]:.2f}x per core")
    return dict(device=device_name(cpu), commit=commit(), versions=versions("ffcv", "numba"),
                config=dict(max_res=sides, photos_per_class=cfg.photos_per_class, workers=workers,
                            batch_size=cfg.batch_size, img_size=cfg.img_size, warmup=cfg.warmup,
                            batches=cfg.batches, passes=cfg.passes, rounds=cfg.rounds, cpu_count=os.cpu_count()),
                decoders=summary, crop_decode_vs_stock_per_core=ratios["views"],
                crop_decode_vs_stock_per_core_with_cpu_normalising=ratios["batches"])


if __name__ == "__main__":
    main(CropDecodeBenchmark, benchmark_crop_decode)
