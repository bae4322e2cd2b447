"""The embedded default dataset: an ImageFolder of real JPEGs with learnable class structure.

Each class is a (shape, texture, hue) recipe. Every image draws one to three instances of its class's
shape in the class hue, at random sizes, places and rotations, over a background of the class texture
in random colours, plus a distractor shape and sensor-like noise. Sizes and JPEG qualities spread like
ImageNet's, so decoding and cropping cost what they cost on real data.
"""
import json
import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from supmae.atomic import replaced
from supmae.config import SynthConfig
from supmae.errors import SupmaeError

logger = logging.getLogger(__name__)

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring")
TEXTURES = ("stripes", "checker", "dots", "gradient")
MANIFEST = "synthetic.json"


def class_names(num_classes: int) -> list[str]:
    return [f"{k:04d}_{SHAPES[k % len(SHAPES)]}_{TEXTURES[(k // len(SHAPES)) % len(TEXTURES)]}"
            for k in range(num_classes)]


def _hue_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    r, g, b = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _texture(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A (height, width) field in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(12, 40)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du**2 + dv**2 < (period / 4) ** 2).astype(np.float32)
    return (u - u.min()) / max(float(u.max() - u.min()), 1.0)


def _polygon(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "star":
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
    elif shape == "cross":
        a, b = radius, radius * 0.35
        points = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b),
                  (-b, a)]
        return [(cx + px * math.cos(rotation) - py * math.sin(rotation),
                 cy + px * math.sin(rotation) + py * math.cos(rotation)) for px, py in points]
    else:
        radii = [radius] * {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
    n = len(radii)
    return [(cx + r * math.cos(rotation + 2 * math.pi * i / n), cy + r * math.sin(rotation + 2 * math.pi * i / n))
            for i, r in enumerate(radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, radius, rotation, colour):
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, rotation), fill=colour)


def render(label: int, index: int, seed: int = 0) -> Image.Image:
    """Image `index` of class `label`: deterministic in (label, index, seed)."""
    rng = np.random.default_rng((seed, label, index))
    shape = SHAPES[label % len(SHAPES)]
    texture = TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    hue = (label * 0.618033988749895) % 1.0
    width, height = int(rng.integers(256, 513)), int(rng.integers(224, 449))

    dark = np.array(_hue_rgb(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.1, 0.5)), np.float32)
    light = np.array(_hue_rgb(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.5, 0.9)), np.float32)
    field = _texture(texture, width, height, rng)[..., None]
    image = Image.fromarray((dark + (light - dark) * field).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    side = min(width, height)
    other = SHAPES[int(rng.integers(len(SHAPES)))]
    _draw_shape(draw, other, rng.uniform(0, width), rng.uniform(0, height), side * rng.uniform(0.05, 0.12),
                rng.uniform(0, 2 * math.pi), tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(1, 4))):
        radius = side * rng.uniform(0.12, 0.3)
        colour = _hue_rgb((hue + rng.normal(0, 0.03)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        _draw_shape(draw, shape, rng.uniform(radius, width - radius), rng.uniform(radius, height - radius), radius,
                    rng.uniform(0, 2 * math.pi), colour)

    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 8), (height, width, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_one(job):
    path, label, index, seed = job
    render(label, index, seed).save(path, "JPEG", quality=int(np.random.default_rng((seed, label, index, 1))
                                                              .integers(75, 96)))


def write_synthetic(out_dir: str, *, num_classes: int = 10, images_per_class: int = 100, seed: int = 0,
                    workers: Optional[int] = None, force: bool = False, shared: bool = False) -> str:
    """Write the dataset to `out_dir` (whole or not at all: a temporary folder renamed at the end).

    `shared`: other processes may be writing the same dataset to `out_dir` at once (torchrun ranks filling the
    default one). The first to finish publishes it; the others discard their copies and use that one, which
    is never replaced, as they may be reading it already.
    """
    if num_classes < 2 or images_per_class < 1:
        raise SupmaeError("synthetic data needs at least 2 classes and 1 image per class")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not shared:
        if not force:
            raise SupmaeError(f"{out_dir} already exists and is not empty (pass --force to replace it)")
        here, target = os.path.realpath(os.getcwd()), os.path.realpath(out_dir)
        if os.path.commonpath([here, target]) == target:
            raise SupmaeError(f"{out_dir} holds the current folder; replacing it would delete the folder you are in")
        if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise SupmaeError(f"{out_dir} holds files that are not a synthetic dataset; --force replaces only a "
                              "dataset supmae synth wrote")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    try:
        with replaced(out_dir) as tmp:
            jobs = []
            for label, name in enumerate(class_names(num_classes)):
                os.makedirs(os.path.join(tmp, name))
                jobs += [(os.path.join(tmp, name, f"{index:06d}.jpg"), label, index, seed)
                         for index in range(images_per_class)]
            workers = workers or os.cpu_count() or 1
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    list(pool.map(_write_one, jobs, chunksize=16))
            else:
                list(map(_write_one, jobs))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(dict(num_classes=num_classes, images_per_class=images_per_class, seed=seed), f)
            if os.path.exists(out_dir) and not shared:
                shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
    except OSError:  # in shared mode another writer may have published first; its copy is the same data
        if not (shared and os.path.exists(os.path.join(out_dir, MANIFEST))):
            raise
    return out_dir


def synth(cfg: SynthConfig) -> str:
    """`supmae synth`."""
    write_synthetic(cfg.out_dir, num_classes=cfg.classes, images_per_class=cfg.images_per_class, seed=cfg.seed,
                    workers=cfg.workers, force=cfg.force)
    logger.info(f"wrote {cfg.classes} x {cfg.images_per_class} images to {cfg.out_dir}")
    return cfg.out_dir


def default_dataset(num_classes: int = 10, images_per_class: int = 100) -> str:
    """The embedded dataset under $SUPMAE_HOME (default ~/.cache/supmae), written on first use."""
    home = os.environ.get("SUPMAE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "supmae")
    path = os.path.join(home, f"synthetic-{num_classes}x{images_per_class}")
    if not os.path.exists(os.path.join(path, MANIFEST)):
        write_synthetic(path, num_classes=num_classes, images_per_class=images_per_class, shared=True)
    return path
