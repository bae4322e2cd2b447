"""Every comparison in one run: the training step (with MFU and the official-style step for the ratio),
on a GPU the step again under CUDA graphs and each Triton kernel, and for each loader engine the loader
alone and the real loop.

    python benchmarks/suite.py --data train.beton --engines torch,ffcv,dali --model supmae_vit_base_patch16 \\
        --batch-size 256

Writes benchmarks/results/<device>-<date>.json: `device`, `commit`, `versions`, a `summary` of the
headline figures and, beside it, every detailed figure. Without --data, the embedded dataset is
converted once to a .beton (JPEG, longest side 256) so that every engine reads the same file.
"""
import argparse
import datetime
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.kernels import benchmark_kernels  # noqa: E402
from benchmarks.step import benchmark_step, describe  # noqa: E402
from supmae.errors import SupmaeError  # noqa: E402
from supmae.measure import commit, device_name, versions, write_json  # noqa: E402
from supmae.pipelines.loader import ENGINES  # noqa: E402
from supmae.pipelines.synthetic import default_dataset  # noqa: E402
from supmae.profiler import ProfileOptions, profile  # noqa: E402
from supmae.train import PretrainConfig, resolve_device  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def embedded_beton() -> str:
    from supmae.pipelines.convert import ConvertOptions, convert
    folder = default_dataset()
    path = f"{folder}-256.beton"
    if not os.path.exists(path):
        convert(folder, path, ConvertOptions(max_resolution=256), progress=False, log=lambda *_: None)
    return path


def summarise(step: dict, engines: dict, kernels, cuda_graphs) -> dict:
    ceiling = step["images_per_s"]
    official = step["official"]["images_per_s"]["median"] if step["official"] else None
    per_engine = {e: {s: f["images_per_s"]["median"] for s, f in stages.items()} for e, stages in engines.items()}
    summary = dict(
        step_images_per_s=ceiling, official_step_images_per_s=official, step_vs_official=step["step_vs_official"],
        mfu=step["mfu"],
        loader_images_per_s={e: r["loader"] for e, r in per_engine.items()},
        end_to_end_images_per_s={e: r["end_to_end"] for e, r in per_engine.items()},
        end_to_end_fraction_of_step={e: r["end_to_end"] / ceiling for e, r in per_engine.items()},
        data_wait_fraction={e: stages["end_to_end"]["data_wait_fraction"] for e, stages in engines.items()})
    if cuda_graphs:
        summary["cuda_graphs_vs_default"] = cuda_graphs["images_per_s"] / ceiling
    if kernels:
        summary["kernel_fraction_of_copy_bandwidth"] = {
            name: k["fraction_of_copy_bandwidth"] for name, k in kernels["kernels"].items()}
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help=".beton read by every engine (default: the embedded dataset, converted once)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from " + ",".join(ENGINES))
    p.add_argument("--model", default="supmae_vit_base_patch16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores - 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps (batches) per measurement")
    p.add_argument("--window", type=int, default=4, help="steps per timing window")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="the JSON to write (default: benchmarks/results/<device>-<date>.json)")
    args = p.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    try:
        device = resolve_device(args.device)
        data = args.data or embedded_beton()
        print("step:", flush=True)
        step_options = dict(model_name=args.model, batch_size=args.batch_size, img_size=args.img_size, device=args.device,
                            warmup=args.warmup, steps=args.window, windows=max(1, args.steps // args.window))
        step = benchmark_step(**step_options, compile_mode="default")
        print(describe(step), flush=True)
        kernels = cuda_graphs = None
        if device.type == "cuda":
            print("step under CUDA graphs:", flush=True)
            cuda_graphs = benchmark_step(**step_options, compile_mode="reduce-overhead", official=False)
            print(describe(cuda_graphs), flush=True)
            print("kernels:", flush=True)
            kernels = benchmark_kernels(args.batch_size, args.img_size)
        results = {}
        for engine in engines:
            print(f"{engine} loader, alone and end to end:", flush=True)
            cfg = PretrainConfig(data=data, loader=engine, model=args.model, batch_size=args.batch_size,
                                 img_size=args.img_size, workers=args.workers, device=args.device, progress=False)
            options = ProfileOptions(steps=args.steps, warmup=args.warmup, window=args.window,
                                     stages=("loader", "end_to_end"))
            results[engine] = profile(cfg, options, log=lambda line: print("  " + line.replace("\n", "\n  ")))
    except SupmaeError as error:
        sys.exit(f"suite.py: error: {error}")

    summary = summarise(step, {e: r["stages"] for e, r in results.items()}, kernels, cuda_graphs)
    name = device_name(device)
    out = args.out or os.path.join(
        RESULTS, f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-{datetime.date.today().isoformat()}.json")
    write_json(out, dict(device=name, commit=commit(),
                         versions=versions("timm", "triton", "ffcv", "nvidia-dali-cuda130", "numba", "numpy"),
                         config=dict(vars(args), data=data, cuda=torch.cuda.is_available()),
                         summary=summary, step=step, cuda_graphs_step=cuda_graphs, kernels=kernels,
                         engines={e: r["stages"] for e, r in results.items()},
                         end_to_end_config=next(iter(results.values()))["config"] if results else None))
    print("summary:")
    for key, value in summary.items():
        print(f"  {key}: {value if not isinstance(value, float) else round(value, 3)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
