"""`supmae profile`: where a run's images/s go, and what bounds it.

Three stages are measured in one process, each after its own warm-up, with the same configuration the
run would use: the loader alone (batches delivered to the device, no model), the step alone (the
training step on an on-device synthetic batch: the run's ceiling), and end to end (the real loop).
The verdict names the slower of loader and step, by how much, and the levers that would move it; the
report is a terminal table, a JSON file and two plots.
"""
import functools
import logging
import os
import time
from collections.abc import Iterable

import torch

from supmae.core.atomic import write_json
from supmae.models.fast import apply_kernels
from supmae.models.trunk import MaskedViT
from supmae.pipelines.batch import Batch
from supmae.pipelines.loader import LoaderSpec, buffered_batches, create_loader, open_batches
from supmae.pipelines.text import CONTEXT, special_tokens
from supmae.profiling.config import ProfileConfig
from supmae.profiling.measure import commit, device_name, flops_of, matmul_rate, measure, versions
from supmae.runtime.hardware import DTYPES, autocast_for
from supmae.training.run import Run
from supmae.training.step import train_step

logger = logging.getLogger(__name__)
LABELS = dict(loader="loader alone", step="step alone", end_to_end="end to end")


def synthetic_batch(model: MaskedViT, *, batch_size: int, num_classes: int, device: torch.device,
                    caption_tokens: int = 20, side: int | None = None) -> Batch:
    """A normalised random batch with what `model` trains on (labels, a patch mask, captions of
    `caption_tokens` random tokens and their text mask), made on the device: the step with no loader.
    `side`: the images' side (the model's img_size by default), the mask drawn over its grid."""
    img_size = side or model.img_size
    masks, text_masks = model.mask_samplers(seed=0, device=device)
    tokens = None
    if model.uses_text:
        start, end = special_tokens()
        tokens = torch.zeros(batch_size, CONTEXT, dtype=torch.long, device=device)
        tokens[:, 0], tokens[:, caption_tokens + 1] = start, end
        tokens[:, 1:caption_tokens + 1] = torch.randint(1, start, (batch_size, caption_tokens), device=device)
    return Batch(torch.randn(batch_size, 3, img_size, img_size, device=device),
                 torch.randint(0, max(1, num_classes), (batch_size,), device=device),
                 masks(batch_size, 0, (img_size // model.patch_size) ** 2) if masks else None, tokens,
                 text_masks(tokens, 0) if text_masks is not None and tokens is not None else None)


def measure_loader(loader: Iterable, spec: LoaderSpec, *, steps: int, warmup: int, window: int) -> dict:
    """The loader alone (an engine: batches delivered to the device, normalised and masked), with no model. Its
    warm-up drains what the workers prepared while it started, so the figure is the rate, not the buffer."""
    with open_batches(loader) as batches:
        def next_batch() -> None:
            next(batches)
        return measure(next_batch, spec.batch_size, device=spec.device, steps=steps,
                       warmup=max(warmup, buffered_batches(spec)), window=window)


def _stage(run: Run, stage: str, options: ProfileConfig) -> dict:
    """One stage's figures, with the image side it ran at (each step's, end to end: a resolution schedule may
    change it between epochs)."""
    spec = run.loader_spec()
    side = spec.side(spec.start // spec.schedule(len(run.source)).batches_per_epoch)  # the next batch's epoch
    if stage == "loader":
        return dict(measure_loader(create_loader(run.engine, run.source, spec), spec, steps=options.steps,
                                   warmup=options.warmup, window=options.window), img_size=side)
    autocast = autocast_for(run.device, run.precision)
    timed = functools.partial(measure, device=run.device, steps=options.steps, warmup=options.warmup,
                              window=options.window)
    if stage == "step":
        batch = synthetic_batch(run.model, batch_size=run.split.batch_size, num_classes=len(run.source.classes),
                                device=run.device, side=side)

        def synthetic_step(forward=run.forward) -> None:
            train_step(forward, [batch] * run.split.accum, run.optimizer, run.scaler, autocast)
        # Counted on the eager twins of the same path: the kernels add data movement, not arithmetic.
        flops = flops_of(lambda: synthetic_step(apply_kernels(run.model, "eager"))) / run.split.size
        figures = timed(synthetic_step, run.split.size)
        peak = matmul_rate(run.device, DTYPES[run.precision] or torch.float32,
                           8192 if run.device.type == "cuda" else 1024)
        return dict(figures, gflops_per_image=flops / 1e9, matmul_tflops=peak / 1e12,
                    mfu=figures["images_per_s"]["median"] * flops / peak, img_size=side)
    sides = []
    with open_batches(run.loader()) as batches:
        def step() -> float:
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(run.split.accum)]
            waited = time.perf_counter() - start
            sides.append(micro_batches[-1].images.shape[-1])
            train_step(run.forward, micro_batches, run.optimizer, run.scaler, autocast)
            return waited
        figures = timed(step, run.split.size)
    return dict(figures, img_size_by_step=sides)


def _workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def _rate(images_per_s: float) -> str:
    return f"{images_per_s / 1000:.1f}k" if images_per_s >= 1000 else f"{images_per_s:.1f}"


def _either(levers: list[str]) -> str:
    return levers[0] if len(levers) == 1 else ", ".join(levers[:-1]) + " or " + levers[-1]


def verdict(stages: dict, run: Run) -> dict:
    """Which of loader and step bounds the run, by how much, and what would move it."""
    on_gpu = run.device.type == "cuda"
    loader, step = (stages[s]["images_per_s"]["median"] for s in ("loader", "step"))
    if loader < step:
        levers = {"torch": ["convert to a .beton for --loader ffcv"], "ffcv": ["try --loader dali"],
                  "dali": ["use --loader ffcv"]}.get(run.engine, [])
        levers.append("store the data at a lower resolution (supmae convert --max-res)")
        own, machine = stages["loader"]["cpu_percent"], stages["loader"]["machine_cpu_percent"]
        levers.append(f"add workers (--workers, now {run.workers})" if own < 85 else
                      f"give it more CPU cores (its {_workers(run.workers)} keep them {own:.0f}% busy)")
        if machine - own > 25:  # the loader shares the cores: its figures are lower than they would be alone
            levers.append(f"free the cores other processes use (they keep {machine - own:.0f}% of the CPU busy)")
        bound, text = "loader", (f"loader-bound: the step could do {_rate(step)} img/s, the loader gives "
                                 f"{_rate(loader)} ({loader / step:.0%} of it) — {_either(levers)}")
    else:
        levers = [] if on_gpu else ["train on a GPU"]
        if not run.compile:
            levers.append("turn on --compile")
        elif on_gpu and run.compile_mode == "default":
            levers.append("try --compile-mode reduce-overhead (CUDA graphs)")
        if on_gpu and run.precision == "fp32":
            levers.append("use --precision bf16")
        if on_gpu:
            memory = stages["step"]
            levers.append(f"raise --batch-size while memory allows (peak {memory['gpu_memory_peak_gib']:.1f} of "
                          f"{memory['gpu_memory_total_gib']:.0f} GiB)")
        levers.append("pick a smaller --model")
        bound, text = "step", (f"step-bound: the loader gives {_rate(loader)} img/s, {loader / step:.1f}x what the "
                               f"step takes ({_rate(step)} img/s) — {_either(levers)}")
    result = dict(bound=bound, loader_vs_step=loader / step, text=text)
    if "end_to_end" in stages:
        end = stages["end_to_end"]
        result["end_to_end_fraction_of_step"] = fraction = end["images_per_s"]["median"] / step
        result["text"] += (f". End to end: {_rate(end['images_per_s']['median'])} img/s, {fraction:.0%} of the step "
                           f"alone, waiting on data {end['data_wait_fraction']:.0%} of the time")
        if end["images_per_s"]["median"] < 0.8 * min(loader, step):
            result["text"] += (" — well under both stages alone: the loader's workers and the step compete for "
                               + ("the CPU cores" if not on_gpu else "the host (check the loader's CPU use)"))
    return result


def profile(options: ProfileConfig) -> dict:
    """Measure the stages, log the table and verdict, write the JSON and plots; returns the report."""
    cfg = options.run
    run = Run(cfg, checkpoints=False)
    run.model.train()
    out = options.out or time.strftime("runs/profile-%Y%m%d-%H%M%S")
    logger.info(f"profiling {cfg.model}, batch {run.split.size}, {run.engine} loader ({_workers(run.workers)}) on "
        f"{device_name(run.device)}, {run.speed}: {options.steps} steps per stage after {options.warmup} warm-up")
    stages = {}
    for stage in options.stage_list:
        stages[stage] = _stage(run, stage, options)
        logger.info(f"  {LABELS[stage]}: {_rate(stages[stage]['images_per_s']['median'])} img/s")
    report = dict(
        device=device_name(run.device), commit=commit(),
        versions=versions("timm", "triton", "ffcv", "nvidia-dali-cuda130", "numpy", "psutil"),
        config=dict(run=dict(run.resolved_options(), device=str(run.device), precision=run.precision,
                             compile=run.compile, compile_mode=run.compile_mode, workers=run.workers),
                    profile={opt.name: getattr(options, opt.name) for opt in options.own_options()}),
        stages=stages)
    if "loader" in stages and "step" in stages:
        report["verdict"] = verdict(stages, run)
    logger.info(table(report))
    written = [os.path.join(out, "profile.json")]
    write_json(written[0], report)
    written += plot(report, out)
    if options.json:
        write_json(options.json, report)
        written.append(options.json)
    logger.info("wrote " + ", ".join(written))
    return report


def table(report: dict) -> str:
    on_gpu = "gpu_memory_peak_gib" in next(iter(report["stages"].values()))
    head = f"{'stage':<14}{'images/s':>10}{'min':>10}{'max':>10}{'first call':>12}{'data wait':>11}{'CPU':>6}" \
           f"{'memory':>10}" + (f"{'GPU':>6}{'GPU mem':>10}" if on_gpu else "")
    lines = [head]
    for stage, f in report["stages"].items():
        rate = f["images_per_s"]
        wait = f"{f['data_wait_fraction']:.0%}" if stage == "end_to_end" else "-"
        line = (f"{LABELS[stage]:<14}{rate['median']:>10.1f}{rate['min']:>10.1f}{rate['max']:>10.1f}"
                f"{f['first_call_s']:>10.1f} s{wait:>11}{f['cpu_percent']:>5.0f}%{f['rss_gib']:>6.1f} GiB")
        if on_gpu:
            util = f["gpu_utilization_percent"]
            line += f"{'-' if util is None else f'{util:.0f}%':>6}{f['gpu_memory_peak_gib']:>6.1f} GiB"
        lines.append(line)
    if "step" in report["stages"]:
        step = report["stages"]["step"]
        lines.append(f"step: {step['gflops_per_image']:.1f} GFLOP/image counted, MFU {step['mfu']:.1%} of a measured "
                     f"matrix product ({step['matmul_tflops']:.2f} TFLOP/s)")
    if "verdict" in report:
        lines.append(report["verdict"]["text"])
    return "\n".join(lines)


def _scale(ax, values: list[float]) -> None:
    # Stages often differ by orders of magnitude (a CPU step against a loader); a linear axis would
    # flatten the slow ones to nothing.
    if max(values) > 10 * min(values):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)


def plot(report: dict, out: str) -> list[str]:
    """images/s over time per stage, and the stages against the step's ceiling, as PNGs in `out`."""
    from matplotlib.figure import Figure  # no pyplot: no display backend, no global state

    os.makedirs(out, exist_ok=True)
    stages, title = report["stages"], f"{report['config']['run']['model']} on {report['device']}"
    over_time = Figure(figsize=(8, 4.5), layout="constrained")
    ax = over_time.subplots()
    for stage, f in stages.items():
        ax.plot([w["end_s"] for w in f["windows"]], [w["images_per_s"] for w in f["windows"]], marker="o",
                label=LABELS[stage])
    ax.set(xlabel="seconds into the stage's timed part", ylabel="images/s", title=title)
    _scale(ax, [w["images_per_s"] for f in stages.values() for w in f["windows"]])
    ax.grid(alpha=0.3, which="both")
    ax.legend()

    bars = Figure(figsize=(6, 4.5), layout="constrained")
    ax = bars.subplots()
    names = list(stages)
    medians = [stages[s]["images_per_s"]["median"] for s in names]
    spread = [[m - stages[s]["images_per_s"]["min"] for s, m in zip(names, medians)],
              [stages[s]["images_per_s"]["max"] - m for s, m in zip(names, medians)]]
    drawn = ax.bar([LABELS[s] for s in names], medians, yerr=spread, capsize=6, color="tab:blue")
    ax.bar_label(drawn, [_rate(m) for m in medians], label_type="center", color="white")
    _scale(ax, [stages[s]["images_per_s"][k] for s in names for k in ("min", "max")])
    if "step" in stages:
        ax.axhline(stages["step"]["images_per_s"]["median"], color="tab:red", linestyle="--", label="step ceiling")
        ax.legend()
    ax.set(ylabel="images/s (median; bars: min to max)", title=title)

    paths = [os.path.join(out, "images_per_s.png"), os.path.join(out, "stages.png")]
    for figure, path in zip((over_time, bars), paths):
        figure.savefig(path, dpi=120)
    return paths
