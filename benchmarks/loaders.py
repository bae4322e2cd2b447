"""Loader throughput: images/s each engine delivers to the device (decode -> augment -> normalise -> mask),
with no model, on the same dataset, measured in one run so the engines can be compared as ratios. On
image-text data each engine is also measured delivering the captions' tokens and text masks, and with
--augment under fine-tuning's RandAugment and random erasing, each beside the same engine without them.

    python -m benchmarks.loaders --data train.beton --engines torch,ffcv,dali --workers 8 --batch-size 256 \\
        --json loaders.json

Each engine gets a warm-up (start-up and JIT compilation are reported apart), then several timed passes;
the figure is the median pass, with min and max beside it, and the CPU utilisation during the passes
(with --rounds, the median of the rounds, which take the engines in turn).
"""
import os
import statistics
import sys

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from benchmarks.photos import photo_beton
from supmae.core.options import Config, configuration, items, option, section
from supmae.evaluation.config import FinetuneConfig
from supmae.pipelines.engines import ENGINES
from supmae.pipelines.loader import LoaderSpec, create_loader
from supmae.pipelines.masking import MaskSampler, TextMaskSampler
from supmae.pipelines.sources import open_source
from supmae.pipelines.synthetic import default_dataset
from supmae.pipelines.text import special_tokens
from supmae.profiling.measure import commit, device_name, versions
from supmae.profiling.profiler import measure_loader
from supmae.runtime.hardware import loader_workers, resolve_device
from supmae.training.config import PretrainConfig

FINETUNE_RAND_AUGMENT, FINETUNE_ERASE = FinetuneConfig.aa, FinetuneConfig.reprob
NODE_CORES_PER_GPU = 14  # an 8-GPU node with 112 cores


def per_core(measured: dict) -> float:
    """Images/s per core the engine kept busy: its own process tree's CPU time over the timed passes (as the
    profiler counts it: `cpu_percent` is its share of all the machine's cores)."""
    busy = measured["cpu_percent"] / 100 * len(measured["cpu_percent_per_core"])
    return measured["images_per_s"]["median"] / max(busy, 1e-9)


@configuration
class LoaderBenchmark(Config):
    """Images/s each loader engine delivers to the device, with no model, on one dataset in one run."""
    run: PretrainConfig = section(PretrainConfig, ("data", "order", "os_cache", "workers", "seed", "device",
                                                   "batch_size", "img_size", "mask_ratio"), batch_size=256,
                                  mask_ratio=0.75)
    engines: str = option(",".join(ENGINES), "the engines to measure, comma-separated", choices=tuple(ENGINES),
                          listed=True)
    warmup: int = option(5, "untimed batches after the first", at_least=0)
    batches: int = option(20, "batches per timed pass", at_least=1)
    passes: int = option(5, "timed passes; the figure is their median", at_least=1)
    rounds: int = option(1, "rounds over every engine and setting, in turn, so a slow spell of the machine falls on "
                            "all of them; the figure is the median round", at_least=1)
    augment: bool = option(False, "also measure each engine with fine-tuning's augmentation (RandAugment "
                                  f"{FINETUNE_RAND_AUGMENT}, random erasing {FINETUNE_ERASE}), beside it without")
    corpus: str = option("synthetic", "without --data: the embedded synthetic dataset, or photos (ImageNet-like "
                                      "JPEGs made from scikit-image's photographs, as a .beton)",
                         choices=("synthetic", "photos"))
    photos_per_class: int = option(250, "photos: images per class (8 classes)", at_least=1)
    max_res: int = option(320, "photos: the .beton's longest side", flag="--max-res", metavar="PIXELS", at_least=8)
    json: str | None = option(None, "write the results here", metavar="FILE")


