"""`supmae pretrain`'s options: the run's own, and the model's sections, which the model families declare.
Nothing here imports torch, so a bad option is reported before the stack loads."""
import os
from typing import Any, ClassVar

from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, option, section
from supmae.models.families import (
    CLIPOptions,
    Recipe,
    SupMAEOptions,
    TrunkOptions,
    list_models,
    model_config,
    recipe_of,
)
from supmae.pipelines.config import ORDERS, SEED_MAX, data_exists, loader_option, resolution_option
from supmae.pipelines.resolution import ResolutionSchedule, parse_resolution_schedule
from supmae.pipelines.split import Split
from supmae.runtime.config import REDUCE_OVERHEAD_ACCUMULATES, HardwareOptions
from supmae.training.elastic import first_split


@configuration
class PretrainConfig(Config):
    """Pretrain a SupMAE (or MAE) ViT with the official recipe as defaults."""
    EXCLUSIVE: ClassVar = (("epochs", "steps"),)

    # run
    epochs: float | None = option(None, "run length in epochs", above=0, group="run",
                                  shown="the family's recipe: 400 for SupMAE, 800 for MAE and CLIP")
    steps: int | None = option(None, "run length in optimizer steps (instead of --epochs)", at_least=1,
                                  group="run")
    output: str = option("runs/supmae", "folder for checkpoints, metrics and config", group="run")
    checkpoint_every: int = option(1000, "steps between checkpoints (0: only at the end)", at_least=0, group="run")
    keep_checkpoints: int = option(3, "checkpoints kept, newest first", at_least=1, group="run")
    resume: str | None = option(None, "continue from a checkpoint, or from the newest in --output", group="run",
                                   metavar="PATH|auto")
    log_every: int = option(20, "steps between metrics lines", at_least=1, group="run")
    progress: bool = option(True, "show a progress bar", group="run")
    tensorboard: bool = option(True, "TensorBoard scalars beside metrics.jsonl", group="run")
    sync_bn: bool = option(False, "several ranks (torchrun): the classification head's BatchNorm over the "
                                  "micro-batches of every rank", group="run", defines_run=True)
    # data
    data: str | None = option(None, "image folder, CSV/TSV file list, tar shards or .beton", group="data loading",
                              exists=data_exists, shown="the embedded synthetic dataset")
    loader: str = loader_option(group="data loading")
    order: str = option("random", "sample order; quasi_random (ffcv) reads pages in near-random order, for data "
                                  "larger than memory", choices=ORDERS, group="data loading")
    os_cache: bool = option(True, "ffcv: rely on the OS page cache (--no-os-cache: FFCV's own process cache)",
                            group="data loading")
    workers: int | None = option(None, "loader processes", at_least=0, group="data loading", shown="cores - 1")
    seed: int = option(0, "seed of the weights, data order, crops and masks", at_least=0, at_most=SEED_MAX,
                       group="data loading", defines_run=True)
    resolution_schedule: str | None = resolution_option(group="data loading", defines_run=True)
    hardware: HardwareOptions = section(HardwareOptions)
    # model and objective: the run's own, then the sections the model families declare
    model: str = option("supmae_vit_base_patch16", "a name from `supmae models`", choices=list_models,
                        metavar="NAME", group="model and objective", defines_run=True)
    batch_size: int = option(64, "images per device per micro-batch", at_least=1, group="model and objective")
    accum_iter: int | None = option(None, "micro-batches per optimizer step", at_least=1,
                                    group="model and objective", shown="--global-batch / (ranks x --batch-size), "
                                    "else 1")
    global_batch: int | None = option(None, "images per optimizer step, over every rank and micro-batch; a run "
                                      "resumed on other ranks keeps it", at_least=1, group="model and objective",
                                      shown="ranks x --batch-size x --accum-iter")
    trunk: TrunkOptions = section(TrunkOptions)
    supmae: SupMAEOptions = section(SupMAEOptions)
    clip: CLIPOptions = section(CLIPOptions)
    # optimisation
    blr: float = option(1.5e-4, "base lr: lr = blr * effective batch / 256", above=0, group="optimisation")
    lr: float | None = option(None, "absolute lr (overrides --blr)", above=0, group="optimisation")
    min_lr: float = option(0.0, "lr at the end of the cosine", at_least=0, group="optimisation")
    weight_decay: float = option(0.05, "AdamW weight decay", at_least=0, group="optimisation")
    warmup_epochs: float | None = option(None, "epochs of linear lr warm-up", at_least=0, group="optimisation",
                                         shown="the family's recipe: 20 for SupMAE, 40 for MAE and CLIP")
    warmup_steps: int | None = option(None, "steps of warm-up (overrides --warmup-epochs)", at_least=0,
                                         group="optimisation")

    def check(self) -> None:
        if (self.accum_iter or 1) > 1 and self.hardware.compile_mode == "reduce-overhead":
            raise SupmaeError(REDUCE_OVERHEAD_ACCUMULATES)
        if self.resume not in (None, "auto") and not os.path.isfile(self.resume):
            raise SupmaeError(f"--resume: checkpoint {self.resume} does not exist")
        self.resolution()  # parsed now, so a bad schedule is refused before torch loads

    def first_split(self, world_size: int = 1) -> Split:
        """How a new run on `world_size` ranks splits its global batch (a resumed one: `elastic.resume_split`)."""
        return first_split(world_size=world_size, batch_size=self.batch_size, accum=self.accum_iter,
                           global_batch=self.global_batch)

    def resolution(self) -> ResolutionSchedule | None:
        """The resolution schedule, on the model's patch grid (None: --img-size throughout)."""
        text = self.resolution_schedule
        return parse_resolution_schedule(text, model_config(self.model)["patch_size"]) if text else None

    @property
    def recipe(self) -> Recipe:
        """The official schedules of the run's model, which its unset epochs and warm-up take."""
        return recipe_of(self.model)

    def effective(self, name: str) -> Any:
        """Option `name`'s value, or where it is left unset, the value the run's model takes (None for an option
        the model has no value of: unset means none, as for --resolution-schedule)."""
        value = self.values()[name]
        return model_config(self.model).get(name) if value is None else value
