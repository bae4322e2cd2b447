"""FLIP against CLIP: the training step's images/s with the image tower on every patch (CLIP) and on the
visible ones only (FLIP, mask ratio 0.5 by default), same model, batch and text tower, in one run.

    python -m benchmarks.flip --model clip_vit_small_patch16 --batch-size 16 --rounds 3

Each round times both in turn (the order alternating round by round); the figure is the median of the
rounds' ratios. FLOPs are counted as the step benchmark counts them.
"""
import os
import statistics
import sys

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from benchmarks.step import StepBenchmark, benchmark_step
from supmae.core.options import Config, configuration, option, section
from supmae.training.config import PretrainConfig


@configuration
class FlipBenchmark(Config):
    """The step of a CLIP model with and without FLIP's masking, measured in turn."""
    run: PretrainConfig = section(PretrainConfig, ("hardware", "model", "batch_size", "img_size"),
                                  model="clip_vit_small_patch16", batch_size=16)
    mask_ratio: float = option(0.5, "FLIP's share of patches removed", above=0, below=1)
    warmup: int = option(1, "untimed steps first, per measurement", at_least=0)
    steps: int = option(2, "steps per timed window", at_least=1)
    windows: int = option(3, "timed windows per measurement", at_least=1)
    rounds: int = option(3, "rounds of both, in alternating order", at_least=1)
    json: str | None = option(None, "write the results here", metavar="FILE")


def benchmark_flip(cfg: FlipBenchmark) -> dict:
    run = cfg.run
    measured = {"clip": [], "flip": []}
    for r in range(cfg.rounds):
        for kind in ("clip", "flip") if r % 2 == 0 else ("flip", "clip"):
            step = StepBenchmark.build(dict(
                model=run.model, batch_size=run.batch_size, img_size=run.trunk.img_size, device=run.hardware.device,
                precision=run.hardware.precision, compile=run.hardware.compile,
                compile_mode=run.hardware.compile_mode,
                mask_ratio=cfg.mask_ratio if kind == "flip" else 0.0, warmup=cfg.warmup, steps=cfg.steps,
                windows=cfg.windows, official=False))
            measured[kind].append(result := benchmark_step(step))
            print(f"round {r + 1} {kind}: {result['images_per_s']:.1f} images/s, "
                  f"{result['gflops_per_image']:.1f} GFLOP/image", flush=True)
    ratios = [f["images_per_s"] / c["images_per_s"] for c, f in zip(measured["clip"], measured["flip"])]
    first = measured["clip"][0]
    return dict(device=first["device"], commit=first["commit"], versions=first["versions"],
                config=dict(model=run.model, batch_size=run.batch_size, img_size=run.trunk.img_size,
                            mask_ratio=cfg.mask_ratio, rounds=cfg.rounds),
                clip_images_per_s=[m["images_per_s"] for m in measured["clip"]],
                flip_images_per_s=[m["images_per_s"] for m in measured["flip"]],
                gflops_per_image=dict(clip=first["gflops_per_image"], flip=measured["flip"][0]["gflops_per_image"]),
                flip_vs_clip=statistics.median(ratios), round_ratios=ratios)


if __name__ == "__main__":
    main(FlipBenchmark, benchmark_flip,
         lambda report: f"FLIP (mask ratio {report['config']['mask_ratio']}) / CLIP: {report['flip_vs_clip']:.2f}x")