def benchmark_loaders(cfg: LoaderBenchmark) -> dict:
    run = cfg.run
    device = resolve_device(run.hardware.device)
    workers = loader_workers(run.workers)
    data = run.data or (photo_beton(cfg.photos_per_class, cfg.max_res, workers) if cfg.corpus == "photos"
                        else default_dataset())
    source = open_source(data)
    patches = (run.trunk.img_size // 16) ** 2
    results = {}
    # Each engine is read in every setting, in turn: plain, with its captions' tokens (image-text data), with
    # fine-tuning's augmentation (--augment). Every other round takes an engine's settings in the other order:
    # the second of two loaders built back to back can run slower while the first one's workers wind down.
    settings = ["images"] + (["text"] if source.captioned else []) + (["augment"] if cfg.augment else [])
    for engine, setting in [(e, s) for r in range(cfg.rounds) for e in items(cfg.engines)
                            for s in (settings if r % 2 == 0 else settings[::-1])]:
        text = setting == "text"
        text_masks = TextMaskSampler(run.clip.text_mask_ratio, special=special_tokens(), seed=run.seed,
                                     device=device) if text else None
        augment = setting == "augment"
        spec = LoaderSpec(batch_size=run.batch_size, img_size=run.trunk.img_size, device=device, workers=workers,
                          mask_sampler=MaskSampler(patches, run.effective("mask_ratio"), seed=run.seed, device=device),
                          seed=run.seed, order=run.order, os_cache=run.os_cache, text=text,
                          text_mask_sampler=text_masks,
                          rand_augment=FINETUNE_RAND_AUGMENT if augment else "",
                          erase=FINETUNE_ERASE if augment else 0.0)
        name = engine if setting == "images" else f"{engine}+{setting}"
        r = measure_loader(create_loader(engine, source, spec), spec, steps=cfg.batches * cfg.passes,
                           warmup=cfg.warmup + 1, window=cfg.batches)
        results.setdefault(name, dict(rounds=[]))["rounds"].append(r)
        rate = r["images_per_s"]
        print(f"{name:>13}: {rate['median']:8.1f} images/s (min {rate['min']:.1f}, max {rate['max']:.1f}); "
              f"first batch {r['first_call_s']:.1f} s; CPU {r['cpu_percent']:.0f}%, "
              f"{per_core(r):.0f} images/s per busy core", flush=True)
    for r in results.values():
        r["images_per_s"] = statistics.median(run["images_per_s"]["median"] for run in r["rounds"])
        r["images_per_s_per_core"] = statistics.median(per_core(run) for run in r["rounds"])
    baseline = results.get("torch")
    ratios = {f"{e}_vs_torch": r["images_per_s"] / baseline["images_per_s"]
              for e, r in results.items() if baseline and e != "torch" and "+" not in e}
    if baseline and "torch+augment" in results:
        ratios.update({f"{e}_augment_vs_torch_augment": results[f"{e}+augment"]["images_per_s"]
                       / results["torch+augment"]["images_per_s"]
                       for e in items(cfg.engines) if e != "torch" and f"{e}+augment" in results})
    # A setting and the plain images are compared round by round, each pair measured back to back.
    ratios.update({f"{e}_{setting}_vs_images": statistics.median(
        t["images_per_s"]["median"] / i["images_per_s"]["median"]
        for t, i in zip(results[f"{e}+{setting}"]["rounds"], results[e]["rounds"]))
        for e in items(cfg.engines) for setting in settings[1:] if f"{e}+{setting}" in results})
    for name, r in results.items():
        print(f"{name:>13}: {r['images_per_s']:8.1f} images/s, {r['images_per_s_per_core']:.0f} per busy core "
              f"(a GPU of an 8-GPU node with {NODE_CORES_PER_GPU} cores each: "
              f"{r['images_per_s_per_core'] * NODE_CORES_PER_GPU:.0f}), the median of {len(r['rounds'])} round(s)")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x", flush=True)
    return dict(device=device_name(device), commit=commit(),
                versions=versions("ffcv", "nvidia-dali-cuda130", "pillow", "numba"),
                config=dict(data=os.path.abspath(data), corpus=None if run.data else cfg.corpus,
                            max_res=cfg.max_res if cfg.corpus == "photos" and not run.data else None,
                            num_samples=len(source), workers=workers,
                            batch_size=run.batch_size, img_size=run.trunk.img_size, warmup=cfg.warmup,
                            batches=cfg.batches, passes=cfg.passes, rounds=cfg.rounds, cpu_count=os.cpu_count()),
                engines=results, ratios=ratios)


if __name__ == "__main__":
    main(LoaderBenchmark, benchmark_loaders)
