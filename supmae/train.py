"""The pretraining loop: data -> SupMAE step -> AdamW, with logging, checkpoints and exact resume.

The hot loop never waits on the device: losses accumulate in a device tensor and are read once per
log interval. Data order, augmentation and masks are pure functions of (seed, position), so a resumed
run replays exactly what an uninterrupted one would have done.
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from supmae.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint, \
    prune_checkpoints, remove_partial_checkpoints, save_checkpoint
from supmae.distributed import any_rank, apply_ddp, apply_global_batchnorm, barrier, earliest_over_ranks, init_world, \
    mean_over_ranks
from supmae.errors import SupmaeError
from supmae.fast import apply_kernels
from supmae.metrics import Metrics
from supmae.optim import build_optimizer, lr_at
from supmae.pipelines.loader import LoaderSpec, check_engine, choose_engine, create_loader, open_batches
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.sources import open_source
from supmae.pipelines.synthetic import default_dataset
from supmae.registry import create_model, model_config
from supmae.stop import StopRequests

# What a resumed run may not change: the model, and what fixes the data order, crops and masks.
RUN_DEFINING = ("model", "img_size", "mask_ratio", "pool", "batch_size", "accum_iter", "seed")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile's modes, and auto. reduce-overhead replays the step as CUDA graphs: on an H100 the
# ViT-B/16 step at batch 256 ran 1.22x faster so (benchmarks/results/), for a static copy of the inputs.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class PretrainConfig:
    data: Optional[str] = None          # image folder, CSV/TSV list or .beton; None: the embedded synthetic dataset
    model: str = "supmae_vit_base_patch16"
    batch_size: int = 64                # per device, per micro-batch
    epochs: Optional[float] = None      # length of the run: epochs or steps (default 400 epochs)
    steps: Optional[int] = None         # optimizer steps
    output: str = "runs/supmae"
    checkpoint_every: int = 1000        # optimizer steps; 0: only at the end
    keep_checkpoints: int = 3
    resume: Optional[str] = None        # a checkpoint path, or "auto" for the newest in `output`
    loader: str = "auto"                # auto (ffcv for a .beton, else torch) | torch | ffcv | dali
    order: str = "random"               # random | quasi_random (ffcv)
    os_cache: bool = True               # ffcv: OS page cache (False: FFCV's process cache)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    workers: Optional[int] = None       # loader processes; None: cores - 1
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    compile: Optional[bool] = None      # torch.compile; None: on for GPU, off for CPU
    compile_mode: str = "auto"          # one of COMPILE_MODES; auto: CUDA graphs where they are safe
    accum_iter: int = 1
    blr: float = 1.5e-4                 # lr = blr * effective batch / 256 unless lr is given
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 40
    warmup_steps: Optional[int] = None  # overrides warmup_epochs
    img_size: int = 224
    mask_ratio: float = 0.75
    pool: str = "avg"
    norm_pix_loss: bool = True
    cls_loss_ratio: float = 0.01
    temperature: float = 10.0
    log_every: int = 20
    seed: int = 0
    sync_bn: bool = False               # several ranks: the classification head's BatchNorm over the global batch
    tensorboard: bool = True            # TensorBoard scalars beside metrics.jsonl
    progress: bool = True


def unusable_gpu() -> Optional[str]:
    """Why a GPU this machine has cannot be used, or None: a driver older than the CUDA build of torch
    is the usual cause, and it would otherwise turn a GPU run into a CPU run without a word."""
    if torch.cuda.is_available() or not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")):
        return None
    return (f"an NVIDIA GPU is present but torch {torch.__version__} cannot use it (built for CUDA "
            f"{torch.version.cuda or 'none'}): usually a driver older than that CUDA version, or a CPU-only torch")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        reason = unusable_gpu()
        if reason:
            print(f"warning: {reason}; running on the CPU", file=sys.stderr)
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


def speed_defaults(device: torch.device, precision: str = "auto", compile: Optional[bool] = None) -> tuple[str, bool]:
    """Resolve "auto" to the fastest correct choice: bf16 and torch.compile on GPU, fp32 eager on CPU."""
    on_gpu = device.type == "cuda"
    return (precision if precision != "auto" else ("bf16" if on_gpu else "fp32"),
            on_gpu if compile is None else compile)


def compile_mode_for(mode: str, device: torch.device, accum_iter: int = 1, distributed: bool = False) -> str:
    """Resolve "auto": CUDA graphs (reduce-overhead) on one GPU without accumulation, where they were
    measured faster; they would overwrite accumulated gradients, and DDP's bucketed all-reduce runs
    outside them."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and accum_iter == 1 and not distributed else "default"


def apply_compile(forward, mode: str = "default"):
    """torch.compile the step's forward (and, through AOTAutograd, its backward). fullgraph: a graph break
    would silently split the step and cost speed, so it is an error instead."""
    return torch.compile(forward, mode=mode, fullgraph=True)


