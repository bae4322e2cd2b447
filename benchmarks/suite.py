"""Every check and measurement of supmae's speed in one command, with a pass/fail table: the GPU check.

    bash scripts/gpu-check.sh --budget 480   # = python -m benchmarks.suite [--quick] [--data X.beton] [--out FILE]

Rows, in priority order (with --budget, no row starts once the budget is spent): each Triton kernel against
its eager twin at the shapes training passes (ViT-B/16 at batch 256, bf16); each kernel's bandwidth against
a device copy; the compiled bf16 step with kernels (fullgraph) and its MFU and ratio to the official-style
step; the step under CUDA graphs; each installed loader engine, alone (images/s, and per busy core) and end
to end, on the embedded dataset; the fine-tuning step; the step's collectives (the contrastive loss's
gather, the BatchNorm's all-reduce) compiled against eager in a world of one rank; the tests that need
CUDA; the CLIP family's steps (FLIP against CLIP, MAE-CLIP) at the same model size; the step at each side a
resolution schedule trains at; each engine under fine-tuning's augmentation against the same engine
without; and, on the photo corpus, FFCV's crop decode and `convert` against FFCV's own. Beside the rows,
the goals a GPU run is held to, measured against their targets. On a machine without CUDA the GPU rows are
skipped and the rest runs, so nothing here first runs on a GPU.

Writes benchmarks/results/<device>-<date>.json (device, versions, commit, every row and figure) after every
row, so a run cut short keeps what it measured.
Exit status 1 when a row failed; a missed goal is reported, not a failure.
"""
import dataclasses
import datetime
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.flip import FlipBenchmark, benchmark_flip
from benchmarks.kernels import KernelBenchmark, benchmark_kernels
from benchmarks.loaders import LoaderBenchmark, benchmark_loaders, per_core
from benchmarks.step import StepBenchmark, benchmark_step, describe
from supmae.core.atomic import write_json
from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, from_command_line, items, option, section
from supmae.models.families import list_models
from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.engines import ENGINES
from supmae.profiling.config import ProfileConfig
from supmae.profiling.measure import commit, device_name, versions
from supmae.training.config import PretrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGINE_PACKAGES = {"torch": "torch", "ffcv": "ffcv", "dali": "nvidia.dali"}
# What a GPU run is held to: (summary key, the least a measurement meets it with, what it means)
GOALS = [
    ("step_vs_official", 3.0, "the compiled bf16 step against the official-style eager fp16 step"),
    ("mfu", 0.45, "model FLOP utilisation of the step against a measured bf16 matmul"),
    ("kernel_min_fraction_of_copy", 0.80, "slowest kernel's bandwidth against a device-to-device copy"),
    ("dali_loader_images_per_s", 15000, "DALI loader alone, images/s delivered"),
    ("dali_end_to_end_fraction_of_step", 0.90, "DALI end to end against the step alone"),
    ("flip_vs_clip", 1.6, "FLIP (mask ratio 0.5) against CLIP, images/s of the same step"),
    ("finetune_step_vs_official", 2.0, "the fine-tuning step against the official-style eager fp16 one"),
    ("finetune_loader_vs_step", 1.0, "the fastest engine under fine-tuning's augmentation against its step"),
    ("step_160_vs_224", 1.6, "the step at 160x160 against 224x224, images/s (a resolution schedule's small epochs)"),
    ("crop_decode_vs_stock_per_core_320", 1.3, "FFCV's crop decode against its stock decoder, views per busy "
                                               "core, photos stored at 320"),
    ("crop_decode_vs_stock_per_core_512", 1.6, "the same, photos stored at 512"),
    ("ffcv_writer_vs_convert", 1.0, "FFCV's bare writer's wall time against supmae convert's, on the photos"),
]


