"""Training-step throughput on an on-device synthetic batch: no data loading, just the SupMAE step.

Reports images/s (median over timed windows after warm-up), the step's FLOPs as counted by PyTorch's
FLOP counter, and model FLOP utilisation against a matrix product measured in the same run; and, in
the same run, the official code's style of step (eager reference forward, fp16 + GradScaler on GPU,
a host sync per step), giving the speed-up as a ratio.

    python -m benchmarks.step --model supmae_vit_base_patch16 --batch-size 256 --json step.json
"""
import functools

import torch

from benchmarks import main
from supmae.core.options import Config, configuration, option, section
from supmae.models.fast import apply_kernels
from supmae.models.registry import build_model
from supmae.profiling.measure import commit, device_name, flops_of, matmul_rate, measure, sync, versions
from supmae.profiling.profiler import synthetic_batch
from supmae.runtime.hardware import (
    DTYPES,
    apply_compile,
    autocast_for,
    compile_mode_for,
    resolve_device,
    speed_defaults,
)
from supmae.training.config import PretrainConfig
from supmae.training.optim import build_optimizer
from supmae.training.step import text_inputs, train_step


@configuration
class StepBenchmark(Config):
    """Training-step throughput and MFU on an on-device synthetic batch, beside the official-style step."""
    run: PretrainConfig = section(PretrainConfig, ("hardware", "model and objective"), batch_size=256)
    warmup: int = option(3, "untimed steps first", at_least=0)
    steps: int = option(5, "steps per timed window", at_least=1)
    windows: int = option(5, "timed windows; the figure is their median", at_least=1)
    official: bool = option(True, "also time the official code's style of step, for the ratio")
    breakdown: bool = option(False, "on a GPU, GPU time per step by kernel (profiler)")
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


def benchmark_step(cfg: StepBenchmark) -> dict:
    run = cfg.run
    device = resolve_device(run.device)
    on_gpu = device.type == "cuda"
    precision, compiled = speed_defaults(device, run.precision, run.compile)
    compile_mode = compile_mode_for(run.compile_mode, device, accum_iter=run.accum_iter)
    batch_size, img_size = run.batch_size, run.trunk.img_size
    model = build_model(run.model, run, num_classes=1000).to(device).train()
    optimizer = build_optimizer(model, 1e-4, 0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    forward = apply_kernels(model)  # the training loop's forward: Triton kernels on CUDA
    forward = apply_compile(forward, compile_mode) if compiled else forward
    batch = synthetic_batch(model, batch_size=batch_size, num_classes=1000, device=device)
    micro_batches = [batch] * run.accum_iter
    images = batch_size * run.accum_iter
    timed = functools.partial(measure, device=device, steps=cfg.steps * cfg.windows, warmup=cfg.warmup,
                              window=cfg.steps)

    def step():
        train_step(forward, micro_batches, optimizer, scaler, autocast)

    # Counted on the eager twins of the same path: the kernels add data movement, not arithmetic.
    flops_per_step = flops_of(lambda: train_step(apply_kernels(model, "eager"), micro_batches, optimizer, scaler,
                                                 autocast))
    fast = timed(step, images)
    images_per_s = fast["images_per_s"]["median"]
    peak = matmul_rate(device, DTYPES[precision] or torch.float32, 8192 if on_gpu else 1024)
    kernels = kernel_breakdown(step, device) if cfg.breakdown and on_gpu else None

    reference = official = None
    if cfg.official:
        # The official code's step: the reference forward, eager, fp16 autocast with a GradScaler on GPU
        # (fp32 on CPU, where fp16 matmuls are not a real option), unfused AdamW, and a host sync per step.
        official_precision = "fp16" if on_gpu else "fp32"
        official_scaler = torch.amp.GradScaler(device.type, enabled=official_precision == "fp16")
        official_optimizer = build_optimizer(model, 1e-4, 0.05, fused=False)
        official_autocast = autocast_for(device, official_precision)

        def official_step():
            for micro in micro_batches:
                with official_autocast:
                    loss = model(micro.images, micro.labels, masking=micro.masking, **text_inputs(micro)).loss
                official_scaler.scale(loss / len(micro_batches)).backward()
            official_scaler.step(official_optimizer)
            official_scaler.update()
            official_optimizer.zero_grad()
            loss.item()
            sync(device)

        official = timed(official_step, images)
        reference = dict(precision=official_precision, **official)

    return dict(
        device=device_name(device), commit=commit(), versions=versions("timm", "triton"),
        config=dict(model=run.model, batch_size=batch_size, accum_iter=run.accum_iter, img_size=img_size,
                    precision=precision, compile=compiled, compile_mode=compile_mode, warmup=cfg.warmup,
                    steps=cfg.steps, windows=cfg.windows),
        images_per_s=images_per_s, step=fast,
        gflops_per_image=flops_per_step / images / 1e9, matmul_tflops=peak / 1e12,
        mfu=images_per_s * flops_per_step / images / peak,
        official=reference,
        step_vs_official=None if official is None else images_per_s / official["images_per_s"]["median"],
        kernel_breakdown=kernels)


def describe(result: dict) -> str:
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
        lines.append(f"  official-style eager {result['official']['precision']} step: "
                     f"{result['official']['images_per_s']['median']:.1f} images/s; this step is "
                     f"{result['step_vs_official']:.2f}x that")
    return "\n".join(lines)


if __name__ == "__main__":
    main(StepBenchmark, benchmark_step, describe)
