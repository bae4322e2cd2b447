"""The embedded default dataset: an ImageFolder of real JPEGs with learnable class structure.

Each class is a (shape, texture, hue) recipe. Every image draws one to three instances of its class's
shape in the class hue, at random sizes, places and rotations, over a background of the class texture
in random colours, plus a distractor shape and sensor-like noise. Sizes and JPEG qualities spread like
ImageNet's, so decoding and cropping cost what they cost on real data. Each image has a caption naming what
it shows (how many of which shape, colour, size, place, the background's texture and tone, the distractor)
in one of several phrasings, so image-text models learn more from it than the class name.
"""
import json
import logging
import math
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from supmae.core.atomic import replaced
from supmae.core.errors import SupmaeError
from supmae.pipelines.config import SynthConfig

logger = logging.getLogger(__name__)

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring")
TEXTURES = ("stripes", "checker", "dots", "gradient")
MANIFEST = "synthetic.json"
CLASS_NAMES = "class_names.txt"  # one description per class, for `supmae eval zeroshot --class-names`


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


class Scene(NamedTuple):
    """What an image shows, as its caption names it."""
    shape: str
    texture: str
    count: int
    hue: float                         # of the first instance of the class's shape
    size: float                        # its radius over the image's shorter side
    position: tuple[float, float]      # its centre, as fractions of width and height
    background: tuple[float, float]    # hue and value of the background's lighter colour
    background_saturation: float
    other: str                         # the distractor's shape
    other_rgb: tuple[int, int, int]


def draw(label: int, index: int, seed: int = 0) -> tuple[Image.Image, Scene]:
    """Image `index` of class `label` and what it shows: deterministic in (label, index, seed)."""
    rng = np.random.default_rng((seed, label, index))
    shape = SHAPES[label % len(SHAPES)]
    texture = TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    hue = (label * 0.618033988749895) % 1.0
    width, height = int(rng.integers(256, 513)), int(rng.integers(224, 449))

    dark = np.array(_hue_rgb(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.1, 0.5)), np.float32)
    light_hue, light_saturation, light_value = rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.5, 0.9)
    light = np.array(_hue_rgb(light_hue, light_saturation, light_value), np.float32)
    field = _texture(texture, width, height, rng)[..., None]
    image = Image.fromarray((dark + (light - dark) * field).astype(np.uint8))

    canvas = ImageDraw.Draw(image)
    side = min(width, height)
    other = SHAPES[int(rng.integers(len(SHAPES)))]
    ox, oy, oradius, orotation = (rng.uniform(0, width), rng.uniform(0, height), side * rng.uniform(0.05, 0.12),
                                  rng.uniform(0, 2 * math.pi))
    red, green, blue = (int(c) for c in rng.integers(0, 256, 3))
    other_rgb = (red, green, blue)
    _draw_shape(canvas, other, ox, oy, oradius, orotation, other_rgb)
    instances = []
    for _ in range(int(rng.integers(1, 4))):
        radius = side * rng.uniform(0.12, 0.3)
        instance_hue = (hue + rng.normal(0, 0.03)) % 1.0
        colour = _hue_rgb(instance_hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        _draw_shape(canvas, shape, cx, cy, radius, rng.uniform(0, 2 * math.pi), colour)
        instances.append((instance_hue, radius / side, (cx / width, cy / height)))

    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 8), (height, width, 1))
    first_hue, first_size, first_position = instances[0]
    scene = Scene(shape, texture, len(instances), first_hue, first_size, first_position, (light_hue, light_value),
                  light_saturation, other, other_rgb)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), scene


# Names, with synonyms, for what a caption says; a caption draws its words from its own generator, so the
# images are the same with or without captions.
_SHAPE_NAMES = {"circle": ("circle", "disc"), "triangle": ("triangle",), "square": ("square",),
                "pentagon": ("pentagon",), "hexagon": ("hexagon",), "star": ("star",), "cross": ("cross", "plus sign"),
                "ring": ("ring", "hoop")}
_TEXTURE_NAMES = {"stripes": ("striped", "stripy"), "checker": ("checkered", "chequered"),
                  "dots": ("dotted", "spotted"), "gradient": ("shaded", "graded")}
_HUES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.53, "cyan"), (0.71, "blue"),
         (0.83, "purple"), (0.96, "pink"), (1.0, "red"))
_COUNTS = {1: ("a", "one"), 2: ("two", "a pair of"), 3: ("three",)}
_SIZES = ((0.18, ("small", "little")), (0.24, ("medium-sized", "mid-sized")), (1.0, ("large", "big")))
_TEMPLATES = (
    "{count} {size} {colour} {shape} on a {tone} {texture} background",
    "a picture of {count} {colour} {shape} {position}, over a {texture} pattern",
    "{count} {shape} in {colour}, {size}, against a {tone} {texture} background, with a small {other} nearby",
    "{count} {size} {colour} {shape} {position} of the picture",
    "a {tone} {texture} background with {count} {colour} {shape} and a {other_colour} {other}",
)


