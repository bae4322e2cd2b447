"""A photo corpus for loader benchmarks: ImageNet-like JPEGs made from the photographs scikit-image ships.

Flat synthetic shapes decode far faster than photos, so loader figures for a real run need photos. Each
class is one photograph; each image a random crop of it, resized to a size drawn from ImageNet's (longest
side about 500, from 200 to 2000; landscape 4:3 most often) and saved at a JPEG quality drawn from 75-95.
Written once per size under $SUPMAE_HOME, then converted by `supmae convert` at the stored side asked for.

    python -m benchmarks.loaders --corpus photos --max-res 320 --engines torch,ffcv,dali
"""
import os
import shutil

import numpy as np
from PIL import Image

from supmae.core.atomic import write_text
from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.synthetic import supmae_home

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
# (width / height, share): ImageNet's photos are mostly landscape 4:3, then 3:2, portrait and square.
ASPECTS = ((4 / 3, 0.55), (3 / 2, 0.15), (3 / 4, 0.2), (1.0, 0.1))
MEDIAN_SIDE, SIDE_SPREAD, SIDES = 500, 0.3, (200, 2000)  # the longest side: lognormal around 500, clipped
QUALITY = (75, 95)
DONE = "corpus.txt"  # written last: a corpus without it was interrupted and is written again


def photo(name: str) -> Image.Image:
    import skimage.data
    pixels = getattr(skimage.data, name)()
    return Image.fromarray(pixels[0] if isinstance(pixels, tuple) else pixels).convert("RGB")


def write_photos(root: str, images_per_class: int, seed: int = 0) -> str:
    """`len(PHOTOS)` classes of `images_per_class` JPEGs under `root` (written unless already complete)."""
    if os.path.exists(os.path.join(root, DONE)):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    aspects, shares = zip(*ASPECTS)
    for name in PHOTOS:
        source = photo(name)
        os.makedirs(os.path.join(root, name))
        for i in range(images_per_class):
            side = int(np.clip(MEDIAN_SIDE * np.exp(rng.normal(0, SIDE_SPREAD)), *SIDES))
            aspect = aspects[rng.choice(len(aspects), p=shares)]
            size = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
            # The largest crop of the source at that aspect, then 60-100% of it, anywhere.
            scale = rng.uniform(0.6, 1.0) * min(source.width / size[0], source.height / size[1])
            w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
            left, top = int(rng.integers(0, source.width - w + 1)), int(rng.integers(0, source.height - h + 1))
            view = source.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            view.save(os.path.join(root, name, f"{i:05d}.jpg"), quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
    write_text(os.path.join(root, DONE), f"{len(PHOTOS)} classes x {images_per_class} photos, seed {seed}\n")
    return root


def photo_folder(images_per_class: int) -> str:
    """The corpus of `images_per_class` photos a class under $SUPMAE_HOME, written once."""
    return write_photos(os.path.join(supmae_home(), f"photos-{len(PHOTOS)}x{images_per_class}", "images"),
                        images_per_class)


def photo_beton(images_per_class: int, max_resolution: int, workers: int) -> str:
    """The corpus converted to a JPEG .beton whose longest side is at most `max_resolution`, made once."""
    from supmae.pipelines.convert import convert
    folder = photo_folder(images_per_class)
    beton = os.path.join(os.path.dirname(folder), f"photos-{max_resolution}.beton")
    if not os.path.exists(beton):
        convert(ConvertConfig(src=folder, out=beton, storage=ConvertOptions(max_resolution=max_resolution),
                              workers=workers, progress=False))
    return beton
