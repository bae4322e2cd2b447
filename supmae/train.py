"""The pretraining loop: data -> SupMAE step -> AdamW, with logging, checkpoints and exact resume.

The hot loop never waits on the device: losses accumulate in a device tensor and are read once per
log interval. Data order, augmentation and masks are pure functions of (seed, position), so a resumed
run replays exactly what an uninterrupted one would have done.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from supmae.atomic import check_space, write_text
from supmae.checkpoint import checkpoint_bytes, checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint, \
    prune_checkpoints, remove_partial_checkpoints, save_checkpoint, saved_config
from supmae.config import RUN_DEFINING, PretrainConfig
from supmae.distributed import any_rank, apply_ddp, apply_global_batchnorm, barrier, earliest_over_ranks, init_world, \
    mean_over_ranks
from supmae.errors import SupmaeError
from supmae.fast import apply_kernels
from supmae.hardware import apply_compile, autocast_for, check_batch_fits, compile_mode_for, loader_workers, \
    resolve_device, speed_defaults
from supmae.lock import exclusive
from supmae.metrics import Metrics
from supmae.optim import build_optimizer, lr_at
from supmae.pipelines.loader import LoaderSpec, choose_engine, create_loader, open_batches
from supmae.pipelines.masking import MaskSampler, TextMaskSampler
from supmae.pipelines.sources import open_source
from supmae.pipelines.synthetic import default_dataset
from supmae.pipelines.text import special_tokens
from supmae.registry import build_model, effective
from supmae.stop import StopRequests

logger = logging.getLogger(__name__)
LOCK = ".supmae.lock"  # in the output folder, held by the run writing it


class Run:
    """Everything a pretraining run holds, built once from a config: data, model, optimiser and the
    (compiled, kernel-backed) forward. `restore()` moves it to a checkpoint's step."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.world, self.device = init_world(resolve_device(cfg.device))
        self.precision, self.compile = speed_defaults(self.device, cfg.precision, cfg.compile)
        self.compile_mode = compile_mode_for(cfg.compile_mode, self.device, accum_iter=cfg.accum_iter,
                                             distributed=self.world.distributed)
        self.workers = loader_workers(cfg.workers)
        check_batch_fits(batch_size=cfg.batch_size, img_size=cfg.img_size, device=self.device)

        self.data = os.path.abspath(cfg.data) if cfg.data else default_dataset()  # a resume may start elsewhere
        self.source = open_source(self.data)
        self.engine = choose_engine(cfg.loader, self.source)
        self.dataset = dict(num_samples=len(self.source), fingerprint=self.source.fingerprint())
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run of this seed
        self.model = build_model(cfg, len(self.source.classes))
        self.supervised = getattr(self.model, "cls_head", None) is not None
        if self.supervised and cfg.batch_size < 2 and not (cfg.sync_bn and self.world.distributed):
            raise SupmaeError("the classification head's BatchNorm needs at least 2 images per batch: use "
                              "--batch-size 2 or more (or --sync-bn on several ranks)")
        if self.supervised and len(self.source.classes) < 2:
            logger.warning(f"{self.data} holds one class, so {cfg.model}'s classification loss is always 0: the run "
                           "trains as MAE (an mae_vit model does so without the branch)")
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
                logger.info(f"no checkpoint in {cfg.output} yet: starting from step 0")
        elif cfg.resume:
            found = cfg.resume, load_checkpoint(cfg.resume)
        elif list_checkpoints(cfg.output):
            raise SupmaeError(f"{cfg.output} already holds checkpoints; pass --resume auto to continue that run "
                              "or choose another --output")
        if found is None:
            return
        path, state = found
        saved = saved_config(state)
        for key in RUN_DEFINING:
            if effective(saved, key) != effective(cfg, key):
                raise SupmaeError(f"checkpoint {path} was made with {key}={effective(saved, key)!r}, not "
                                  f"{effective(cfg, key)!r}")
        if state.get("world_size", 1) != self.world.world_size:
            raise SupmaeError(f"checkpoint {path} was made on {state.get('world_size', 1)} rank(s), not "
                              f"{self.world.world_size}: the data order and batch would change")
        if state.get("classes", self.source.classes) != self.source.classes:
            raise SupmaeError(f"checkpoint {path} was trained on other classes than {self.data} holds")
        trained_on = state.get("dataset", self.dataset)
        if trained_on != self.dataset:
            raise SupmaeError(f"checkpoint {path} was trained on other data than {self.data}: "
                              f"{trained_on['num_samples']} images (fingerprint {trained_on['fingerprint'][:12]}) then, "
                              f"{self.dataset['num_samples']} ({self.dataset['fingerprint'][:12]}) now; give the --data "
                              "it was trained on")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        logger.info(f"resumed from {path} at step {state['step']}")
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
                     config=dict(dataclasses.asdict(self.cfg), data=self.data), world_size=self.world.world_size,
                     classes=self.source.classes, dataset=self.dataset, rng=rng, format="supmae/1")
        save_checkpoint(state, path, expected_bytes=checkpoint_bytes(self.model))
        prune_checkpoints(self.cfg.output, self.cfg.keep_checkpoints)

    def loader_spec(self) -> LoaderSpec:
        cfg = self.cfg
        rank, world_size = self.world.rank, self.world.world_size
        masks, text_masks = samplers(self.model, text_mask_ratio=cfg.text_mask_ratio, seed=cfg.seed,
                                     device=self.device, rank=rank, world_size=world_size)
        return LoaderSpec(batch_size=cfg.batch_size, img_size=cfg.img_size, mask_sampler=masks, device=self.device,
                          workers=self.workers, seed=cfg.seed, start=self.step * cfg.accum_iter, order=cfg.order,
                          os_cache=cfg.os_cache, rank=rank, world_size=world_size,
                          text=getattr(self.model, "uses_text", False), text_mask_sampler=text_masks)

    def loader(self):
        return create_loader(self.engine, self.source, self.loader_spec())


