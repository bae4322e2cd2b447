"""Loader throughput: images/s each engine delivers to the device (decode -> augment -> normalise -> mask),
with no model, on the same dataset, measured in one run so the engines can be compared as ratios.

    python benchmarks/loaders.py --data train.beton --engines torch,ffcv,dali --workers 8 --batch-size 256 \\
        --json loaders.json

Each engine gets a warm-up (start-up and JIT compilation are reported apart), then several timed passes;
the figure is the median pass, with min and max beside it, and the CPU utilisation during the passes.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from supmae.errors import SupmaeError  # noqa: E402
from supmae.measure import commit, device_name, versions, write_json  # noqa: E402
from supmae.pipelines.loader import ENGINES, LoaderSpec  # noqa: E402
from supmae.pipelines.masking import MaskSampler  # noqa: E402
from supmae.pipelines.sources import open_source  # noqa: E402
from supmae.profiler import ProfileOptions, measure_loader  # noqa: E402
from supmae.train import resolve_device  # noqa: E402


def benchmark_loaders(data: str, engines: list[str], workers: int, batch_size: int = 256, img_size: int = 224,
                      device: str = "auto", warmup: int = 5, batches: int = 20, passes: int = 5, log=print) -> dict:
    device = resolve_device(device)
    source = open_source(data)
    timing = ProfileOptions(steps=batches * passes, warmup=warmup + 1, window=batches)
    results = {}
    for engine in engines:
        spec = LoaderSpec(batch_size, img_size, MaskSampler((img_size // 16) ** 2, 0.75, 0, device), device,
                          workers=workers, seed=0)
        results[engine] = r = measure_loader(engine, source, spec, timing)
        rate = r["images_per_s"]
        log(f"{engine:>6}: {rate['median']:8.1f} images/s (min {rate['min']:.1f}, max {rate['max']:.1f}); "
            f"first batch {r['first_call_s']:.1f} s; CPU {r['cpu_percent']:.0f}%")
    baseline = results.get("torch")
    ratios = {f"{e}_vs_torch": r["images_per_s"]["median"] / baseline["images_per_s"]["median"]
              for e, r in results.items() if baseline and e != "torch"}
    for name, ratio in ratios.items():
        log(f"{name}: {ratio:.2f}x")
    return dict(device=device_name(device), commit=commit(),
                versions=versions("ffcv", "nvidia-dali-cuda130", "pillow", "numba"),
                config=dict(data=os.path.abspath(data), num_samples=len(source), workers=workers,
                            batch_size=batch_size, img_size=img_size, warmup=warmup, batches=batches, passes=passes,
                            cpu_count=os.cpu_count()),
                engines=results, ratios=ratios)


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
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    try:
        report = benchmark_loaders(args.data, engines, args.workers, args.batch_size, args.img_size, args.device,
                                   args.warmup, args.batches, args.passes)
    except SupmaeError as error:
        sys.exit(f"loaders.py: error: {error}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
