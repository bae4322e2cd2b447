"""SupMAE's pretraining augmentation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + flip (fine-tuning's
and the linear probe's crops scale 0.08-1, timm's and torchvision's default), and the evaluation view: the
centre square of 87.5% of the shorter side.

Every engine crops with these semantics (torchvision's RandomResizedCrop; FFCV's centre crop), so their
batches are statistically the same whichever engine decodes them; the torch and DALI engines draw the
very same boxes and flips from (seed, epoch, index).
"""
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CLASSIFIER_CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5
EVAL_CROP_FRACTION = 0.875


def sample_crop(width: int, height: int, rng: np.random.Generator, *,
                scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """A random (left, top, width, height) box covering `scale` of the area at an aspect in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Ten misses: a centre crop at the nearest allowed aspect, as torchvision does.
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop(width: int, height: int, fraction: float = EVAL_CROP_FRACTION) -> tuple[int, int, int, int]:
    side = int(fraction * min(width, height))
    return (width - side) // 2, (height - side) // 2, side, side


def crop_and_flip(width: int, height: int, *, seed: int, epoch: int, index: int, train: bool,
                  scale: tuple[float, float] = CROP_SCALE,
                  fraction: float = EVAL_CROP_FRACTION) -> tuple[tuple[int, int, int, int], bool]:
    """The (left, top, width, height) box and flip of one sample's view, a function of its key alone: a random
    resized crop of `scale` of the area, or without `train` the centre square of `fraction` of the shorter side."""
    if not train:
        return center_crop(width, height, fraction), False
    rng = np.random.default_rng((seed, epoch, index))
    box = sample_crop(width, height, rng, scale=scale)
    return box, bool(rng.random() < FLIP_PROBABILITY)


def crop_resize_flip(image: Image.Image, size: int, box: tuple[int, int, int, int], flip: bool) -> Image.Image:
    left, top, w, h = box
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
