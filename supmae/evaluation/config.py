"""The options of what comes after pretraining: export, k-NN, linear probe, zero-shot, retrieval,
fine-tuning, robustness, few-shot transfer and visualisation. Nothing here imports torch."""
import os

from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, items, option, section
from supmae.pipelines.config import SEED_MAX, data_exists, loader_option, parse_policy, resolution_option
from supmae.runtime.config import REDUCE_OVERHEAD_ACCUMULATES, HardwareOptions


@configuration
class ExportConfig(Config):
    """Write the encoder of a pretraining checkpoint as a timm VisionTransformer state dict in safetensors,
    for timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=OUT))."""
    checkpoint: str = option(positional=True, metavar="CHECKPOINT", help="a pretraining checkpoint", exists=True)
    out: str = option(positional=True, metavar="OUT", help="the .safetensors file to write")
    global_pool: str | None = option(None, "the timm global_pool the weights are for (avg: the final norm "
                                              "becomes fc_norm)", choices=("avg", "token"),
                                     shown="the pooling the model trained with: avg for SupMAE and MAE, token for "
                                           "CLIP")
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
    hardware: HardwareOptions = section(HardwareOptions, ("device",))


@configuration
class SplitsConfig(CheckpointConfig):
    """A pretrained encoder and the labelled splits it is scored on."""
    train: str = option(help="image folder, file list, tar shards or .beton with the labelled train split",
                        exists=data_exists)
    val: str = option(help="the validation split, with the same classes", exists=data_exists)


@configuration
class ZeroshotConfig(CheckpointConfig):
    """Zero-shot classification (top-1 and top-5) by a CLIP-family model: each class is the mean text embedding
    of its name in prompt templates, and each image takes the class its embedding is closest to. Class names
    are a file's (--class-names, or class_names.txt in the data folder, as the embedded dataset has),
    ImageNet's (open_clip's list) for a 1000-class set named by WordNet ids, or the class folders' names."""
    data: str = option(help="image folder, file list, tar shards or .beton with labels", exists=data_exists)
    class_names: str | None = option(None, "a file with one class name per line, in label order",
                                        metavar="FILE", exists=True, shown="DATA/class_names.txt if there is one")
    templates: str = option("simple", "prompt templates: open_clip's 7 simple ones or OpenAI's 80",
                            choices=("simple", "openai"))
    batch_size: int = option(64, "images per forward pass", at_least=1)
    json: str | None = option(None, "also write the result here", metavar="FILE")


@configuration
class RetrievalConfig(CheckpointConfig):
    """Image-to-text and text-to-image retrieval (recall at 1, 5 and 10) by a CLIP-family model over a
    captioned set: each image's own caption is the one to find, and each caption's own image."""
    data: str = option(help="image-text data: a captioned folder, file list, tar shards or .beton",
                       exists=data_exists)
    batch_size: int = option(64, "pairs per forward pass", at_least=1)
    json: str | None = option(None, "also write the result here", metavar="FILE")


@configuration
class KnnConfig(SplitsConfig):
    """Weighted k-NN classification (top-1) of the validation images by the frozen encoder's features of the
    training images."""
    k: int = option(20, "neighbours that vote", at_least=1)
    temperature: float = option(0.07, "votes weigh exp(similarity / temperature)", above=0)
    pool: str = option("avg", "how the encoder's tokens are pooled", choices=("avg", "token"))
    batch_size: int = option(64, "images per forward pass", at_least=1)
    json: str | None = option(None, "also write the result here", metavar="FILE")


