"""A pretraining run, built once from its configuration: the data, the model, the optimiser and the
(kernel-backed, data-parallel, compiled) forward; it restores a checkpoint's step and saves its own."""
import dataclasses
import logging
import math
import os
from typing import Any

import torch

from supmae.core.errors import SupmaeError
from supmae.models.families import family_of
from supmae.models.fast import apply_kernels
from supmae.models.registry import build_model, check_sides
from supmae.pipelines.loader import LoaderSpec, choose_engine, create_loader
from supmae.pipelines.sources import open_source
from supmae.pipelines.split import Split
from supmae.pipelines.synthetic import default_dataset
from supmae.runtime.config import REDUCE_OVERHEAD_ACCUMULATES
from supmae.runtime.distributed import apply_batchnorm_groups, apply_ddp, barrier, init_world
from supmae.runtime.hardware import (
    apply_compile,
    check_batch_fits,
    loader_workers,
    resolve_device,
    step_policy,
)
from supmae.training.checkpoint import (
    checkpoint_bytes,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    saved_config,
    saved_split,
)
from supmae.training.config import PretrainConfig
from supmae.training.elastic import Groups, resume_split
from supmae.training.optim import build_optimizer

logger = logging.getLogger(__name__)


class Run:
    """Everything a pretraining run holds, built once from a config: data, model, optimiser and the
    (compiled, kernel-backed) forward. `restore()` moves it to a checkpoint's step."""

    def __init__(self, cfg: PretrainConfig, *, checkpoints: bool = True):
        """`checkpoints`: resume as --resume says (False: a new run whatever --output holds, as `profile` measures)."""
        self.cfg = cfg
        self.world, self.device = init_world(resolve_device(cfg.hardware.device))
        self.workers = loader_workers(cfg.workers)
        self._resume = self._find_checkpoint() if checkpoints else None

        self.data = os.path.abspath(cfg.data) if cfg.data else default_dataset()  # a resume may start elsewhere
        self.source = open_source(self.data)
        self.engine = choose_engine(cfg.loader, self.source)
        self.dataset: dict[str, Any] = dict(num_samples=len(self.source), fingerprint=self.source.fingerprint())
        if self._resume is not None:
            self._check_data(*self._resume)
        self.split, self.groups = self._plan_split()
        if self.split.accum > 1 and cfg.hardware.compile_mode == "reduce-overhead":
            raise SupmaeError(REDUCE_OVERHEAD_ACCUMULATES)
        self.precision, self.compile, self.compile_mode = step_policy(
            self.device, cfg.hardware, accum_iter=self.split.accum, distributed=self.world.distributed)
        check_batch_fits(batch_size=self.split.batch_size, img_size=cfg.trunk.img_size, device=self.device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run of this seed
        self.model = build_model(cfg.model, cfg, len(self.source.classes))
        if self.groups.batchnorm is not None and self.groups.batchnorm < 2:
            raise SupmaeError("the classification head's BatchNorm needs at least 2 images per batch: use "
                              "--batch-size 2 or more (or --sync-bn on several ranks)")
        if self.model.classifies and len(self.source.classes) < 2:
            logger.warning(f"{self.data} holds one class, so {cfg.model}'s classification loss is always 0: the run "
                           "trains as MAE (an mae_vit model does so without the branch)")
        self.model.to(self.device)
        if self.groups.batchnorm is not None:
            apply_batchnorm_groups(self.model, self.groups.batchnorm, self.split.batch_size, self.world)

        self.steps_per_epoch = len(self.source) // self.split.size
        if self.steps_per_epoch < 1:
            raise SupmaeError(f"{len(self.source)} images make no global batch of {self.split.size} ({self.split}); "
                              "lower --batch-size, --accum-iter or --global-batch")
        epochs = cfg.recipe.pretrain_epochs if cfg.epochs is None else cfg.epochs
        warmup_epochs = cfg.recipe.pretrain_warmup_epochs if cfg.warmup_epochs is None else cfg.warmup_epochs
        self.total_steps = cfg.steps or math.ceil(epochs * self.steps_per_epoch)
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else round(warmup_epochs * self.steps_per_epoch))
        self.resolution = cfg.resolution()
        if self.resolution is not None:
            self.resolution.check(cfg.trunk.img_size, self.total_steps / self.steps_per_epoch)
            check_sides(self.model, self.resolution.sizes)
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * self.split.size / 256

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

    def _find_checkpoint(self) -> tuple[str, dict] | None:
        """The checkpoint --resume names, checked against the options that define the run; None for a new run."""
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
        if found is not None:
            path, state = found
            saved = saved_config(state)
            for key in PretrainConfig.run_defining():
                if saved.effective(key) != cfg.effective(key):
                    raise SupmaeError(f"checkpoint {path} was made with {key}={saved.effective(key)!r}, not "
                                      f"{cfg.effective(key)!r}")
        return found

    def _check_data(self, path: str, state: dict) -> None:
        if state.get("classes", self.source.classes) != self.source.classes:
            raise SupmaeError(f"checkpoint {path} was trained on other classes than {self.data} holds")
        trained_on = state.get("dataset", self.dataset)
        if trained_on != self.dataset:
            then, now = trained_on, self.dataset
            raise SupmaeError(f"checkpoint {path} was trained on other data than {self.data}: "
                              f"{then['num_samples']} images (fingerprint {then['fingerprint'][:12]}) then, "
                              f"{now['num_samples']} ({now['fingerprint'][:12]}) now; give the --data it was trained "
                              "on")

    def _plan_split(self) -> tuple[Split, Groups]:
        """This run's split of its global batch, and the groups its losses keep whole: a new run's from its
        options, a resumed run's from its checkpoint, on the ranks there are now."""
        cfg, world_size, family = self.cfg, self.world.world_size, family_of(self.cfg.model)
        if self._resume is None:
            split = cfg.first_split(world_size)
            return split, Groups.first(split, classifies=family.classifies, contrastive=family.contrastive,
                                       sync_bn=cfg.sync_bn)
        path, state = self._resume
        saved, groups = saved_split(state, classifies=family.classifies, contrastive=family.contrastive)
        try:
            split = resume_split(saved, groups, world_size=world_size, batch_size=cfg.batch_size,
                                 accum=cfg.accum_iter, global_batch=cfg.global_batch)
        except SupmaeError as error:
            raise SupmaeError(f"checkpoint {path}: {error}") from None
        if split != saved:
            logger.info(f"the run was made on {saved}; it goes on with {split}, the same global batch of {split.size}")
        return split, groups

    def restore(self) -> None:
        """Move to the checkpoint --resume found: its weights, optimizer, generator states and step."""
        if self._resume is None:
            return
        (path, state), self._resume = self._resume, None
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
                     config=self.resolved_options(), split=dataclasses.asdict(self.split),
                     groups=dataclasses.asdict(self.groups), classes=self.source.classes, dataset=self.dataset,
                     rng=rng, format="supmae/1")
        save_checkpoint(state, path, expected_bytes=checkpoint_bytes(self.model))
        prune_checkpoints(self.cfg.output, self.cfg.keep_checkpoints)

    def resolved_options(self) -> dict:
        """The run's options as it trains them: the data it reads, and its split of the global batch (what a
        resumed run starts from, on whatever ranks it has)."""
        split = self.split
        return dict(self.cfg.values(), data=self.data, batch_size=split.batch_size, accum_iter=split.accum,
                    global_batch=split.size)

    def loader_spec(self) -> LoaderSpec:
        cfg = self.cfg
        rank, split = self.world.rank, self.split
        masks, text_masks = self.model.mask_samplers(seed=cfg.seed, device=self.device, rank=rank, split=split)
        return LoaderSpec(batch_size=split.batch_size, img_size=cfg.trunk.img_size, mask_sampler=masks,
                          device=self.device, workers=self.workers, seed=cfg.seed, start=self.step * split.accum,
                          order=cfg.order, os_cache=cfg.os_cache, rank=rank, world_size=split.world_size,
                          accum=split.accum,
                          text=self.model.uses_text, text_mask_sampler=text_masks, resolution=self.resolution)

    def loader(self):
        return create_loader(self.engine, self.source, self.loader_spec())