def autocast_for(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def build_model(cfg: PretrainConfig, num_classes: int):
    """The model a run of `cfg` trains, on data with `num_classes` classes (MAE models have no branch)."""
    try:
        supervised = model_config(cfg.model)["num_classes"] != 0
        return create_model(
            cfg.model, img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
            **(dict(num_classes=num_classes, pool=cfg.pool, cls_loss_ratio=cfg.cls_loss_ratio,
                    temperature=cfg.temperature) if supervised else {}))
    except ValueError as error:
        raise SupmaeError(str(error)) from None


def config_of(state: dict) -> PretrainConfig:
    """The configuration a checkpoint was trained with (options added since take their defaults)."""
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    return PretrainConfig(**{k: v for k, v in state.get("config", {}).items() if k in known})


class Run:
    """Everything a pretraining run holds, built once from a config: data, model, optimiser and the
    (compiled, kernel-backed) forward. `restore()` moves it to a checkpoint's step."""

    def __init__(self, cfg: PretrainConfig, log):
        self.cfg, self.log = cfg, log
        check_engine(cfg.loader)
        if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
            raise SupmaeError(f"unknown precision {cfg.precision!r}; use auto, {', '.join(PRECISIONS)}")
        if cfg.compile_mode not in COMPILE_MODES:
            raise SupmaeError(f"unknown compile mode {cfg.compile_mode!r}; use {', '.join(COMPILE_MODES)}")
        if cfg.accum_iter > 1 and cfg.compile_mode == "reduce-overhead":
            raise SupmaeError("--compile-mode reduce-overhead replays the step as CUDA graphs, whose next replay "
                              "overwrites the gradients being accumulated: use --accum-iter 1 or another --compile-mode")
        self.world, self.device = init_world(resolve_device(cfg.device))
        self.precision, self.compile = speed_defaults(self.device, cfg.precision, cfg.compile)
        self.compile_mode = compile_mode_for(cfg.compile_mode, self.device, cfg.accum_iter, self.world.distributed)
        self.workers = cfg.workers if cfg.workers is not None else max(1, (os.cpu_count() or 2) - 1)

        self.data = cfg.data or default_dataset()
        self.source = open_source(self.data)
        self.engine = choose_engine(cfg.loader, self.source)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run of this seed
        self.model = build_model(cfg, len(self.source.classes))
        self.supervised = self.model.cls_head is not None
        if self.supervised and cfg.batch_size < 2 and not (cfg.sync_bn and self.world.distributed):
            raise SupmaeError("the classification head's BatchNorm needs at least 2 images per batch: use "
                              "--batch-size 2 or more (or --sync-bn on several ranks)")
        self.model.to(self.device)
        if cfg.sync_bn and self.world.distributed:
            apply_global_batchnorm(self.model)

        self.batches_per_epoch = len(self.source) // (cfg.batch_size * self.world.world_size)
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_iter
        if self.steps_per_epoch < 1:
            raise SupmaeError(f"{len(self.source)} images make no full step of {cfg.accum_iter} x "
                              f"{cfg.batch_size} on {self.world.world_size} rank(s); lower --batch-size or --accum-iter")
        self.total_steps = cfg.steps or math.ceil((400 if cfg.epochs is None else cfg.epochs) * self.steps_per_epoch)
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else round(cfg.warmup_epochs * self.steps_per_epoch))
        self.effective_batch = cfg.batch_size * cfg.accum_iter * self.world.world_size
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * self.effective_batch / 256

        self.optimizer = build_optimizer(self.model, self.peak_lr, cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        try:
            self.forward = apply_kernels(self.model)  # Triton on CUDA, the eager twins elsewhere
        except ValueError as error:
            raise SupmaeError(str(error)) from None
        if self.world.distributed:
            self.forward = apply_ddp(self.forward, self.device)
        if self.compile:
            self.forward = apply_compile(self.forward, self.compile_mode)

    @property
    def speed(self) -> str:
        """How the step runs, for log lines: "bf16, compiled, reduce-overhead", "fp32"."""
        mode = "" if self.compile_mode == "default" else f", {self.compile_mode}"
        return self.precision + (f", compiled{mode}" if self.compile else "")

    def restore(self) -> None:
        cfg = self.cfg
        found = None
        if cfg.resume == "auto":
            found = latest_checkpoint(cfg.output)
            if found is None:
                self.log(f"no checkpoint in {cfg.output} yet: starting from step 0")
        elif cfg.resume:
            found = cfg.resume, load_checkpoint(cfg.resume)
        elif list_checkpoints(cfg.output):
            raise SupmaeError(f"{cfg.output} already holds checkpoints; pass --resume auto to continue that run "
                              "or choose another --output")
        if found is None:
            return
        path, state = found
        saved = state.get("config", {})
        for key in RUN_DEFINING:
            if key in saved and saved[key] != getattr(cfg, key):
                raise SupmaeError(f"checkpoint {path} was made with {key}={saved[key]!r}, not {getattr(cfg, key)!r}")
        if state.get("world_size", 1) != self.world.world_size:
            raise SupmaeError(f"checkpoint {path} was made on {state.get('world_size', 1)} rank(s), not "
                              f"{self.world.world_size}: the data order and batch would change")
        if state.get("classes", self.source.classes) != self.source.classes:
            raise SupmaeError(f"checkpoint {path} was trained on other classes than {self.data} holds")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.log(f"resumed from {path} at step {state['step']}")
        self.step = state["step"]

    def save(self, step: int) -> str:
        """Rank 0 writes; every rank returns once the checkpoint is in place."""
        path = checkpoint_path(self.cfg.output, step)
        if self.world.is_main:
            self._write(step, path)
        barrier(self.world)
        return path

    def _write(self, step: int, path: str) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     scaler=self.scaler.state_dict(), step=step, epoch=step / self.steps_per_epoch,
                     config=dataclasses.asdict(self.cfg), world_size=self.world.world_size, classes=self.source.classes,
                     rng=rng, format="supmae/1")
        save_checkpoint(state, path)
        prune_checkpoints(self.cfg.output, self.cfg.keep_checkpoints)

    def loader_spec(self) -> LoaderSpec:
        cfg = self.cfg
        rank, world_size = self.world.rank, self.world.world_size
        masks = MaskSampler(self.model.num_patches, cfg.mask_ratio, cfg.seed, self.device, rank, world_size)
        return LoaderSpec(cfg.batch_size, cfg.img_size, masks, self.device, workers=self.workers, seed=cfg.seed,
                          start=self.step * cfg.accum_iter, order=cfg.order, os_cache=cfg.os_cache, rank=rank,
                          world_size=world_size)

    def loader(self):
        return create_loader(self.engine, self.source, self.loader_spec())


