"""RandAugment's draws as timm makes them (the fine-tuning recipe's `rand-m9-mstd0.5-inc1`; `config.Policy`).

The torch engine runs timm's own transform on each PIL view in its workers (`timm_rand_augment`, under
`seeded`). FFCV's and DALI's views never pass through Python one by one: each image's ops and arguments are
drawn here on the host (`draw`) and applied to the batch on the device (`device_augment.RandAugment`). DALI's
own `fn.auto_augment.rand_augment` is not used: its op set (an identity op; no invert or solarize-add) and its
fixed magnitudes are not the recipe's.
"""
import contextlib
import math
import random

import numpy as np
from PIL import Image

from supmae.pipelines.augment import IMAGENET_MEAN
from supmae.pipelines.config import LEVEL_DENOM, Policy

TRANSLATE_PCT = 0.45    # timm's TranslateRel range, as a share of the side
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # what geometric ops uncover (timm's img_mean)
STREAM = 0x52414E44     # keeps these draws apart from the other draws of the same seed


def draw(policy: Policy, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ops, args) of n images, each (n, layers): the index into `ops` of each layer's op (-1 where the
    layer is skipped) and the op's argument as timm's level functions make it (0 for the ops that take
    none). The order of the draws differs from timm's; their distribution does not."""
    shape = (n, policy.layers)
    ops = rng.integers(len(policy.ops), size=shape)
    applied = rng.random(shape) <= policy.prob  # timm skips a layer when random() > prob
    if math.isinf(policy.std):
        level = rng.uniform(0, policy.magnitude, shape)
    elif policy.std > 0:
        level = rng.normal(policy.magnitude, policy.std, shape)
    else:
        level = np.full(shape, float(policy.magnitude))
    level = np.clip(level, 0.0, policy.max_magnitude)
    negate = rng.random(shape) > 0.5  # timm's _randomly_negate
    args = np.zeros(shape)
    for k, name in enumerate(policy.ops):
        chosen = ops == k
        args[chosen] = level_to_arg(name, level[chosen], negate[chosen])
    return np.where(applied, ops, -1), args


def level_to_arg(name: str, level: np.ndarray, negate: np.ndarray) -> np.ndarray:
    """timm's level functions (auto_augment.LEVEL_TO_ARG), over arrays, in timm's order of operations so
    the integer truncations fall where timm's do."""
    signed = np.where(negate, -1.0, 1.0)
    scaled = level / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return np.zeros_like(level)
    if name == "Rotate":
        return signed * (scaled * 30.0)
    if name in ("ShearX", "ShearY"):
        return signed * (scaled * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return signed * (scaled * TRANSLATE_PCT)
    if name == "Posterize":
        return np.floor(scaled * 4)
    if name == "PosterizeIncreasing":
        return 4 - np.floor(scaled * 4)
    if name == "Solarize":
        return np.minimum(256, np.floor(scaled * 256))
    if name == "SolarizeIncreasing":
        return 256 - np.minimum(256, np.floor(scaled * 256))
    if name == "SolarizeAdd":
        return np.minimum(128, np.floor(scaled * 110))
    if name.endswith("Increasing"):  # the enhancements, away from 1 either way
        return np.maximum(0.1, 1.0 + signed * (scaled * 0.9))
    return scaled * 1.8 + 0.1  # Color, Contrast, Brightness, Sharpness


def timm_rand_augment(text: str, size: int):
    """timm's RandAugment transform for PIL views of `size`, with the settings timm's `create_transform` gives
    it (the fine-tuning recipe's: bicubic, the mean as fill, translations of 45%). Its draws come from Python's
    and NumPy's global generators: apply it under `seeded`."""
    from timm.data.auto_augment import rand_augment_transform
    transform = rand_augment_transform(text, dict(translate_const=int(size * 0.45), img_mean=FILL,
                                                  interpolation=Image.Resampling.BICUBIC))
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize_pil
    return transform


def _posterize_pil(image: Image.Image, bits: int, **_) -> Image.Image:
    # Magnitude 10 keeps no bits: a black image, as under the Pillow the recipe was run with. Pillow 10 and
    # later refuse 0 bits in ImageOps.posterize, which would stop timm's transform for one image in ~700.
    mask = (256 - 2 ** (8 - bits)) & 255
    return image.point([value & mask for value in range(256)] * len(image.getbands()))


@contextlib.contextmanager
def seeded(key: tuple[int, ...]):
    """Python's and NumPy's global generators seeded from `key` (a sample's), and put back as they were after."""
    python, numpy = random.getstate(), np.random.get_state()
    seed = int(np.random.default_rng((*key, STREAM)).integers(2 ** 32))
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
