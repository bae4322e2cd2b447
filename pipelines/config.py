"""The data side's options: the loader every command that reads images shares, the `synth` and `convert`
commands, and RandAugment policies. Nothing here imports torch or an engine, so the CLI checks them before
either loads."""
import dataclasses
import math
import os
import re

from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, option, section
from supmae.pipelines.engines import ENGINES
from supmae.pipelines.shards import is_shards, shard_paths

SEED_MAX = 2**32 - 1  # every generator the seed reaches (torch, numpy, DALI, FFCV) takes it whole
ORDERS = ("random", "quasi_random")
WRITE_MODES = ("jpg", "raw", "proportion", "smart")


def data_exists(spec: str) -> str | None:
    """What is missing of a data option's value, found before anything is read: None when it names a folder or
    file that exists, or shards (a brace pattern or a comma list) of which one at least exists."""
    if os.path.exists(spec):
        return None
    shards = shard_paths(spec) if is_shards(spec) else [spec]
    if len(shards) == 1 or not any(os.path.isfile(shard) for shard in shards):
        return "does not exist" if len(shards) == 1 else f"names {len(shards)} shard(s) and none of them exists"
    return None


def _loaders() -> tuple[str, ...]:
    return ("auto", *ENGINES)


def loader_option(group: str | None = None) -> str:
    return option("auto", "decoding engine (ffcv reads .beton files only); auto: ffcv for a .beton, torch otherwise",
                  choices=_loaders, metavar="{" + ",".join(_loaders()) + "}", group=group)


def resolution_option(**spec) -> str | None:
    """`--resolution-schedule` (resolution.py parses it, on the model's patch size)."""
    return option(None, "image side by epoch, in steps of the patch size: a ramp START-END@FROM-TO (as FFCV's "
                        "ImageNet recipe; e.g. 160-224@0-300) or stages SIZE@EPOCH,... (e.g. 128@0,192@200,224@350)",
                  shown="--img-size throughout", metavar="SCHEDULE", **spec)


@configuration
class SynthConfig(Config):
    """Write a synthetic ImageFolder dataset of real JPEG files with learnable classes.

    The embedded dataset's generator, written to a folder: `root/<class>/<image>.jpg`."""
    out_dir: str = option(positional=True, metavar="OUT_DIR", help="the folder to write")
    classes: int = option(10, "number of classes", at_least=2)
    images_per_class: int = option(100, "images per class", at_least=1)
    seed: int = option(0, "the generator's seed", at_least=0, at_most=SEED_MAX)
    workers: int | None = option(None, "processes", at_least=1, shown="all cores")
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
    src: str = option(positional=True, metavar="SRC", help="image folder, .csv/.tsv file list, or tar shards (a "
                                                             "folder of them, a brace pattern or a comma list)",
                      exists=data_exists)
    out: str = option(positional=True, metavar="OUT", help="the .beton to write")
    storage: ConvertOptions = section(ConvertOptions)
    workers: int | None = option(None, "processes", metavar="N", at_least=1, shown="all cores")
    force: bool = option(False, "replace OUT if it exists")
    progress: bool = option(True, "show progress bars")

    def check(self) -> None:
        if os.path.isdir(self.out):
            raise SupmaeError(f"output {self.out} is a directory; give a file name such as "
                              f"{self.out.rstrip('/')}.beton")
        if not self.out.lower().endswith(".beton"):  # --data tells a converted file from a folder by its name
            raise SupmaeError(f"OUT: {self.out} should end in .beton, as --data expects of a converted file")


# timm's _RAND_INCREASING_TRANSFORMS (`inc1`) and _RAND_TRANSFORMS, in timm's order.
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ORIGINAL_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
LEVEL_DENOM = 10.0      # timm's magnitude scale: M10 is an op's full strength


@dataclasses.dataclass(frozen=True)
class Policy:
    """A RandAugment policy in timm's terms: `layers` ops per image, drawn with replacement from `ops`, each
    applied with probability `prob` at a magnitude drawn around `magnitude` (normal with `std`, uniform on
    [0, magnitude] for an infinite one) and clipped to [0, max_magnitude]."""
    ops: tuple[str, ...] = INCREASING_OPS
    magnitude: float = 10.0
    layers: int = 2
    prob: float = 0.5
    std: float = 0.0
    max_magnitude: float = LEVEL_DENOM


def parse_policy(text: str) -> Policy:
    """timm's RandAugment notation ('rand-m9-mstd0.5-inc1': magnitude 9, its std 0.5, the increasing ops;
    also n, the ops per image, p, each op's probability, and mmax, the magnitude's bound)."""
    sections = text.split("-")
    if sections[0] != "rand":
        raise SupmaeError(f"--aa {text!r} is not a RandAugment policy: write it as timm does, e.g. "
                          "rand-m9-mstd0.5-inc1 (or none)")
    values = dict(magnitude=LEVEL_DENOM)
    increasing = False
    keys = dict(m="magnitude", n="layers", p="prob", mstd="std", mmax="max_magnitude")
    for part in sections[1:]:
        found = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if not found or found[1] not in (*keys, "inc"):
            raise SupmaeError(f"--aa {text!r}: unknown section {part!r} (known: m, n, p, mstd, mmax, inc)")
        key, number = found[1], float(found[2])
        if key == "inc":
            increasing = bool(number)
        else:
            values[keys[key]] = number
    std = values.get("std", 0.0)
    policy = Policy(ops=INCREASING_OPS if increasing else ORIGINAL_OPS, magnitude=values["magnitude"],
                    layers=int(values.get("layers", 2)), prob=values.get("prob", 0.5),
                    std=math.inf if std > 100 else std, max_magnitude=values.get("max_magnitude", LEVEL_DENOM))
    if policy.layers < 1 or not 0 < policy.prob <= 1:
        raise SupmaeError(f"--aa {text!r}: n must be at least 1 and p in (0, 1]")
    return policy
