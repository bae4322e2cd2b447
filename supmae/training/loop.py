"""The pretraining loop: data -> step -> AdamW, with logging, checkpoints and exact resume.

The hot loop never waits on the device: losses accumulate in a device tensor and are read once per
log interval. Data order, augmentation and masks are pure functions of (seed, position), so a resumed
run replays exactly what an uninterrupted one would have done.
"""
import contextlib
import json
import logging
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from supmae.core.atomic import check_space, write_text
from supmae.core.errors import SupmaeError
from supmae.core.lock import exclusive
from supmae.pipelines.loader import open_batches
from supmae.runtime.distributed import any_rank, barrier, earliest_over_ranks, mean_over_ranks
from supmae.runtime.hardware import autocast_for
from supmae.training.checkpoint import checkpoint_bytes, remove_partial_checkpoints
from supmae.training.config import PretrainConfig
from supmae.training.metrics import Metrics
from supmae.training.optim import lr_at
from supmae.training.run import Run
from supmae.training.step import train_step
from supmae.training.stop import StopRequests

logger = logging.getLogger(__name__)
LOCK = ".supmae.lock"  # in the output folder, held by the run writing it


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
    if run.split.accum > 1 and run.groups.batchnorm is not None:
        logger.warning(f"with {run.split.accum} micro-batches per step the classification head's BatchNorm "
                       f"normalises over groups of {run.groups.batchnorm}, not the global batch of {run.split.size}")
    ranks = f" x {run.world.world_size} ranks" if run.world.distributed else ""
    logger.info(f"{cfg.model} on {run.device}{ranks} ({run.speed}): {len(run.source)} images in "
                f"{len(run.source.classes)} classes from {run.data} ({run.engine} loader); steps "
                f"{run.step}->{run.total_steps}, batch {run.split.size}, peak lr {run.peak_lr:.3g}")

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
    lr, side = 0.0, 0

    def log() -> None:
        """One metrics line for the steps since the last."""
        nonlocal window_start, window_steps
        means = mean_over_ranks(loss_sums / window_steps, run.world).tolist()  # the one sync
        windows.append((window_steps * run.split.size, time.perf_counter() - window_start))
        record = dict(step=done, epoch=round(done / run.steps_per_epoch, 4), lr=lr, img_size=side,
                      **dict(zip(run.model.loss_names, means)), images_per_s=windows[-1][0] / windows[-1][1])
        metrics.write(record)
        if not math.isfinite(means[0]):
            _stop_if_diverged(first_bad, run.world)
        bar.set_postfix(loss=f"{means[0]:.4f}", img_s=f"{record['images_per_s']:.1f}")
        loss_sums.zero_()
        window_start, window_steps = time.perf_counter(), 0

    with open_batches(run.loader()) as batches, tqdm(
            total=run.total_steps, initial=run.step, unit="step", file=sys.stderr, dynamic_ncols=True,
            disable=not (cfg.progress and run.world.is_main)) as bar:
        for step in range(run.step, run.total_steps):
            micro_batches = [next(batches) for _ in range(run.split.accum)]
            if window_steps and micro_batches[-1].images.shape[-1] != side:
                log()  # a resolution schedule changed the side: each metrics line holds steps of one side
            side = micro_batches[-1].images.shape[-1]
            lr = lr_at(step, peak=run.peak_lr, warmup=run.warmup_steps, total=run.total_steps, min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = train_step(run.forward, micro_batches, optimizer, run.scaler, autocast)
            loss_sums += losses
            first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(losses[0]), step + 1)
            bar.update(1)
            window_steps += 1
            done = step + 1
            stopping = any_rank(stop.requested(), run.world)
            if done % cfg.log_every == 0 or done == run.total_steps or stopping:
                log()
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
    resolved = dict(run.resolved_options(), device=str(run.device), precision=run.precision, compile=run.compile,
                    compile_mode=run.compile_mode, workers=run.workers, world_size=run.world.world_size,
                    total_steps=run.total_steps, warmup_steps=run.warmup_steps, peak_lr=run.peak_lr,
                    classes=run.source.classes)
    write_text(os.path.join(cfg.output, "config.json"), json.dumps(resolved, indent=2))
