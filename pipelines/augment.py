"""SupMAE's pretraining augmentation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + flip (fine-tuning's
and the linear probe's crops scale 0.08-1, timm's and torchvision's default), and the evaluation view: the
centre square of 87.5% of the shorter side.

Every engine crops with these semantics (torchvision's RandomResizedCrop; FFCV's centre crop), so their
batches are statistically the same whichever engine decodes them; all three engines draw the very same boxes
and flips from (seed, epoch, index).
"""
import math

import numba
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CLASSIFIER_CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5
EVAL_CROP_FRACTION = 0.875


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True)
def _mix(x):
    """splitmix64's finaliser: a bijection of 64-bit words whose outputs pass as independent uniforms."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True)
def _uniform(key, draw):
    """The `draw`-th uniform in [0, 1) of the stream `key`: a counter-based generator, so the same numbers come
    out of compiled loader threads, worker processes and the main process alike."""
    return float(_mix(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)) * 2.0 ** -53


@numba.njit(cache=True)
def view(width, height, seed, epoch, index, train, scale_low, scale_high, fraction):
    """(left, top, width, height, flip) of one sample's view; numba-compiled, as compiled pipelines call it."""
    if not train:  # the centre square of `fraction` of the shorter side
        side = int(fraction * min(width, height))
        return (width - side) // 2, (height - side) // 2, side, side, False
    key = _mix(_mix(_mix(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(index))
    area = width * height
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    flip = _uniform(key, 40) < FLIP_PROBABILITY
    for attempt in range(10):  # torchvision's RandomResizedCrop
        target_area = area * (scale_low + (scale_high - scale_low) * _uniform(key, 4 * attempt))
        aspect = math.exp(log_low + (log_high - log_low) * _uniform(key, 4 * attempt + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(_uniform(key, 4 * attempt + 2) * (width - w + 1))
            top = int(_uniform(key, 4 * attempt + 3) * (height - h + 1))
            return left, top, w, h, flip
    # Ten misses: a centre crop at the nearest allowed aspect, as torchvision does.
    if width / height < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif width / height > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h, flip


def center_crop(width: int, height: int, fraction: float = EVAL_CROP_FRACTION) -> tuple[int, int, int, int]:
    return crop_and_flip(width, height, seed=0, epoch=0, index=0, train=False, fraction=fraction)[0]


def crop_and_flip(width: int, height: int, *, seed: int, epoch: int, index: int, train: bool,
                  scale: tuple[float, float] = CROP_SCALE,
                  fraction: float = EVAL_CROP_FRACTION) -> tuple[tuple[int, int, int, int], bool]:
    """The (left, top, width, height) box and flip of one sample's view, a function of its key alone: a random
    resized crop of `scale` of the area, or without `train` the centre square of `fraction` of the shorter side.
    The FFCV engine's compiled decoder calls `view` itself."""
    left, top, w, h, flip = view(width, height, seed, epoch, index, train, scale[0], scale[1], fraction)
    return (left, top, w, h), flip


def crop_resize_flip(image: Image.Image, size: int, box: tuple[int, int, int, int], flip: bool) -> Image.Image:
    left, top, w, h = box
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