def _hue_name(hue: float) -> str:
    return next(name for bound, name in _HUES if hue % 1.0 < bound)


def _rgb_name(rgb: tuple[int, int, int]) -> str:
    r, g, b = (c / 255 for c in rgb)
    high, low = max(r, g, b), min(r, g, b)
    if high - low < 0.15:
        return "grey" if 0.25 < high < 0.8 else ("white" if high >= 0.8 else "black")
    h = ((g - b) / (high - low) % 6 if high == r else (b - r) / (high - low) + 2 if high == g
         else (r - g) / (high - low) + 4) / 6
    return _hue_name(h)


def _position(x: float, y: float) -> str:
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    column = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    if row and column:
        return f"in the {row} {column}"
    return f"on the {column}" if column else (f"at the {row}" if row else "in the centre")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A sentence naming what `scene` shows: the shape, how many, colour, size, position, the background's
    texture and tone, and the small shape beside them, in one of several phrasings."""
    def pick(options):
        return options[int(rng.integers(len(options)))]
    shape = pick(_SHAPE_NAMES[scene.shape])
    plural = scene.count > 1
    words = dict(
        count=pick(_COUNTS[scene.count]),
        shape=(shape + ("es" if shape.endswith(("s", "x")) else "s")) if plural else shape,
        colour=_hue_name(scene.hue),
        size=pick(next(names for bound, names in _SIZES if scene.size < bound)),
        position=_position(*scene.position),
        texture=pick(_TEXTURE_NAMES[scene.texture]),
        tone=("grey" if scene.background_saturation < 0.12 else f"pale {_hue_name(scene.background[0])}")
        if scene.background[1] > 0.7 else "dark",
        other=pick(_SHAPE_NAMES[scene.other]),
        other_colour=_rgb_name(scene.other_rgb),
    )
    return re.sub(r"\ba (?=[aeiou])", "an ", pick(_TEMPLATES).format(**words))


def class_descriptions(num_classes: int) -> list[str]:
    """Each class in the words its captions use ("red circle on a striped background"): the names zero-shot
    classification prompts with (`supmae synth` writes them to CLASS_NAMES)."""
    return [f"{_hue_name((k * 0.618033988749895) % 1.0)} {_SHAPE_NAMES[SHAPES[k % len(SHAPES)]][0]} on a "
            f"{_TEXTURE_NAMES[TEXTURES[(k // len(SHAPES)) % len(TEXTURES)]][0]} background" for k in range(num_classes)]


def caption_of(label: int, index: int, seed: int = 0) -> str:
    """The caption of image `index` of class `label` (drawn again: use `draw` where the image is wanted too)."""
    return caption(draw(label, index, seed)[1], np.random.default_rng((seed, label, index, 2)))


def render(label: int, index: int, seed: int = 0) -> Image.Image:
    """Image `index` of class `label`: deterministic in (label, index, seed)."""
    return draw(label, index, seed)[0]


def _write_one(job):
    """The image as a JPEG, and its caption beside it as IMAGE-STEM.txt."""
    path, label, index, seed = job
    image, scene = draw(label, index, seed)
    image.save(path, "JPEG", quality=int(np.random.default_rng((seed, label, index, 1)).integers(75, 96)))
    with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write(caption(scene, np.random.default_rng((seed, label, index, 2))) + "\n")


def write_synthetic(out_dir: str, *, num_classes: int = 10, images_per_class: int = 100, seed: int = 0,
                    workers: int | None = None, force: bool = False, shared: bool = False) -> str:
    """Write the dataset to `out_dir` (whole or not at all: a temporary folder renamed at the end): a JPEG
    per image and its caption beside it (`000012.jpg`, `000012.txt`).

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
            with open(os.path.join(tmp, CLASS_NAMES), "w") as f:
                f.write("".join(f"{name}\n" for name in class_descriptions(num_classes)))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(dict(num_classes=num_classes, images_per_class=images_per_class, seed=seed, captions=True), f)
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


def supmae_home() -> str:
    """Where supmae keeps what it makes once: $SUPMAE_HOME, default ~/.cache/supmae."""
    return os.environ.get("SUPMAE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "supmae")


def default_dataset(num_classes: int = 10, images_per_class: int = 100) -> str:
    """The embedded dataset under `supmae_home()`, written on first use."""
    path = os.path.join(supmae_home(), f"synthetic-{num_classes}x{images_per_class}-captioned")  # named apart from
    # the first version's folders, which hold no captions and are never replaced
    if not os.path.exists(os.path.join(path, MANIFEST)):
        write_synthetic(path, num_classes=num_classes, images_per_class=images_per_class, shared=True)
    return path