@configuration
class LinearConfig(SplitsConfig):
    """Train BatchNorm (no affine) + Linear with LARS on the frozen encoder's features of random resized crops of
    the training images, as the official linear probe does; report top-1 on the validation images' centre
    crops. Unset options take the official recipe of the checkpoint's model family."""
    epochs: int | None = option(None, "epochs over the training images", at_least=1,
                                shown="the family's recipe: 90, 50 for MAE's ViT-L/H")
    batch_size: int | None = option(None, "images per LARS step (the effective batch: the lr scales with it)",
                                    at_least=1, shown="the family's recipe: 8192 for SupMAE, 16384 for MAE and CLIP")
    micro_batch: int = option(512, "images per forward pass; the head's BatchNorm normalises over these, as over "
                                   "the official probe's 512 per GPU", at_least=2)
    blr: float = option(0.1, "base lr: lr = blr * batch / 256", above=0)
    weight_decay: float = option(0.0, "LARS weight decay", at_least=0)
    warmup_epochs: float = option(10, "epochs of linear lr warm-up", at_least=0)
    pool: str = option("token", "the feature: the cls token (the official probe's, after the encoder's final norm) "
                                "or the normalised mean of the patch tokens", choices=("token", "avg"))
    seed: int = option(0, "seed of the head, the data order and the crops", at_least=0, at_most=SEED_MAX)
    output: str | None = option(None, "folder for the probe (probe.safetensors), which eval robustness scores")
    force: bool = option(False, "replace an existing probe.safetensors in --output")
    json: str | None = option(None, "also write the result here", metavar="FILE")