@configuration
class Suite(Config):
    """Every check and measurement of supmae's speed in one command, with a pass/fail table: the GPU check."""
    run: PretrainConfig = section(PretrainConfig, ("model", "batch_size", "img_size", "device", "data", "workers"),
                                  batch_size=256)
    engines: str = option("torch,dali,ffcv", "the loader engines to measure, comma-separated",
                          choices=tuple(ENGINES), listed=True)
    steps: int = option(20, "timed steps (or batches) per measurement", at_least=1)
    window: int = option(5, "steps per timing window", at_least=1)
    warmup: int = option(3, "untimed steps first", at_least=0)
    images_per_class: int = option(1000, "size of the embedded dataset the loaders read (10 classes; 1000: 39 "
                                         "batches of 256 an epoch)", at_least=1)
    quick: bool = option(False, "a small model and batch (supmae_vit_tiny_patch16, batch 16, 4 steps): for a CPU")
    rows: str | None = option(None, "comma-separated row numbers to run", shown="all")
    budget: float | None = option(None, "seconds after which no further row starts (rows run in priority "
                                  "order; the JSON is rewritten after every row)", above=0, shown="none")
    out: str | None = option(None, "the JSON to write", shown="benchmarks/results/<device>-<date>.json")

    def check(self) -> None:
        numbers = (self.rows or "1").split(",")
        bad = [n for n in numbers if not n.strip().isdigit() or not 1 <= int(n) <= len(ROWS)]
        if bad:
            raise SupmaeError(f"--rows: {', '.join(bad)} is not a row number from 1 to {len(ROWS)}")



QUICK = dict(model="supmae_vit_tiny_patch16", batch_size=16, steps=4, window=2, warmup=1, images_per_class=100)


class Skip(Exception):
    """A row that cannot run here (no GPU, an engine not installed)."""


def row_tests(args, summary) -> str:
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU: the suite's CUDA tests skip here (the main suite runs them in the interpreter)")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(tail[-40:]), flush=True)
    if done.returncode != 0:
        raise AssertionError(tail[-1] if tail else f"pytest exited {done.returncode}")
    return tail[-1]


