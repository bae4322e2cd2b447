"""Every command's configuration: each option declared once, with its type, default, meaning and range.

The command line (`supmae.cli`), config files, resumed checkpoints and the Python API all build these,
and building one checks it (`supmae.options`). Nothing here imports torch, so a bad option is reported
before any of the heavy stack loads.
"""
import os
import re
from typing import ClassVar, Optional

from supmae.errors import SupmaeError
from supmae.options import Config, configuration, items, option, section
from supmae.pipelines.engines import ENGINES
from supmae.registry import list_models

POOLS = ("avg", "token", "max", "map")   # how the classification branch pools the encoder's tokens
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# torch.compile's modes, and auto. reduce-overhead replays the step as CUDA graphs: on an H100 the
# ViT-B/16 step at batch 256 ran 1.22x faster so (benchmarks/results/), for a static copy of the inputs.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WRITE_MODES = ("jpg", "raw", "proportion", "smart")
ORDERS = ("random", "quasi_random")
PROFILE_STAGES = ("loader", "step", "end_to_end")
# What a resumed run may not change: the model, and what fixes the data order, crops and masks.
RUN_DEFINING = ("model", "img_size", "mask_ratio", "pool", "decoder_depth", "decoder_width", "text_reconstruction",
                "batch_size", "accum_iter", "seed")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
SEED_MAX = 2**32 - 1  # every generator the seed reaches (torch, numpy, DALI, FFCV) takes it whole


def _loaders() -> tuple[str, ...]:
    return ("auto", *ENGINES)


def device_option(group: Optional[str] = None) -> str:
    return option("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N", metavar="DEVICE", group=group)


def loader_option(group: Optional[str] = None) -> str:
    return option("auto", "decoding engine (ffcv reads .beton files only); auto: ffcv for a .beton, torch otherwise",
                  choices=_loaders, metavar="{" + ",".join(_loaders()) + "}", group=group)


