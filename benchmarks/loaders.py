"""Loader throughput: images/s each engine delivers to the device (decode -> augment -> normalise -> mask),
with no model, on the same dataset, measured in one run so the engines can be compared as ratios.

    python benchmarks/loaders.py --data train.beton --engines torch,ffcv,dali --workers 8 --batch-size 256 \\
        --json loaders.json

Each engine gets a warm-up (start-up and JIT compilation are reported apart), then several timed passes;
the figure is the median pass, with min and max beside it, and the CPU utilisation during the passes.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import commit, device_name, sync, versions, write_json  # noqa: E402
from supmae.errors import SupmaeError  # noqa: E402
from supmae.pipelines.loader import ENGINES, LoaderSpec, create_loader  # noqa: E402
from supmae.pipelines.masking import MaskSampler  # noqa: E402
from supmae.pipelines.sources import open_source  # noqa: E402
from supmae.train import resolve_device  # noqa: E402


def measure(engine: str, source, spec: LoaderSpec, warmup: int, batches: int, passes: int) -> dict:
    device = torch.device(spec.device)
    start = time.perf_counter()
    stream = iter(create_loader(engine, source, spec))
    next(stream)
    sync(device)
    first_batch_s = time.perf_counter() - start
    for _ in range(warmup):
        next(stream)
    sync(device)
    rates = []
    psutil.cpu_percent(percpu=True)  # starts the utilisation window
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
        batch.images.sum().item()  # the last batch is on the device and normalised
        sync(device)
        rates.append(batches * spec.batch_size / (time.perf_counter() - start))
    per_core = psutil.cpu_percent(percpu=True)
    del stream
    gc.collect()
    return dict(images_per_s=statistics.median(rates), min=min(rates), max=max(rates), passes=rates,
                first_batch_s=first_batch_s, cpu_percent=sum(per_core) / len(per_core), cpu_percent_per_core=per_core)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help=".beton (every engine), image folder or file list (torch, dali)")
    p.add_argument("--engines", default="torch,ffcv,dali", help="comma-separated, from " + ",".join(ENGINES))
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="per engine")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches after the first")
    p.add_argument("--batches", type=int, default=20, help="batches per timed pass")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    try:
        device = resolve_device(args.device)
        source = open_source(args.data)
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        results = {}
        for engine in engines:
            spec = LoaderSpec(args.batch_size, args.img_size, MaskSampler((args.img_size // 16) ** 2, 0.75, 0, device),
                              device, workers=args.workers, seed=0)
            results[engine] = r = measure(engine, source, spec, args.warmup, args.batches, args.passes)
            print(f"{engine:>6}: {r['images_per_s']:8.1f} images/s (min {r['min']:.1f}, max {r['max']:.1f}); "
                  f"first batch {r['first_batch_s']:.1f} s; CPU {r['cpu_percent']:.0f}%", flush=True)
    except SupmaeError as error:
        sys.exit(f"loaders.py: error: {error}")
    baseline = results.get("torch")
    ratios = {f"{e}_vs_torch": r["images_per_s"] / baseline["images_per_s"]
              for e, r in results.items() if baseline and e != "torch"}
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    report = dict(device=device_name(device), commit=commit(),
                  versions=versions("ffcv", "nvidia-dali-cuda130", "pillow", "numba"),
                  config=dict(data=os.path.abspath(args.data), num_samples=len(source), workers=args.workers,
                              batch_size=args.batch_size, img_size=args.img_size, warmup=args.warmup,
                              batches=args.batches, passes=args.passes, cpu_count=os.cpu_count()),
                  engines=results, ratios=ratios)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