def row_kernels_match(args, summary) -> str:
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU")
    from supmae.kernels.norm_pix_loss import norm_pix_mse_triton
    from supmae.kernels.patch_gather import gather_patches_triton
    from supmae.kernels.unshuffle import unshuffle_triton
    from supmae.models.objective import gather_patches, removed_patch_loss
    from supmae.models.trunk import unshuffle
    from supmae.pipelines.masking import num_kept, random_masking

    os.environ["SUPMAE_POISON_OUTPUTS"] = "1"  # an element a kernel fails to write is NaN
    try:
        b, s, p, dim = args.run.batch_size, args.run.trunk.img_size, 16, 512
        n = (s // p) ** 2
        masking = random_masking(torch.rand(b, n, device="cuda"), num_kept(n, 0.75))
        images = torch.randn(b, 3, s, s, device="cuda")  # fp32, as the loader gives them
        errors = {}
        errors["patch_gather"] = _relative(gather_patches_triton(images, masking.ids_keep, p, torch.bfloat16),
                                           gather_patches(images, masking.ids_keep, p, torch.bfloat16))
        tokens = torch.randn(b, masking.ids_keep.shape[1], dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mask_token = torch.randn(1, 1, dim, device="cuda", requires_grad=True)  # fp32, as the parameter is
        outs, grads = [], []
        for fn in (lambda: unshuffle_triton(tokens, mask_token, masking.ids_restore, masking.ids_keep),
                   lambda: unshuffle(tokens, mask_token, masking.ids_restore)):
            out = fn()
            out.backward(torch.ones_like(out))
            outs.append(out)
            assert tokens.grad is not None and mask_token.grad is not None
            grads.append((tokens.grad.clone(), mask_token.grad.clone()))
            tokens.grad = mask_token.grad = None
        errors["unshuffle"] = _relative(*outs)
        errors["unshuffle_backward"] = max(_relative(grads[0][0], grads[1][0]), _relative(grads[0][1], grads[1][1]))
        pred = torch.randn(b, masking.ids_removed.shape[1], 3 * p * p, device="cuda", dtype=torch.bfloat16)
        losses, dpreds = [], []
        for fn in (norm_pix_mse_triton, removed_patch_loss):
            leaf = pred.clone().requires_grad_()
            loss = fn(leaf, images, masking.ids_removed, p, True)
            loss.backward()
            losses.append(loss)
            dpreds.append(leaf.grad)
        errors["norm_pix_loss"] = _relative(*losses)
        errors["norm_pix_loss_backward"] = _relative(*dpreds)
    finally:
        os.environ.pop("SUPMAE_POISON_OUTPUTS")
    summary["kernel_relative_error"] = errors
    bad = {name: e for name, e in errors.items() if not e <= 1e-2}  # bf16 outputs; NaN never passes
    if bad:
        raise AssertionError("kernels differ from their twins: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items()))
    return "max relative error " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def row_kernel_bandwidth(args, summary) -> str:
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU")
    report = benchmark_kernels(KernelBenchmark(batch_size=args.run.batch_size, img_size=args.run.trunk.img_size))
    summary["kernels"] = report
    fractions = {name: k["fraction_of_copy_bandwidth"] for name, k in report["kernels"].items()}
    summary["kernel_min_fraction_of_copy"] = min(fractions.values())
    return f"copy {report['copy_gb_per_s']:.0f} GB/s; " + ", ".join(f"{k} {v:.0%}" for k, v in fractions.items())


def row_step(args, summary) -> str:
    result = benchmark_step(_step_options(args, compile_mode="default", breakdown=True))
    print(describe(result), flush=True)
    summary["step_without_graphs"] = result
    _step_summary(summary, result)
    c = result["config"]
    return (f"{c['precision']}{', compiled' if c['compile'] else ''}: {result['images_per_s']:.0f} img/s, "
            f"MFU {result['mfu']:.1%}, {result['step_vs_official']:.2f}x official")


def row_cuda_graphs(args, summary) -> str:
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU")
    from torch._inductor import config as inductor_config
    # Graphs that silently fall back to plain launches would make this row meaningless.
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        result = benchmark_step(_step_options(args, compile_mode="reduce-overhead", official=False))
    print(describe(result), flush=True)
    without = summary.get("step_without_graphs")
    summary["cuda_graphs_step"] = result
    if without:
        summary["cuda_graphs_vs_default"] = result["images_per_s"] / without["images_per_s"]
        result["official"] = without["official"]  # measured once, in row 4
    _step_summary(summary, result)  # the GPU default (--compile-mode auto) is this step
    return f"{result['images_per_s']:.0f} img/s, MFU {result['mfu']:.1%}" + (
        f", {summary['cuda_graphs_vs_default']:.2f}x without graphs, {summary['step_vs_official']:.2f}x official"
        if without else "")


def _step_summary(summary, result) -> None:
    summary["step_images_per_s"], summary["mfu"] = result["images_per_s"], result["mfu"]
    if result["official"]:
        summary["step_vs_official"] = result["images_per_s"] / result["official"]["images_per_s"]["median"]


def _timing(args) -> dict:
    """The suite's --warmup, --steps and --window as a step benchmark's warm-up, window and windows."""
    return dict(warmup=args.warmup, steps=args.window, windows=max(1, args.steps // args.window))


def _step_options(args, *, compile_mode: str, **options) -> StepBenchmark:
    run = args.run
    return StepBenchmark.build({**dict(model=run.model, batch_size=run.batch_size, img_size=run.trunk.img_size,
                                       device=run.hardware.device, compile_mode=compile_mode), **_timing(args),
                                **options})


def row_clip_family(args, summary) -> str:
    """CLIP against FLIP (the step of each, in alternating rounds) and MAE-CLIP's step, at the size of the
    run's model, through the path training takes on this device."""
    size = args.run.model.split("_", 1)[1]  # supmae_vit_base_patch16 -> vit_base_patch16
    clip, maeclip = f"clip_{size}", f"maeclip_{size}"
    if clip not in list_models():
        raise Skip(f"no {clip} in the registry")
    run = args.run
    flip = benchmark_flip(FlipBenchmark.build(dict(model=clip, batch_size=run.batch_size, img_size=run.trunk.img_size,
                                                   device=run.hardware.device, rounds=2, **_timing(args))))
    step = benchmark_step(_step_options(args, compile_mode="auto", official=False, model=maeclip))
    summary.update(flip=flip, maeclip_step=step, flip_vs_clip=flip["flip_vs_clip"])
    clip_rate, flip_rate = (statistics.median(flip[f"{k}_images_per_s"]) for k in ("clip", "flip"))
    return (f"{clip} {clip_rate:.0f} img/s, FLIP {flip_rate:.0f} ({flip['flip_vs_clip']:.2f}x); "
            f"{maeclip} {step['images_per_s']:.0f} img/s, MFU {step['mfu']:.1%}")


def row_finetune_step(args, summary) -> str:
    """Fine-tuning's step at the official recipe (mixup and cutmix, layer decay), as `finetune` runs it on this
    device, against the official code's step."""
    result = benchmark_step(_step_options(args, compile_mode="auto", finetune=True))
    print(describe(result), flush=True)
    summary.update(finetune_step=result, finetune_step_vs_official=result["finetune_step_vs_official"])
    return (f"{result['images_per_s']:.0f} img/s, MFU {result['mfu']:.1%}, "
            f"{result['finetune_step_vs_official']:.2f}x official")


def row_step_by_size(args, summary) -> str:
    """The step at each side a resolution schedule would train at, and the projected schedule's time."""
    if args.run.trunk.img_size != 224:
        raise Skip("times sides up to 224: run the suite at --img-size 224")
    result = benchmark_step(_step_options(args, compile_mode="auto", sizes="128,160,192,224"))
    print(describe(result), flush=True)
    rates = result["images_per_s_by_size"]
    summary.update(step_by_size=result, step_160_vs_224=rates["160"] / rates["224"])
    return (", ".join(f"{side}: {rate:.0f}" for side, rate in rates.items()) + " img/s; "
            f"{result['projection']['schedule']} takes {result['projection']['time_vs_fixed']:.0%} of 224's time")


def row_engine(engine):
    def row(args, summary) -> str:
        if engine not in items(args.engines):
            raise Skip(f"not among --engines {args.engines}")
        if importlib.util.find_spec(ENGINE_PACKAGES[engine].split(".")[0]) is None or (
                engine == "dali" and importlib.util.find_spec("nvidia.dali") is None):
            raise Skip(f"{engine} is not installed")
        from supmae.profiling.profiler import profile
        data = args.run.data or _embedded_data(engine, args.images_per_class)
        run = dataclasses.replace(args.run, data=data, loader=engine, progress=False, tensorboard=False)
        with tempfile.TemporaryDirectory() as out:  # the suite's JSON holds the figures
            report = profile(ProfileConfig(run=run, steps=args.steps, warmup=args.warmup, window=args.window,
                                           stages="loader,end_to_end", out=out))
        stages = report["stages"]
        loader, end = (stages[s]["images_per_s"]["median"] for s in ("loader", "end_to_end"))
        summary.setdefault("engines", {})[engine] = stages
        summary[f"{engine}_loader_images_per_s"] = loader
        summary[f"{engine}_loader_images_per_s_per_core"] = busy = per_core(stages["loader"])
        text = f"loader {loader:.0f} img/s ({busy:.0f} per busy core), end to end {end:.0f} img/s"
        if "step_images_per_s" in summary:
            summary[f"{engine}_end_to_end_fraction_of_step"] = end / summary["step_images_per_s"]
            text += f" = {end / summary['step_images_per_s']:.0%} of the step"
        return text + f", data wait {stages['end_to_end']['data_wait_fraction']:.0%}"
    return row


def row_finetune_loaders(args, summary) -> str:
    """Each installed engine alone, with fine-tuning's augmentation (RandAugment, random erasing) and without,
    back to back on the embedded .beton, and the fastest under augmentation against the fine-tuning step."""
    engines = [e for e in items(args.engines) if e == "torch" or importlib.util.find_spec(
        "nvidia.dali" if e == "dali" else ENGINE_PACKAGES[e]) is not None]
    run = args.run
    report = benchmark_loaders(LoaderBenchmark.build(dict(
        data=run.data or _embedded_data("ffcv", args.images_per_class), engines=",".join(engines),
        batch_size=run.batch_size, img_size=run.trunk.img_size, device=run.hardware.device, workers=run.workers,
        augment=True, warmup=args.warmup, batches=args.window, passes=max(1, args.steps // args.window))))
    summary["finetune_loaders"] = report
    rates = {e: report["engines"][f"{e}+augment"]["images_per_s"] for e in engines}
    fastest = max(rates, key=lambda e: rates[e])
    text = ", ".join(f"{e} {rates[e]:.0f} img/s ({report['ratios'][f'{e}_augment_vs_images']:.2f}x plain)"
                     for e in engines)
    step = summary.get("finetune_step")
    if step:
        summary["finetune_loader_vs_step"] = rates[fastest] / step["images_per_s"]
        text += f"; {fastest} {summary['finetune_loader_vs_step']:.2f}x the fine-tuning step"
    return text


def _compiled_matches_eager(function, inputs: list[torch.Tensor]) -> None:
    """`function(*inputs)` compiled whole (fullgraph) gives eager's output and gradients."""
    results = []
    for run in (function, torch.compile(function, fullgraph=True)):
        out = run(*inputs)
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)  # every element counts
        results.append((out, *torch.autograd.grad((out * weights).sum(), inputs)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def row_collectives_compiled(args, summary) -> str:
    """The step's collectives compiled (fullgraph) against eager, in a world of one rank on this device (NCCL on
    a GPU, gloo elsewhere): the contrastive loss's gather of features, the head's BatchNorm all-reduce."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from supmae.models.clip import contrastive_loss
    from supmae.runtime.distributed import GroupBatchNorm1d
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        generator = torch.Generator(device).manual_seed(0)
        image, text, features = (torch.randn(16, 32, device=device, generator=generator, requires_grad=True)
                                 for _ in range(3))
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        _compiled_matches_eager(lambda i, t, s: contrastive_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s,
                                                                 gathered=True), [image, text, scale])
        norm = GroupBatchNorm1d(32).to(device)
        norm.group_size, norm.ranks = 16, dist.group.WORLD  # its statistics all-reduced over the (one) rank
        _compiled_matches_eager(norm, [features])
    finally:
        dist.destroy_process_group()
    summary["collectives_compiled"] = backend
    return f"the contrastive loss's gather and the BatchNorm's all-reduce over {backend}: compiled = eager"


def _needs_photos_and_ffcv() -> None:
    for module, why in (("ffcv", "ffcv is not installed"), ("skimage", "the photo corpus needs scikit-image"),
                        ("supmae.pipelines._jpeg_crop", "the JPEG view decoder is not built (pip install -e .)")):
        if importlib.util.find_spec(module) is None:
            raise Skip(why)


def row_crop_decode(args, summary) -> str:
    """The FFCV engine's crop decode against FFCV's stock decoder on the photo corpus: views per busy core."""
    _needs_photos_and_ffcv()
    from benchmarks.crop_decode import CropDecodeBenchmark, benchmark_crop_decode
    report = benchmark_crop_decode(CropDecodeBenchmark.build(dict(max_res="320,512", rounds=1,
                                                                  workers=args.run.workers)))
    ratios = report["crop_decode_vs_stock_per_core"]
    summary.update(crop_decode=report, **{f"crop_decode_vs_stock_per_core_{side}": r for side, r in ratios.items()})
    views = {side: figures["views"]["crop"]["images_per_s_per_core"] for side, figures in report["decoders"].items()}
    return ", ".join(f"{side}: {views[side]:.0f} views/s per busy core, {ratios[side]:.2f}x stock" for side in ratios)


def row_conversion(args, summary) -> str:
    """`supmae convert` against FFCV's bare writer (ffcv-imagenet's recipe) on the photo corpus."""
    _needs_photos_and_ffcv()
    from benchmarks.conversion import ConversionBenchmark, benchmark_conversion
    report = benchmark_conversion(ConversionBenchmark.build(dict(compare="ffcv", repeats=3,
                                                                 workers=args.run.workers)))
    summary.update(conversion=report, ffcv_writer_vs_convert=1 / report["convert_vs_ffcv_writer"])
    return f"convert took {report['convert_vs_ffcv_writer']:.2f}x the wall time of FFCV's bare writer"


def _embedded_data(engine: str, images_per_class: int) -> str:
    """The embedded dataset: its JPEG folder for the torch engine, one .beton (longest side 256) for the others."""
    from supmae.pipelines.synthetic import default_dataset
    folder = default_dataset(images_per_class=images_per_class)
    if engine == "torch":
        return folder
    from supmae.pipelines.convert import convert
    path = f"{folder}-256.beton"
    if not os.path.exists(path):
        convert(ConvertConfig(src=folder, out=path, storage=ConvertOptions(max_resolution=256), progress=False))
    return path


# In priority order: under --budget the rows a GPU run most needs measured come first.
ROWS = {
    "kernels vs twins (bf16, training shapes)": row_kernels_match,
    "kernel bandwidth": row_kernel_bandwidth,
    "step (kernels; on a GPU compiled, fullgraph)": row_step,
    "step under CUDA graphs": row_cuda_graphs,
    "ffcv loader, alone and end to end": row_engine("ffcv"),
    "dali loader, alone and end to end": row_engine("dali"),
    "torch loader, alone and end to end": row_engine("torch"),
    "fine-tuning step": row_finetune_step,
    "collectives compiled (a world of one rank)": row_collectives_compiled,
    "cuda tests": row_tests,
    "CLIP, FLIP and MAE-CLIP steps": row_clip_family,
    "step by image side (resolution schedules)": row_step_by_size,
    "fine-tuning loaders (RandAugment, erasing)": row_finetune_loaders,
    "crop decode vs FFCV's stock decoder (photos, per core)": row_crop_decode,
    "convert vs FFCV's bare writer (photos)": row_conversion,
}


def goals(summary: dict) -> list[dict]:
    rows = []
    for key, target, meaning in GOALS:
        measured = summary.get(key)
        rows.append(dict(goal=key, target=target, measured=measured, meaning=meaning,
                         met=None if measured is None else measured >= target))
    return rows


def main():
    args = from_command_line(Suite, below=lambda typed: [QUICK] if typed.get("quick") else [])
    chosen = {int(n) for n in args.rows.split(",")} if args.rows else set(range(1, len(ROWS) + 1))
    chosen_device = args.run.hardware.device
    device = torch.device("cuda" if chosen_device == "auto" and torch.cuda.is_available() else
                          ("cpu" if chosen_device == "auto" else chosen_device))
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{slug}-{datetime.date.today()}.json")
    summary, results, began = {}, [], time.perf_counter()
    for number, (row_name, row) in enumerate(ROWS.items(), 1):
        if number not in chosen:
            continue
        print(f"== {number}. {row_name}", flush=True)
        start = time.perf_counter()
        try:
            if args.budget is not None and start - began > args.budget:
                raise Skip(f"the budget of {args.budget:g} s was spent")
            status, detail = "pass", row(args, summary)
        except Skip as reason:
            status, detail = "skip", str(reason)
        except Exception as error:  # a row's failure is a result; the next rows still run
            traceback.print_exc()
            status, detail = "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        results.append(dict(row=row_name, status=status, detail=detail,
                            seconds=round(time.perf_counter() - start, 1)))
        print(f"   {status}: {detail}", flush=True)
        # Written after every row, so a run cut short (a device's time limit) leaves the rows it finished.
        write_json(out, dict(device=name, commit=commit(),
                             date=datetime.datetime.now().isoformat(timespec="seconds"),
                             versions=versions("timm", "triton", "ffcv", "nvidia-dali-cuda130", "numpy"),
                             cuda=torch.version.cuda, config=args.values(), rows=results, goals=goals(summary),
                             summary=summary))

    width = max(len(r["row"]) for r in results)
    print(f"\n{'row':<{width}}  {'result':<6} {'s':>6}  detail")
    for r in results:
        print(f"{r['row']:<{width}}  {r['status']:<6} {r['seconds']:>6.0f}  {r['detail']}")
    print(f"\n{'goal':<34} {'target':>8} {'measured':>10}  met")
    for g in goals(summary):
        measured = "-" if g["measured"] is None else f"{g['measured']:.3g}"
        met = "-" if g["met"] is None else ("yes" if g["met"] else "NO")
        print(f"{g['goal']:<34} {g['target']:>8} {measured:>10}  {met}")
    print(f"wrote {out}")
    sys.exit(1 if any(r["status"] == "FAIL" for r in results) else 0)


if __name__ == "__main__":
    main()
