"""Training-step throughput on an on-device synthetic batch: no data loading, just the pretraining step (or,
with --finetune, fine-tuning's).

Reports images/s (median over timed windows after warm-up), the step's FLOPs as counted by PyTorch's
FLOP counter, and model FLOP utilisation against a matrix product measured in the same run; and, in
the same run, the official code's style of step (eager reference forward, fp16 + GradScaler on GPU,
a host sync per step), giving the speed-up as a ratio.

    python -m benchmarks.step --model supmae_vit_base_patch16 --batch-size 256 --json step.json
    python -m benchmarks.step --finetune --batch-size 128      # fine-tuning's step at the official recipe
    python -m benchmarks.step --sizes 128,160,192,224          # the step at each side, and a schedule's saving
"""
import functools
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, option, section
from supmae.evaluation import classifier
from supmae.evaluation.config import FinetuneConfig
from supmae.evaluation.finetune import FinetuneObjective, finetune_optimizer, mixed, mixer
from supmae.models.families import model_config, recipe_of
from supmae.models.fast import apply_kernels
from supmae.models.registry import build_model
from supmae.pipelines.batch import Batch
from supmae.pipelines.resolution import parse_resolution_schedule
from supmae.profiling.measure import commit, device_name, flops_of, matmul_rate, measure, sync, versions
from supmae.profiling.profiler import synthetic_batch
from supmae.runtime.hardware import (
    DTYPES,
    apply_compile,
    autocast_for,
    resolve_device,
    step_policy,
)
from supmae.training.config import PretrainConfig
from supmae.training.optim import build_optimizer
from supmae.training.step import text_inputs, train_step

# A ramp placed where FFCV's ResNet-50 ImageNet recipe places its own (160 -> 192 over epochs 65-76 of 88), over
# SupMAE's 400 epochs, ending at the side the model is evaluated at.
PROJECTED_SCHEDULE = "160-224@295-345"


@configuration
class StepBenchmark(Config):
    """Training-step throughput and MFU on an on-device synthetic batch, beside the official-style step."""
    run: PretrainConfig = section(PretrainConfig, ("hardware", "model and objective"), batch_size=256)
    warmup: int = option(3, "untimed steps first", at_least=0)
    steps: int = option(5, "steps per timed window", at_least=1)
    windows: int = option(5, "timed windows; the figure is their median", at_least=1)
    official: bool = option(True, "also time the official code's style of step, for the ratio")
    finetune: bool = option(False, "time fine-tuning's step (a timm ViT of --model's encoder at the official "
                                   "recipe, mixup and cutmix included) instead of pretraining's")
    breakdown: bool = option(False, "on a GPU, GPU time per step by kernel (profiler)")
    sizes: str = option("", "time pretraining's step at each of these image sides instead (e.g. 128,160,192,224), "
                            "with its counted FLOPs, and project --project's time from them", metavar="SIDES")
    project: str = option(PROJECTED_SCHEDULE, "with --sizes: the resolution schedule whose pretraining time, over "
                                              "the family's epochs, is projected against --img-size throughout",
                          metavar="SCHEDULE")
    json: str | None = option(None, "write the results here", metavar="FILE")