def samplers(model, *, text_mask_ratio: float, seed: int, device, rank: int = 0, world_size: int = 1):
    """(patch mask sampler, text mask sampler) for the batches `model` trains on; each None where the model
    has no use for it (CLIP sees every patch; only MAE-CLIP masks captions)."""
    masks = MaskSampler(model.num_patches, model.mask_ratio, seed=seed, device=device, rank=rank,
                        world_size=world_size) if model.mask_ratio > 0 else None
    text_masks = None
    if getattr(model, "text_reconstruction", False):
        text_masks = TextMaskSampler(text_mask_ratio, special=special_tokens(), seed=seed, device=device, rank=rank,
                                     world_size=world_size, max_masked=model.text_masked_max)
    return masks, text_masks


def text_inputs(batch) -> dict:
    """The caption tokens and text mask a text model's forward takes from a batch (none for the others)."""
    return {} if batch.tokens is None else dict(tokens=batch.tokens, text_mask=batch.text_mask)


def train_step(forward, micro_batches, optimizer, scaler, autocast) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns their mean loss and its parts (the order of the
    model's `loss_names`), on the device."""
    losses = []
    no_sync = getattr(forward, "no_sync", None)  # DDP: reduce gradients once, after the last micro-batch
    for i, batch in enumerate(micro_batches):
        with autocast, (no_sync() if no_sync and i < len(micro_batches) - 1 else contextlib.nullcontext()):
            out = forward(batch.images, batch.labels, masking=batch.masking, **text_inputs(batch))
        # Copied out first: under CUDA graphs the outputs' memory belongs to the graph's next replay.
        losses.append(torch.stack([t.detach().float() for t in out.losses().values()]))
        scaler.scale(out.loss / len(micro_batches)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(0)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or continue) a pretraining run; returns the summary it also logs.

    SIGTERM or Ctrl-C ends the run after the current step with a checkpoint (summary["stopped"] names
    the signal). On several ranks, rank 0 alone writes files, and holds the output folder's lock."""
    run = Run(cfg)
    lock = exclusive(os.path.join(cfg.output, LOCK), f"--output {cfg.output}") if run.world.is_main else \
        contextlib.nullcontext()
    with lock:
        return _pretrain(run)


def _pretrain(run: Run) -> dict:
    cfg = run.cfg
    run.restore()
    if run.world.is_main:
        for path in remove_partial_checkpoints(cfg.output):
            logger.info(f"removed {path}, left by a run killed while writing it")
        check_space(cfg.output, checkpoint_bytes(run.model), "a checkpoint")  # now, not after the first steps
        _write_config(run)
    barrier(run.world)
    if run.warmup_steps >= run.total_steps:
        logger.warning(f"the warm-up ({run.warmup_steps} steps) is as long as the run ({run.total_steps} steps), so "
                       "the lr never reaches its peak; shorten it with --warmup-epochs or --warmup-steps")
    if cfg.accum_iter > 1 and run.supervised:
        logger.warning(f"with --accum-iter {cfg.accum_iter} the classification head's BatchNorm normalises over "
                       f"micro-batches of {cfg.batch_size}, not the effective batch of {run.effective_batch}")
    ranks = f" x {run.world.world_size} ranks" if run.world.distributed else ""
    logger.info(f"{cfg.model} on {run.device}{ranks} ({run.speed}): {len(run.source)} images in "
                f"{len(run.source.classes)} classes from {run.data} ({run.engine} loader); steps "
                f"{run.step}->{run.total_steps}, batch {run.effective_batch}, peak lr {run.peak_lr:.3g}")

    if run.step >= run.total_steps:
        logger.info(f"nothing to do: the run is already at step {run.step} of {run.total_steps}")
        return dict(steps=run.total_steps, images_per_s=None, checkpoint=None, metrics=None, stopped=None)
    with Metrics(cfg.output, step=run.step, enabled=run.world.is_main, tensorboard=cfg.tensorboard) as metrics, \
            StopRequests() as stop:
        summary = _loop(run, metrics, stop)
    logger.info(f"{'stopped by ' + summary['stopped'] + ' at' if summary['stopped'] else 'done:'} step "
                f"{summary['steps']}, {summary['images_per_s']:.1f} images/s; checkpoint {summary['checkpoint']}; "
                f"metrics {metrics.path}")
    return dict(summary, metrics=metrics.path)


def _loop(run: Run, metrics: Metrics, stop: StopRequests) -> dict:
    cfg, optimizer = run.cfg, run.optimizer
    autocast = autocast_for(run.device, run.precision)
    loss_sums = torch.zeros(len(run.model.loss_names), device=run.device)  # the loss and its parts
    # The first step whose loss was not finite, found on the device: no host sync per step.
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
    run.model.train()
    windows = []  # (images, seconds) per log interval
    window_start, window_steps, checkpoint, done, stopped = time.perf_counter(), 0, None, run.step, None
    with open_batches(run.loader()) as batches, tqdm(
            total=run.total_steps, initial=run.step, unit="step", file=sys.stderr, dynamic_ncols=True,
            disable=not (cfg.progress and run.world.is_main)) as bar:
        for step in range(run.step, run.total_steps):
            lr = lr_at(step, peak=run.peak_lr, warmup=run.warmup_steps, total=run.total_steps, min_lr=cfg.min_lr)
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
                means = mean_over_ranks(loss_sums / window_steps, run.world).tolist()  # the one sync
                loss = means[0]
                now = time.perf_counter()
                windows.append((window_steps * run.effective_batch, now - window_start))
                record = dict(step=done, epoch=round(done / run.steps_per_epoch, 4), lr=lr,
                              **dict(zip(run.model.loss_names, means)), images_per_s=windows[-1][0] / windows[-1][1])
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
    resolved = dict(dataclasses.asdict(cfg), data=run.data, device=str(run.device), precision=run.precision,
                    compile=run.compile, compile_mode=run.compile_mode, workers=run.workers,
                    world_size=run.world.world_size, total_steps=run.total_steps, warmup_steps=run.warmup_steps,
                    peak_lr=run.peak_lr, effective_batch=run.effective_batch, classes=run.source.classes)
    write_text(os.path.join(cfg.output, "config.json"), json.dumps(resolved, indent=2))