def train_step(forward, micro_batches, optimizer, scaler, autocast) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns their mean (loss, rec_loss, cls_loss), on the device."""
    losses = []
    no_sync = getattr(forward, "no_sync", None)  # DDP: reduce gradients once, after the last micro-batch
    for i, batch in enumerate(micro_batches):
        with autocast, (no_sync() if no_sync and i < len(micro_batches) - 1 else contextlib.nullcontext()):
            out = forward(batch.images, batch.labels, masking=batch.masking)
        # Copied out first: under CUDA graphs the outputs' memory belongs to the graph's next replay.
        cls_loss = torch.zeros_like(out.rec_loss) if out.cls_loss is None else out.cls_loss
        losses.append(torch.stack([t.detach().float() for t in (out.loss, out.rec_loss, cls_loss)]))
        scaler.scale(out.loss / len(micro_batches)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(0)


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    """Run (or continue) a pretraining run; returns the summary it also prints and logs.

    SIGTERM or Ctrl-C ends the run after the current step with a checkpoint (summary["stopped"] names
    the signal). On several ranks, rank 0 alone logs and writes files."""
    _check(cfg)
    run = Run(cfg, log)
    if not run.world.is_main:
        log = run.log = lambda *_: None
    run.restore()
    if run.world.is_main:
        os.makedirs(cfg.output, exist_ok=True)
        for path in remove_partial_checkpoints(cfg.output):
            log(f"removed {path}, left by a run killed while writing it")
        _write_config(run)
    barrier(run.world)
    if run.warmup_steps >= run.total_steps:
        log(f"warning: the warm-up ({run.warmup_steps} steps) is as long as the run ({run.total_steps} steps), so the "
            "lr never reaches its peak; shorten it with --warmup-epochs or --warmup-steps")
    if cfg.accum_iter > 1 and run.supervised:
        log(f"warning: with --accum-iter {cfg.accum_iter} the classification head's BatchNorm normalises over "
            f"micro-batches of {cfg.batch_size}, not the effective batch of {run.effective_batch}")
    ranks = f" x {run.world.world_size} ranks" if run.world.distributed else ""
    log(f"{cfg.model} on {run.device}{ranks} ({run.speed}): "
        f"{len(run.source)} images in {len(run.source.classes)} classes from {run.data} ({run.engine} loader); "
        f"steps {run.step}->{run.total_steps}, batch {run.effective_batch}, peak lr {run.peak_lr:.3g}")

    if run.step >= run.total_steps:
        log(f"nothing to do: the run is already at step {run.step} of {run.total_steps}")
        return dict(steps=run.total_steps, images_per_s=None, checkpoint=None, metrics=None, stopped=None)
    with Metrics(cfg.output, run.step, run.world.is_main, cfg.tensorboard) as metrics, StopRequests() as stop:
        summary = _loop(run, metrics, stop)
    log(f"{'stopped by ' + summary['stopped'] + ' at' if summary['stopped'] else 'done:'} step {summary['steps']}, "
        f"{summary['images_per_s']:.1f} images/s; checkpoint {summary['checkpoint']}; metrics {metrics.path}")
    return dict(summary, metrics=metrics.path)


def _loop(run: Run, metrics: Metrics, stop: StopRequests) -> dict:
    cfg, optimizer = run.cfg, run.optimizer
    autocast = autocast_for(run.device, run.precision)
    loss_sums = torch.zeros(3, device=run.device)  # total, reconstruction, classification
    # The first step whose loss was not finite, found on the device: no host sync per step.
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
    run.model.train()
    windows = []  # (images, seconds) per log interval
    window_start, window_steps, checkpoint, done, stopped = time.perf_counter(), 0, None, run.step, None
    with open_batches(run.loader()) as batches, tqdm(
            total=run.total_steps, initial=run.step, unit="step", file=sys.stderr, dynamic_ncols=True,
            disable=not (cfg.progress and run.world.is_main)) as bar:
        for step in range(run.step, run.total_steps):
            lr = lr_at(step, run.peak_lr, run.warmup_steps, run.total_steps, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = train_step(run.forward, [next(batches) for _ in range(cfg.accum_iter)], optimizer, run.scaler,
                                autocast)
            loss_sums += losses
            first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(losses[0]), step + 1)
            bar.update(1)
            window_steps += 1
            done = step + 1
            stopping = any_rank(stop.requested(), run.world)
            if done % cfg.log_every == 0 or done == run.total_steps or stopping:
                loss, rec_loss, cls_loss = mean_over_ranks(loss_sums / window_steps, run.world).tolist()  # the one sync
                now = time.perf_counter()
                windows.append((window_steps * run.effective_batch, now - window_start))
                record = dict(step=done, epoch=round(done / run.steps_per_epoch, 4), lr=lr, loss=loss,
                              rec_loss=rec_loss, images_per_s=windows[-1][0] / windows[-1][1])
                if run.supervised:
                    record["cls_loss"] = cls_loss
                metrics.write(record)
                if not math.isfinite(loss):
                    _stop_if_diverged(first_bad, run.world)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.1f}")
                loss_sums.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if (done == run.total_steps or stopping
                    or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                _stop_if_diverged(first_bad, run.world)  # diverged weights must never replace good checkpoints
                checkpoint = run.save(done)
            if stopping:
                stopped = stop.signal or "a signal to another rank"
                break
    # The first window holds start-up and compilation; leave it out when there is more.
    steady = windows[1:] or windows
    images_per_s = sum(n for n, _ in steady) / max(sum(s for _, s in steady), 1e-9)
    return dict(steps=done, images_per_s=images_per_s, checkpoint=checkpoint, stopped=stopped)


def _stop_if_diverged(first_bad: torch.Tensor, world) -> None:
    bad = earliest_over_ranks(first_bad, world)
    if bad is not None:
        raise SupmaeError(f"the loss stopped being finite at step {bad}; stopping with the checkpoints from before "
                          "it kept")


def _write_config(run: Run) -> None:
    cfg = run.cfg
    with open(os.path.join(cfg.output, "config.json"), "w") as f:
        json.dump(dict(dataclasses.asdict(cfg), data=run.data, device=str(run.device), precision=run.precision,
                       compile=run.compile, compile_mode=run.compile_mode, workers=run.workers, world_size=run.world.world_size,
                       total_steps=run.total_steps, warmup_steps=run.warmup_steps, peak_lr=run.peak_lr,
                       effective_batch=run.effective_batch, classes=run.source.classes), f, indent=2)


def _check(cfg: PretrainConfig) -> None:
    positive = dict(batch_size=cfg.batch_size, accum_iter=cfg.accum_iter, log_every=cfg.log_every)
    for name, value in positive.items():
        if value < 1:
            raise SupmaeError(f"{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.steps is not None and cfg.steps < 1:
        raise SupmaeError(f"steps must be at least 1, got {cfg.steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise SupmaeError(f"epochs must be positive, got {cfg.epochs}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise SupmaeError("give --epochs or --steps, not both")
    for name in ("checkpoint_every", "keep_checkpoints", "seed", "min_lr", "weight_decay", "warmup_epochs"):
        if getattr(cfg, name) < 0:
            raise SupmaeError(f"{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if cfg.workers is not None and cfg.workers < 0:
        raise SupmaeError(f"workers must not be negative, got {cfg.workers}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise SupmaeError(f"warmup-steps must not be negative, got {cfg.warmup_steps}")
    for name in ("blr", "lr", "temperature"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise SupmaeError(f"{name} must be positive, got {value}")
