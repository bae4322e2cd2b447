"""SupMAE's pretraining augmentation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + flip.

Every engine draws its crop boxes with these semantics (torchvision's RandomResizedCrop), so their
batches are statistically the same whichever engine decodes them.
"""
import math

import numpy as np
from PIL import Image

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5


def sample_crop(width: int, height: int, rng: np.random.Generator,
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


def random_resized_crop_flip(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    left, top, w, h = sample_crop(image.width, image.height, rng)
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < FLIP_PROBABILITY:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image
