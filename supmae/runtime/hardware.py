"""Device, precision and compile policy, shared by training, evaluation, fine-tuning, visualisation,
profiling and the benchmarks: what "auto" means on this machine, and the contexts a step runs in."""
import contextlib
import glob
import logging
import os
import shutil

import torch

from supmae.core.errors import SupmaeError
from supmae.runtime.config import HardwareOptions

logger = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's dtype per precision


def unusable_gpu() -> str | None:
    """Why a GPU this machine has cannot be used, or None: a driver older than the CUDA build of torch
    is the usual cause, and it would otherwise turn a GPU run into a CPU run without a word."""
    if torch.cuda.is_available() or not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")):
        return None
    return (f"an NVIDIA GPU is present but torch {torch.__version__} cannot use it (built for CUDA "
            f"{torch.version.cuda or 'none'}): usually a driver older than that CUDA version, or a CPU-only torch")


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N -> the device, made current when it is a GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        reason = unusable_gpu()
        if reason:
            logger.warning(f"{reason}; running on the CPU")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SupmaeError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SupmaeError(f"device {name} was asked for but {unusable_gpu() or 'no CUDA GPU is available'}")
    if device.type not in ("cpu", "cuda"):
        raise SupmaeError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SupmaeError(f"device {name} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device, not on the tensors'
    return device


def loader_workers(requested: int | None) -> int:
    """The loader's processes: cores - 1 by default, and at most 4 per core, since more only compete for the
    cores (a thousand of them take minutes just to start)."""
    cores = os.cpu_count() or 2
    if requested is None:
        return max(1, cores - 1)
    if requested > 4 * cores:
        logger.warning(f"--workers {requested} on {cores} cores: using {4 * cores}, as more would only compete for "
                       "the cores")
        return 4 * cores
    return requested


def check_batch_fits(*, batch_size: int, img_size: int, device: torch.device) -> None:
    """Refuse a batch whose images alone outgrow the memory there is, before the allocation that would end in
    the out-of-memory killer."""
    needed = batch_size * 3 * img_size * img_size * 4  # float32 pixels, before any activation
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], "GPU memory free"
    else:
        import psutil
        available, where = psutil.virtual_memory().available, "memory available"
    if needed > available:
        raise SupmaeError(f"--img-size {img_size}: one batch of {batch_size} images alone needs "
                          f"{needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of {where}")


def speed_defaults(device: torch.device, precision: str = "auto", compile: bool | None = None) -> tuple[str, bool]:
    """Resolve "auto" to the fastest correct choice: bf16 and torch.compile on GPU, fp32 eager on CPU."""
    on_gpu = device.type == "cuda"
    return (precision if precision != "auto" else ("bf16" if on_gpu else "fp32"),
            on_gpu if compile is None else compile)


def compile_mode_for(mode: str, device: torch.device, *, accum_iter: int = 1, distributed: bool = False) -> str:
    """Resolve "auto": CUDA graphs (reduce-overhead) on one GPU without accumulation, where they were
    measured faster; they would overwrite accumulated gradients, and DDP's bucketed all-reduce runs
    outside them."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and accum_iter == 1 and not distributed else "default"


def step_policy(device: torch.device, options: HardwareOptions, *, accum_iter: int = 1,
                distributed: bool = False) -> tuple[str, bool, str]:
    """(precision, whether to compile, compile mode) of a step on `device`, options' "auto" resolved."""
    precision, compiled = speed_defaults(device, options.precision, options.compile)
    return precision, compiled, compile_mode_for(options.compile_mode, device, accum_iter=accum_iter,
                                                 distributed=distributed)


def apply_compile(forward, mode: str = "default"):
    """torch.compile the step's forward (and, through AOTAutograd, its backward). fullgraph: a graph break
    would silently split the step and cost speed, so it is an error instead. Static shapes: each image side a
    resolution schedule trains at gets its own graph (and CUDA graph), compiled once, rather than one graph
    generic in the side; `resolution.MAX_SIZES` keeps them within dynamo's cache."""
    return torch.compile(forward, mode=mode, fullgraph=True, dynamic=False)


def autocast_for(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