@configuration
class FinetuneConfig(SplitsConfig):
    """Fine-tune a pretrained encoder as a timm ViT with global average pooling; report top-1 on the validation
    split. Unset options take the official recipe of the checkpoint's model family."""
    epochs: float | None = option(None, "run length in epochs", above=0,
                                  shown="the family's recipe: 100, 50 for MAE's ViT-L/H")
    batch_size: int = option(1024, "images per AdamW step (the effective batch: the lr scales with it)", at_least=1)
    accum_iter: int = option(1, "micro-batches per step, each --batch-size / --accum-iter images", at_least=1)
    blr: float | None = option(None, "base lr: lr = blr * batch / 256", above=0,
                               shown="the family's recipe: 1e-3 for SupMAE, 5e-4 for MAE and CLIP (1e-3 for "
                                     "MAE's ViT-L/H)")
    min_lr: float = option(1e-6, "lr at the end of the cosine", at_least=0)
    layer_decay: float | None = option(None, "lr scale per block from the head down", above=0, at_most=1,
                                       shown="the family's recipe: 0.65, 0.75 for MAE's ViT-L/H")
    weight_decay: float = option(0.05, "AdamW weight decay", at_least=0)
    drop_path: float | None = option(None, "stochastic depth rate", at_least=0, below=1,
                                     shown="the family's recipe: 0.1, 0.2 for MAE's ViT-L, 0.3 ViT-H")
    smoothing: float = option(0.1, "label smoothing", at_least=0, below=1)
    mixup: float = option(0.8, "mixup alpha (0: off)", at_least=0)
    cutmix: float = option(1.0, "cutmix alpha (0: off)", at_least=0)
    aa: str = option("rand-m9-mstd0.5-inc1", "RandAugment policy in timm's notation (none: off)")
    reprob: float = option(0.25, "share of training images given a randomly erased box (timm's, pixel mode)",
                           at_least=0, at_most=1)
    warmup_epochs: float = option(5, "epochs of linear lr warm-up", at_least=0)
    resolution_schedule: str | None = resolution_option()
    seed: int = option(0, "seed of the head, data order and augmentation", at_least=0, at_most=SEED_MAX)
    output: str | None = option(None, "folder for the fine-tuned model.safetensors")
    force: bool = option(False, "replace an existing model.safetensors in --output")
    hardware: HardwareOptions = section(HardwareOptions)  # the step's precision and compilation too

    def check(self) -> None:
        super().check()
        if self.accum_iter > 1 and self.hardware.compile_mode == "reduce-overhead":
            raise SupmaeError(REDUCE_OVERHEAD_ACCUMULATES)
        if self.batch_size % self.accum_iter:
            raise SupmaeError(f"--batch-size {self.batch_size} is not a whole number of --accum-iter "
                              f"{self.accum_iter} micro-batches")
        if self.aa != "none":
            parse_policy(self.aa)
        if (self.mixup > 0 or self.cutmix > 0) and (self.batch_size // self.accum_iter) % 2:
            raise SupmaeError("mixup and cutmix pair each image with another in its micro-batch: use an even "
                              "--batch-size / --accum-iter, or --mixup 0 --cutmix 0")


@configuration
class VisualizeConfig(Config):
    """Write a PNG grid of a few images: the original, the visible patches, the reconstruction, and the
    reconstruction with the visible patches pasted back."""
    checkpoint: str = option(help="a pretraining checkpoint", exists=True)
    data: str = option(help="image folder, file list, tar shards or .beton; its first images are shown",
                       exists=data_exists)
    loader: str = loader_option()
    out: str = option(help="the PNG to write")
    images: int = option(6, "images shown", at_least=1)
    seed: int = option(0, "mask seed", at_least=0, at_most=SEED_MAX)
    hardware: HardwareOptions = section(HardwareOptions, ("device",))

    @property
    def image_format(self) -> str | None:
        """PIL's name for the format --out's extension asks for, when PIL can write it."""
        from PIL import Image
        image_format = Image.registered_extensions().get(os.path.splitext(self.out)[1].lower())
        return image_format if image_format in Image.SAVE else None

    def check(self) -> None:
        if self.image_format is None:
            raise SupmaeError(f"--out {self.out}: give an image file name such as {os.path.splitext(self.out)[0]}.png")


# The 15 corruptions of ImageNet-C (Hendrycks & Dietterich 2019), in its order.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = ("1", "2", "3", "4", "5")


@configuration
class RobustnessConfig(Config):
    """Top-1 of a classifier (finetune --output, or eval linear --output) under distribution shift: ImageNet-C
    (per corruption and severity, and mCE against AlexNet's published errors), ImageNet-A and ImageNet-R (200
    classes: the logits restricted to theirs), ImageNet-Sketch, or with --corrupt any labelled set, corrupted
    on the fly as ImageNet-C was made."""
    classifier: str = option(help="a classifier supmae wrote: a finetune or eval linear --output folder, or its "
                                  ".safetensors", exists=True)
    data: str = option(help="ImageNet-C's folder (corruption/severity/class/images), an ImageNet-A, -R or -Sketch "
                            "folder, or with --corrupt any labelled set", exists=data_exists)
    corrupt: bool = option(False, "corrupt --data's centre crops on the fly with ImageNet-C's corruptions "
                                  "(imagecorruptions)")
    corruptions: str = option(",".join(CORRUPTIONS), "with --corrupt: the corruptions, comma-separated",
                              choices=CORRUPTIONS, listed=True, shown="all 15")
    severities: str = option(",".join(SEVERITIES), "with --corrupt: the severities, comma-separated",
                             choices=SEVERITIES, listed=True)
    seed: int = option(0, "with --corrupt: the seed of the corruptions' noise", at_least=0, at_most=SEED_MAX)
    batch_size: int = option(64, "images per forward pass", at_least=1)
    loader: str = loader_option()
    workers: int = option(2, "decoding (and with --corrupt, corrupting) processes", at_least=0)
    hardware: HardwareOptions = section(HardwareOptions, ("device",))
    json: str | None = option(None, "also write the result here", metavar="FILE")


@configuration
class FewshotConfig(SplitsConfig):
    """k-shot classification on the frozen encoder's features: a logistic regression head trained on k training
    images of each class, for each k and seed, scored on the whole validation split; mean and standard deviation
    over the seeds, as few-shot transfer tables report them."""
    shots: str = option("1,2,5,10", "the k of each evaluation, comma-separated", metavar="K,K,...")
    seeds: int = option(5, "draws of the k images per class, each its own evaluation", at_least=1)
    pool: str = option("avg", "the feature: the normalised mean of the patch tokens, or the cls token",
                       choices=("avg", "token"))
    l2: float = option(1e-3, "the L2 penalty on the head's weights", at_least=0)
    batch_size: int = option(64, "images per forward pass", at_least=1)
    json: str | None = option(None, "also write the result here", metavar="FILE")

    @property
    def shot_list(self) -> list[int]:
        return [int(k) for k in items(self.shots)]

    def check(self) -> None:
        super().check()
        if not items(self.shots) or not all(k.isdigit() and int(k) > 0 for k in items(self.shots)):
            raise SupmaeError(f"--shots: give positive whole numbers, comma-separated, got {self.shots!r}")