def _check_device(cfg: Config) -> None:
    if not _DEVICE.match(cfg.device):
        raise SupmaeError(f"--device: must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


@configuration
class SynthConfig(Config):
    """Write a synthetic ImageFolder dataset of real JPEG files with learnable classes.

    The embedded dataset's generator, written to a folder: `root/<class>/<image>.jpg`."""
    out_dir: str = option(positional=True, metavar="OUT_DIR", help="the folder to write")
    classes: int = option(10, "number of classes", at_least=2)
    images_per_class: int = option(100, "images per class", at_least=1)
    seed: int = option(0, "the generator's seed", at_least=0, at_most=SEED_MAX)
    workers: Optional[int] = option(None, "processes", at_least=1, shown="all cores")
    force: bool = option(False, "replace OUT_DIR if it exists")


@configuration
class ConvertOptions(Config):
    """How a .beton stores its images (recorded in its sidecar)."""
    write_mode: str = option("jpg", "how images are stored: JPEG, raw pixels, a random proportion as JPEG, or "
                                    "JPEG when larger than --smart-threshold bytes raw", choices=WRITE_MODES)
    # 320 keeps a full-image 224 crop at native resolution for aspect ratios up to 4:3 (short side 240)
    # while decoding a fraction of the pixels of large originals.
    max_resolution: int = option(320, "resize so the longest side is at most this (suits 224-pixel training); "
                                      "0 keeps the original size", flag="--max-res", metavar="PIXELS", at_least=0)
    jpeg_quality: int = option(90, "JPEG quality", flag="--quality", metavar="Q", at_least=1, at_most=100)
    compress_probability: float = option(0.5, "share stored as JPEG in proportion mode", metavar="P",
                                         at_least=0, at_most=1)
    smart_threshold: int = option(3 * 256 * 256, "smart mode: raw bytes above which an image is stored as JPEG",
                                  metavar="BYTES", at_least=0)

    def check(self) -> None:
        if self.max_resolution and not 8 <= self.max_resolution <= 65535:
            raise SupmaeError(f"--max-res: must be between 8 and 65535, or 0 to keep originals, got "
                              f"{self.max_resolution}")


@configuration
class ConvertConfig(Config):
    """Convert an image folder (root/<class>/...) or a CSV/TSV list of path,label to an FFCV .beton, with a
    JSON sidecar (classes, counts, options) and a report of the files skipped."""
    src: str = option(positional=True, metavar="SRC", help="image folder, or .csv/.tsv file list")
    out: str = option(positional=True, metavar="OUT", help="the .beton to write")
    storage: ConvertOptions = section(ConvertOptions)
    workers: Optional[int] = option(None, "processes", metavar="N", at_least=1, shown="all cores")
    force: bool = option(False, "replace OUT if it exists")
    progress: bool = option(True, "show progress bars")

    def check(self) -> None:
        if os.path.isdir(self.out):
            raise SupmaeError(f"output {self.out} is a directory; give a file name such as "
                              f"{self.out.rstrip('/')}.beton")
        if not self.out.lower().endswith(".beton"):  # --data tells a converted file from a folder by its name
            raise SupmaeError(f"OUT: {self.out} should end in .beton, as --data expects of a converted file")


@configuration
class PretrainConfig(Config):
    """Pretrain a SupMAE (or MAE) ViT with the official recipe as defaults."""
    EXCLUSIVE: ClassVar = (("epochs", "steps"),)

    # run
    epochs: Optional[float] = option(None, "run length in epochs", above=0, group="run", shown="400")
    steps: Optional[int] = option(None, "run length in optimizer steps (instead of --epochs)", at_least=1,
                                  group="run")
    output: str = option("runs/supmae", "folder for checkpoints, metrics and config", group="run")
    checkpoint_every: int = option(1000, "steps between checkpoints (0: only at the end)", at_least=0, group="run")
    keep_checkpoints: int = option(3, "checkpoints kept, newest first", at_least=1, group="run")
    resume: Optional[str] = option(None, "continue from a checkpoint, or from the newest in --output", group="run",
                                   metavar="PATH|auto")
    log_every: int = option(20, "steps between metrics lines", at_least=1, group="run")
    progress: bool = option(True, "show a progress bar", group="run")
    tensorboard: bool = option(True, "TensorBoard scalars beside metrics.jsonl", group="run")
    sync_bn: bool = option(False, "several ranks (torchrun): the classification head's BatchNorm over the global "
                                  "batch", group="run")
    # data
    data: Optional[str] = option(None, "image folder, CSV/TSV file list or .beton", group="data loading", exists=True,
                                 shown="the embedded synthetic dataset")
    loader: str = loader_option(group="data loading")
    order: str = option("random", "sample order; quasi_random (ffcv) reads pages in near-random order, for data "
                                  "larger than memory", choices=ORDERS, group="data loading")
    os_cache: bool = option(True, "ffcv: rely on the OS page cache (--no-os-cache: FFCV's own process cache)",
                            group="data loading")
    workers: Optional[int] = option(None, "loader processes", at_least=0, group="data loading", shown="cores - 1")
    seed: int = option(0, "seed of the weights, data order, crops and masks", at_least=0, at_most=SEED_MAX,
                       group="data loading")
    # hardware
    device: str = device_option(group="hardware")
    precision: str = option("auto", "auto: bf16 on GPU, fp32 on CPU; fp16 uses a GradScaler", choices=PRECISIONS,
                            group="hardware")
    compile: Optional[bool] = option(None, "torch.compile the step", group="hardware",
                                     shown="on for GPU, off for CPU")
    compile_mode: str = option("auto", "torch.compile's mode; reduce-overhead replays the step as CUDA graphs; "
                                       "auto: reduce-overhead on one GPU with --accum-iter 1, default otherwise",
                               choices=COMPILE_MODES, group="hardware")
    # model and objective
    model: str = option("supmae_vit_base_patch16", "a name from `supmae models`", choices=list_models,
                        metavar="NAME", group="model and objective")
    batch_size: int = option(64, "images per device per micro-batch", at_least=1, group="model and objective")
    accum_iter: int = option(1, "micro-batches per optimizer step", at_least=1, group="model and objective")
    img_size: int = option(224, "image side in pixels", at_least=1, group="model and objective")
    mask_ratio: Optional[float] = option(None, "share of patches removed (above 0 on a CLIP model: FLIP)",
                                         at_least=0, below=1, group="model and objective",
                                         shown="the model's: 0.75, 0 for CLIP")
    pool: Optional[str] = option(None, "how the encoder's tokens are pooled for the classification branch or "
                                       "the image embedding", choices=POOLS, group="model and objective",
                                 shown="the model's: avg, token for CLIP")
    decoder_depth: Optional[int] = option(None, "decoder blocks (MAE-CLIP's cross-modal decoder included)",
                                          at_least=1, group="model and objective", shown="the model's")
    decoder_width: Optional[int] = option(None, "decoder width", at_least=8, group="model and objective",
                                          shown="the model's")
    norm_pix_loss: bool = option(True, "reconstruct each patch's normalised pixels", group="model and objective")
    cls_loss_ratio: float = option(0.01, "weight of the classification loss", at_least=0,
                                   group="model and objective")
    temperature: float = option(10.0, "temperature of the classification logits", above=0,
                                group="model and objective")
    # The MAE-CLIP paper does not publish its loss weights; these are M3AE's (arXiv 2205.14204).
    clip_weight: float = option(1.0, "CLIP and MAE-CLIP: weight of the contrastive loss", at_least=0,
                                group="model and objective")
    image_weight: float = option(1.0, "MAE-CLIP: weight of the pixel reconstruction loss (M3AE's)", at_least=0,
                                 group="model and objective")
    text_weight: float = option(0.5, "MAE-CLIP: weight of the masked-token loss (M3AE's)", at_least=0,
                                group="model and objective")
    text_mask_ratio: float = option(0.75, "MAE-CLIP: share of each caption's tokens masked (M3AE's)", above=0,
                                    below=1, group="model and objective")
    text_reconstruction: bool = option(True, "MAE-CLIP: reconstruct the masked caption tokens too (off: images "
                                             "only)", group="model and objective")
    # optimisation
    blr: float = option(1.5e-4, "base lr: lr = blr * effective batch / 256", above=0, group="optimisation")
    lr: Optional[float] = option(None, "absolute lr (overrides --blr)", above=0, group="optimisation")
    min_lr: float = option(0.0, "lr at the end of the cosine", at_least=0, group="optimisation")
    weight_decay: float = option(0.05, "AdamW weight decay", at_least=0, group="optimisation")
    warmup_epochs: float = option(40, "epochs of linear lr warm-up", at_least=0, group="optimisation")
    warmup_steps: Optional[int] = option(None, "steps of warm-up (overrides --warmup-epochs)", at_least=0,
                                         group="optimisation")

    def check(self) -> None:
        _check_device(self)
        if self.accum_iter > 1 and self.compile_mode == "reduce-overhead":
            raise SupmaeError("--compile-mode reduce-overhead replays the step as CUDA graphs, whose next replay "
                              "overwrites the gradients being accumulated: use --accum-iter 1 or another "
                              "--compile-mode")
        if self.resume not in (None, "auto") and not os.path.isfile(self.resume):
            raise SupmaeError(f"--resume: checkpoint {self.resume} does not exist")


# The options a profile takes from the run it measures: what is read, by what, on what, into what.
SHARED_GROUPS = ("data loading", "hardware", "model and objective")


@configuration
class ProfileConfig(Config):
    """Measure, with a run's configuration, the loader alone, the training step alone and the real loop;
    print a table and a verdict naming the stage that bounds the run, and write a JSON report and plots."""
    run: PretrainConfig = section(PretrainConfig, SHARED_GROUPS)
    steps: int = option(20, "timed steps (batches) per stage", at_least=1, group="measurement")
    warmup: int = option(3, "untimed steps first, per stage", at_least=0, group="measurement")
    window: int = option(4, "steps per timing window", at_least=1, group="measurement")
    stages: str = option(",".join(PROFILE_STAGES), "the stages to measure, comma-separated", choices=PROFILE_STAGES,
                         listed=True, group="measurement")
    out: Optional[str] = option(None, "folder for profile.json and the plots", metavar="DIR", group="measurement",
                                shown="runs/profile-<time>")
    json: Optional[str] = option(None, "also write the JSON report here", metavar="FILE", group="measurement")

    @property
    def stage_list(self) -> list[str]:
        return items(self.stages)


@configuration
class ExportConfig(Config):
    """Write the encoder of a pretraining checkpoint as a timm VisionTransformer state dict in safetensors,
    for timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=OUT))."""
    checkpoint: str = option(positional=True, metavar="CHECKPOINT", help="a pretraining checkpoint", exists=True)
    out: str = option(positional=True, metavar="OUT", help="the .safetensors file to write")
    global_pool: str = option("avg", "the timm global_pool the weights are for (avg: the final norm becomes "
                                     "fc_norm)", choices=("avg", "token"))
    force: bool = option(False, "replace OUT if it exists")

    def check(self) -> None:
        if os.path.isdir(self.out):
            raise SupmaeError(f"OUT {self.out} is a directory; give a file name such as "
                              f"{os.path.join(self.out, 'encoder.safetensors')}")


@configuration
class CheckpointConfig(Config):
    """A pretrained model, and how the data it is scored on is read."""
    checkpoint: str = option(help="a pretraining checkpoint", exists=True)
    loader: str = loader_option()
    workers: int = option(2, "decoding processes", at_least=0)
    device: str = device_option()

    def check(self) -> None:
        _check_device(self)


@configuration
class SplitsConfig(CheckpointConfig):
    """A pretrained encoder and the labelled splits it is scored on."""
    train: str = option(help="image folder, file list or .beton with the labelled train split", exists=True)
    val: str = option(help="the validation split, with the same classes", exists=True)


@configuration
class ZeroshotConfig(CheckpointConfig):
    """Zero-shot classification (top-1 and top-5) by a CLIP-family model: each class is the mean text embedding
    of its name in prompt templates, and each image takes the class its embedding is closest to. Class names
    are a file's (--class-names, or class_names.txt in the data folder, as the embedded dataset has),
    ImageNet's (open_clip's list) for a 1000-class set named by WordNet ids, or the class folders' names."""
    data: str = option(help="image folder, file list or .beton with labels", exists=True)
    class_names: Optional[str] = option(None, "a file with one class name per line, in label order",
                                        metavar="FILE", exists=True, shown="DATA/class_names.txt if there is one")
    templates: str = option("simple", "prompt templates: open_clip's 7 simple ones or OpenAI's 80",
                            choices=("simple", "openai"))
    batch_size: int = option(64, "images per forward pass", at_least=1)
    json: Optional[str] = option(None, "also write the result here", metavar="FILE")


@configuration
class RetrievalConfig(CheckpointConfig):
    """Image-to-text and text-to-image retrieval (recall at 1, 5 and 10) by a CLIP-family model over a
    captioned set: each image's own caption is the one to find, and each caption's own image."""
    data: str = option(help="image-text data: a captioned folder, file list, shards or .beton", exists=True)
    batch_size: int = option(64, "pairs per forward pass", at_least=1)
    json: Optional[str] = option(None, "also write the result here", metavar="FILE")


@configuration
class KnnConfig(SplitsConfig):
    """Weighted k-NN classification (top-1) of the validation images by the frozen encoder's features of the
    training images."""
    k: int = option(20, "neighbours that vote", at_least=1)
    temperature: float = option(0.07, "votes weigh exp(similarity / temperature)", above=0)
    pool: str = option("avg", "how the encoder's tokens are pooled", choices=("avg", "token"))
    batch_size: int = option(64, "images per forward pass", at_least=1)
    json: Optional[str] = option(None, "also write the result here", metavar="FILE")


@configuration
class LinearConfig(SplitsConfig):
    """Train BatchNorm (no affine) + Linear on the frozen encoder's features of the training images; report
    top-1 on the validation images."""
    epochs: int = option(90, "epochs over the training features", at_least=1)
    batch_size: int = option(256, "features per SGD step", at_least=1)
    blr: float = option(0.1, "base lr: lr = blr * batch / 256", above=0)
    json: Optional[str] = option(None, "also write the result here", metavar="FILE")


@configuration
class FinetuneConfig(SplitsConfig):
    """Fine-tune a pretrained encoder as a timm ViT with global average pooling, with the official recipe as
    defaults; report top-1 on the validation split."""
    epochs: float = option(100, "run length in epochs", above=0)
    batch_size: int = option(64, "images per step", at_least=1)
    blr: float = option(5e-4, "base lr: lr = blr * batch / 256", above=0)
    layer_decay: float = option(0.65, "lr scale per block from the head down", above=0, at_most=1)
    weight_decay: float = option(0.05, "AdamW weight decay", at_least=0)
    drop_path: float = option(0.1, "stochastic depth rate", at_least=0, below=1)
    smoothing: float = option(0.1, "label smoothing", at_least=0, below=1)
    mixup: float = option(0.0, "mixup alpha (0: off; the official ImageNet recipe uses 0.8)", at_least=0)
    cutmix: float = option(0.0, "cutmix alpha (0: off; the official ImageNet recipe uses 1.0)", at_least=0)
    warmup_epochs: float = option(5, "epochs of linear lr warm-up", at_least=0)
    seed: int = option(0, "seed of the head, data order and augmentation", at_least=0, at_most=SEED_MAX)
    output: Optional[str] = option(None, "folder for the fine-tuned model.safetensors")
    force: bool = option(False, "replace an existing model.safetensors in --output")


@configuration
class VisualizeConfig(Config):
    """Write a PNG grid of a few images: the original, the visible patches, the reconstruction, and the
    reconstruction with the visible patches pasted back."""
    checkpoint: str = option(help="a pretraining checkpoint", exists=True)
    data: str = option(help="image folder, file list or .beton; its first images are shown", exists=True)
    loader: str = loader_option()
    out: str = option(help="the PNG to write")
    images: int = option(6, "images shown", at_least=1)
    seed: int = option(0, "mask seed", at_least=0, at_most=SEED_MAX)
    device: str = device_option()

    @property
    def image_format(self) -> Optional[str]:
        """PIL's name for the format --out's extension asks for, when PIL can write it."""
        from PIL import Image
        image_format = Image.registered_extensions().get(os.path.splitext(self.out)[1].lower())
        return image_format if image_format in Image.SAVE else None

    def check(self) -> None:
        _check_device(self)
        if self.image_format is None:
            raise SupmaeError(f"--out {self.out}: give an image file name such as {os.path.splitext(self.out)[0]}.png")


@configuration
class ModelsConfig(Config):
    """List the model names of the registry."""