# Where a GPU step's time goes, by kernel name: (category, substrings of the kernel names it holds).
KERNEL_KINDS = (("supmae kernels", ("_gather_kernel", "_unshuffle_kernel", "_gather_rows_kernel", "_forward_kernel",
                                    "_backward_kernel")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas")),
                ("attention", ("flash", "fmha", "attention", "efficient")),
                ("optimizer", ("multi_tensor", "adam")),
                ("fused elementwise and norms (inductor)", ("triton_",)))


def kernel_breakdown(step, device: torch.device, *, steps: int = 3, top: int = 12) -> dict:
    """GPU time per step by kernel, from the profiler: each kind's share and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    kernels = [(e.key, e.self_device_time_total / steps / 1e3) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    total = sum(ms for _, ms in kernels)
    kinds = {}
    for name, ms in kernels:
        kind = next((k for k, marks in KERNEL_KINDS if any(m in name for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return dict(gpu_ms_per_step=total, by_kind={k: dict(ms=ms, share=ms / total) for k, ms in
                                                 sorted(kinds.items(), key=lambda kv: -kv[1])},
                top=[dict(kernel=name[:120], ms=ms, share=ms / total)
                     for name, ms in sorted(kernels, key=lambda r: -r[1])[:top]])


class Steps(NamedTuple):
    """What a step benchmark times: the fast step, the same step on the eager twins (whose FLOPs are counted:
    kernels move data, they add no arithmetic), the official code's style of step, and the images of one."""
    fast: Callable[[], object]
    counted: Callable[[], object]
    official: Callable[[], None]
    images: int


def _official_style(step_once: Callable[[torch.amp.GradScaler, object], torch.Tensor], device: torch.device,
                    on_gpu: bool) -> tuple[str, Callable[[], None]]:
    """The official code's way to run a step: eager, fp16 autocast with a GradScaler on a GPU (fp32 on a CPU,
    where fp16 matmuls are not a real option), and a host sync each step. `step_once(scaler, autocast)` runs
    the micro-batches and the optimizer step and returns the loss."""
    precision = "fp16" if on_gpu else "fp32"
    scaler, autocast = torch.amp.GradScaler(device.type, enabled=precision == "fp16"), autocast_for(device, precision)

    def step() -> None:
        step_once(scaler, autocast).item()
        sync(device)
    return precision, step


def _pretrain_steps(cfg: StepBenchmark, device: torch.device, precision: str, forward_of,
                    side: int | None = None) -> Steps:
    """Pretraining's step on `side` x `side` images (--img-size by default)."""
    run = cfg.run
    model = build_model(run.model, run, num_classes=1000).to(device).train()
    optimizer = build_optimizer(model, 1e-4, 0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    forward = forward_of(apply_kernels(model))  # the training loop's forward: Triton kernels on CUDA
    split = run.first_split()
    micro_batches = [synthetic_batch(model, batch_size=split.batch_size, num_classes=1000, device=device,
                                     side=side)] * split.accum
    official_optimizer = build_optimizer(model, 1e-4, 0.05, fused=False)

    def official(scaler, autocast) -> torch.Tensor:
        for micro in micro_batches:
            with autocast:
                loss = model(micro.images, micro.labels, masking=micro.masking, **text_inputs(micro)).loss
            scaler.scale(loss / len(micro_batches)).backward()
        scaler.step(official_optimizer)
        scaler.update()
        official_optimizer.zero_grad()
        return loss

    return Steps(lambda: train_step(forward, micro_batches, optimizer, scaler, autocast),
                 lambda: train_step(apply_kernels(model, "eager"), micro_batches, optimizer, scaler, autocast),
                 *_official_style(official, device, device.type == "cuda")[1:], split.size)


def _finetune_steps(cfg: StepBenchmark, device: torch.device, precision: str, forward_of) -> Steps:
    """The fine-tuning step at the official recipe (the model's family's drop path and layer decay, mixup
    and cutmix): a timm ViT of --model's encoder, supmae's way and the official code's way."""
    run, recipe = cfg.run, recipe_of(cfg.run.model)
    tune = FinetuneConfig.of(checkpoint=__file__, train=__file__, val=__file__, batch_size=run.batch_size)
    vit = classifier.timm_vit(run.model, run.trunk.img_size, 1000, recipe.finetune_drop_path).to(device).train()
    mix = mixer(tune, 1000)
    objective = FinetuneObjective(vit, tune.smoothing, mixing=mix is not None)
    forward = forward_of(objective)
    optimizer = finetune_optimizer(vit, 1e-4, tune.weight_decay, recipe.finetune_layer_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    size, split = run.trunk.img_size, run.first_split()
    images = torch.randn(run.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (run.batch_size,), device=device)

    def batches() -> list[Batch]:  # mixed afresh each step, as the loop mixes each batch
        return [mixed(Batch(images.clone(), labels, None), mix) for _ in range(split.accum)]

    official_optimizer = finetune_optimizer(vit, 1e-4, tune.weight_decay, recipe.finetune_layer_decay, fused=False)

    def official(scaler, autocast) -> torch.Tensor:
        for micro in batches():
            with autocast:
                loss = objective(micro.images, micro.labels).loss
            scaler.scale(loss / split.accum).backward()
        scaler.step(official_optimizer)
        scaler.update()
        official_optimizer.zero_grad()
        return loss

    return Steps(lambda: train_step(forward, batches(), optimizer, scaler, autocast),
                 lambda: train_step(objective, batches(), optimizer, scaler, autocast),
                 *_official_style(official, device, device.type == "cuda")[1:], split.size)


def _returning_nothing(step: Callable[[], object]) -> Callable[[], None]:
    """`step` as `measure` times it: what it returns would be read as seconds spent waiting for data."""
    def call() -> None:
        step()
    return call


def benchmark_step(cfg: StepBenchmark) -> dict:
    run = cfg.run
    device = resolve_device(run.hardware.device)
    on_gpu = device.type == "cuda"
    accum = run.first_split().accum
    precision, compiled, compile_mode = step_policy(device, run.hardware, accum_iter=accum)

    def forward_of(module):
        return apply_compile(module, compile_mode) if compiled else module
    if cfg.sizes:
        return _benchmark_sizes(cfg, device, precision, forward_of)
    steps = (_finetune_steps if cfg.finetune else _pretrain_steps)(cfg, device, precision, forward_of)
    images = steps.images
    timed = functools.partial(measure, device=device, steps=cfg.steps * cfg.windows, warmup=cfg.warmup,
                              window=cfg.steps)
    flops_per_step = flops_of(steps.counted)
    fast = timed(_returning_nothing(steps.fast), images)
    images_per_s = fast["images_per_s"]["median"]
    peak = matmul_rate(device, DTYPES[precision] or torch.float32, 8192 if on_gpu else 1024)
    kernels = kernel_breakdown(_returning_nothing(steps.fast), device) if cfg.breakdown and on_gpu else None
    reference = official = None
    if cfg.official:
        official = timed(steps.official, images)
        reference = dict(precision="fp16" if on_gpu else "fp32", **official)
    ratio = None if official is None else images_per_s / official["images_per_s"]["median"]
    return dict(
        device=device_name(device), commit=commit(), versions=versions("timm", "triton"),
        config=dict(model=run.model, step="finetune" if cfg.finetune else "pretrain", batch_size=run.batch_size,
                    accum_iter=accum, img_size=run.trunk.img_size, precision=precision,
                    compile=compiled, compile_mode=compile_mode, warmup=cfg.warmup, steps=cfg.steps,
                    windows=cfg.windows),
        images_per_s=images_per_s, step=fast,
        gflops_per_image=flops_per_step / images / 1e9, matmul_tflops=peak / 1e12,
        mfu=images_per_s * flops_per_step / images / peak,
        official=reference, kernel_breakdown=kernels,
        **{"finetune_step_vs_official" if cfg.finetune else "step_vs_official": ratio})


def _benchmark_sizes(cfg: StepBenchmark, device: torch.device, precision: str, forward_of) -> dict:
    """Pretraining's step at each side of --sizes (and of --project's schedule), one after another in one run,
    and --project's schedule timed from them: its time over the family's epochs against --img-size's."""
    run = cfg.run
    if cfg.finetune:
        raise SupmaeError("--sizes times pretraining's step; leave out --finetune")
    patch = model_config(run.model)["patch_size"]
    try:
        sides = [int(side) for side in cfg.sizes.split(",")]
    except ValueError:
        raise SupmaeError(f"--sizes {cfg.sizes!r} is not a comma-separated list of image sides") from None
    schedule = parse_resolution_schedule(cfg.project, patch)
    sides = sorted(set(sides) | set(schedule.sizes) | {run.trunk.img_size})
    by_size, flops = {}, {}
    for side in sides:
        if side % patch or not 0 < side <= run.trunk.img_size:
            raise SupmaeError(f"--sizes: {side} is not a multiple of the patch size {patch} up to --img-size "
                              f"{run.trunk.img_size}")
        steps = _pretrain_steps(cfg, device, precision, forward_of, side)
        flops[side] = flops_of(steps.counted) / steps.images / 1e9
        by_size[side] = measure(_returning_nothing(steps.fast), steps.images, device=device,
                                steps=cfg.steps * cfg.windows, warmup=cfg.warmup, window=cfg.steps)
        print(f"  {side}: {by_size[side]['images_per_s']['median']:.1f} images/s, {flops[side]:.1f} GFLOP/image",
              flush=True)
    rate = {side: r["images_per_s"]["median"] for side, r in by_size.items()}
    epochs = recipe_of(run.model).pretrain_epochs
    scheduled = sum(1 / rate[schedule.size_at(epoch)] for epoch in range(int(epochs)))
    fixed = epochs / rate[run.trunk.img_size]
    return dict(
        device=device_name(device), commit=commit(), versions=versions("timm", "triton"),
        config=dict(model=run.model, step="pretrain", batch_size=run.batch_size, accum_iter=run.first_split().accum,
                    img_size=run.trunk.img_size, precision=precision, warmup=cfg.warmup, steps=cfg.steps,
                    windows=cfg.windows),
        images_per_s_by_size={str(side): r for side, r in rate.items()},
        gflops_per_image_by_size={str(side): f for side, f in flops.items()}, steps_by_size=by_size,
        projection=dict(schedule=cfg.project, epochs=epochs, time_vs_fixed=scheduled / fixed,
                        speedup=fixed / scheduled))


def describe(result: dict) -> str:
    if "images_per_s_by_size" in result:
        c, p = result["config"], result["projection"]
        rates, flops = result["images_per_s_by_size"], result["gflops_per_image_by_size"]
        full = rates[str(c["img_size"])]
        lines = [f"{c['model']} batch {c['batch_size']} {c['precision']} on {result['device']}, by image side:"]
        lines += [f"  {side:>4}: {rate:8.1f} images/s ({rate / full:.2f}x {c['img_size']}), "
                  f"{flops[side]:.1f} GFLOP/image" for side, rate in rates.items()]
        lines.append(f"  {p['schedule']} over {p['epochs']:g} epochs: {p['time_vs_fixed']:.1%} of the time at "
                     f"{c['img_size']} throughout ({p['speedup']:.2f}x)")
        return "\n".join(lines)
    c, rates = result["config"], result["step"]["images_per_s"]
    compiled = f" compiled ({c['compile_mode']})" if c["compile"] else ""
    lines = [f"{c['model']} batch {c['batch_size']} {c['precision']}{compiled} on {result['device']}",
             f"  step: {rates['median']:.1f} images/s (median of {c['windows']}; min {rates['min']:.1f}, "
             f"max {rates['max']:.1f}; warm-up {result['step']['warmup_s']:.1f} s)",
             f"  {result['gflops_per_image']:.1f} GFLOP/image counted; matmul ceiling "
             f"{result['matmul_tflops']:.2f} TFLOP/s measured; MFU {result['mfu']:.1%}"]
    if result.get("kernel_breakdown"):
        k = result["kernel_breakdown"]
        lines.append(f"  GPU time per step {k['gpu_ms_per_step']:.1f} ms: " + ", ".join(
            f"{kind} {v['share']:.0%}" for kind, v in k["by_kind"].items()))
        lines += [f"    {row['ms']:7.3f} ms {row['share']:5.1%}  {row['kernel']}" for row in k["top"]]
    if result["official"]:
        ratio = result.get("finetune_step_vs_official") or result["step_vs_official"]
        lines.append(f"  official-style eager {result['official']['precision']} step: "
                     f"{result['official']['images_per_s']['median']:.1f} images/s; this step is "
                     f"{ratio:.2f}x that")
    return "\n".join(lines)


if __name__ == "__main__":
    main(StepBenchmark, benchmark_step, describe)
