"""The fine-tuning augmentations that FFCV and DALI apply on the device, every engine alike for erasing.

`RandAugment` runs timm's policy (`config.Policy`, drawn by `randaugment.draw`) over a uint8 batch: each op
once per layer over the images that drew it, in PIL's arithmetic (each op's output equals PIL's pixel for
pixel; the tests compare every op). `RandomErasing` is timm's (`--reprob`, pixel mode, one box) over the
normalised batch: each box drawn on the host as timm draws it, filled with standard normal noise.
"""
import math

import numpy as np
import torch

from supmae.pipelines.config import Policy
from supmae.pipelines.randaugment import FILL, STREAM, draw


class RandAugment:
    """`policy` over uint8 (B, 3, H, W) batches: batch `index` gets the draws of (seed, index), whatever the
    device or the number of workers."""

    def __init__(self, policy: Policy, seed: int):
        self.policy, self.seed = policy, seed

    def __call__(self, images: torch.Tensor, index: int) -> torch.Tensor:
        n, _, height, width = images.shape
        ops, args = draw(self.policy, n, np.random.default_rng((self.seed, STREAM, index)))
        groups, blocks = [], []
        for layer in range(self.policy.layers):
            for k in np.unique(ops[:, layer]):
                if k >= 0:
                    rows = np.flatnonzero(ops[:, layer] == k)
                    name = self.policy.ops[k]
                    groups.append(name)
                    block = np.zeros((len(rows), 1 + _PARAMETERS))
                    block[:, 0] = rows
                    parameters = op_parameters(name, args[rows, layer], width, height)
                    block[:, 1:1 + parameters.shape[1]] = parameters
                    blocks.append(block)
        if not blocks:
            return images
        images = images.clone()
        # Every group's rows and parameters cross to the device in one copy.
        on_device = to_device(np.concatenate(blocks), images.device).split([len(b) for b in blocks])
        for name, block in zip(groups, on_device):
            rows = block[:, 0].long()
            images.index_copy_(0, rows, apply_op(name, images.index_select(0, rows), block[:, 1:]))
        return images


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for it: from pinned memory (from pageable memory a copy
    first waits for the stream's work, the running step's included)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


_PARAMETERS = 6  # the most an op takes: an affine matrix


def op_parameters(name: str, args: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, p) float64: what op `name` needs on the device for each image, from its timm argument: the affine
    matrix PIL would use for a geometric op, the argument itself for the others (p = 0 for those with none)."""
    if name in _AFFINE:
        return np.array([_AFFINE[name](float(a), width, height) for a in args], np.float64).reshape(len(args), 6)
    if name in _POINT:
        return np.zeros((len(args), 0))
    return args.reshape(-1, 1).astype(np.float64)


def apply_op(name: str, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """Op `name` of timm's RandAugment on uint8 (n, 3, H, W) images, image i with parameters[i]
    (`op_parameters`, on the images' device; columns past the op's are ignored)."""
    if name in _AFFINE:
        return affine(images, parameters[:, :6])
    if name in _POINT:
        return _POINT[name](images)
    arg = parameters[:, 0]
    if name.startswith("Posterize"):
        return posterize(images, arg)
    if name.startswith("Solarize"):
        return solarize_add(images, arg) if name == "SolarizeAdd" else solarize(images, arg)
    degenerate = _DEGENERATE[name.removesuffix("Increasing")](images)
    return blend(degenerate, images, arg.float())


# Geometric ops: PIL's affine matrices (output pixel centre -> input point), as timm asks PIL for them.

def _rotation(degrees: float, width: int, height: int) -> tuple[float, ...]:
    # Image.rotate's matrix about the centre, rounded as PIL rounds it.
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy


_AFFINE = {
    "Rotate": _rotation,
    "ShearX": lambda f, w, h: (1.0, f, 0.0, 0.0, 1.0, 0.0),
    "ShearY": lambda f, w, h: (1.0, 0.0, 0.0, f, 1.0, 0.0),
    "TranslateXRel": lambda pct, w, h: (1.0, 0.0, pct * w, 0.0, 1.0, 0.0),
    "TranslateYRel": lambda pct, w, h: (1.0, 0.0, 0.0, 0.0, 1.0, pct * h),
}


def _cubic(v1, v2, v3, v4, d):
    # PIL's transform bicubic (Geometry.c, a = -1), term for term.
    p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """PIL's `Image.transform(AFFINE, matrix, BICUBIC, fillcolor=FILL)` of each image: every output pixel
    centre mapped through its image's matrix, sampled bicubically with edge pixels repeated, FILL where the
    point falls outside the image, truncated to uint8 as PIL does."""
    n, channels, height, width = images.shape
    device = images.device
    m = matrices.reshape(n, 6, 1, 1)
    y, x = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float64) + 0.5,
                          torch.arange(width, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    xs, ys = m[:, 0] * x + m[:, 1] * y + m[:, 2], m[:, 3] * x + m[:, 4] * y + m[:, 5]  # (n, H, W)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    xs, ys = xs - 0.5, ys - 0.5
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = (xs - x0).unsqueeze(1), (ys - y0).unsqueeze(1)
    cols = [(x0 + i).clamp_(0, width - 1).long().view(n, 1, -1) for i in (-1, 0, 1, 2)]
    rows = [(y0 + j).clamp_(0, height - 1).long().view(n, 1, -1) * width for j in (-1, 0, 1, 2)]
    flat = images.reshape(n, channels, height * width)

    def tap(row, col):  # gathered as uint8, an eighth of the bytes of float64
        return flat.gather(2, (row + col).expand(n, channels, -1)).view(n, channels, height, width).double()

    across = []
    for row in rows:
        taps = [tap(row, col) for col in cols]
        across.append(_cubic(taps[0], taps[1], taps[2], taps[3], dx))
    value = _cubic(across[0], across[1], across[2], across[3], dy).clamp(0, 255).trunc()
    fill = torch.cat([torch.full((1, 1, 1, 1), float(v), dtype=torch.float64, device=device) for v in FILL], 1)
    return torch.where(inside.unsqueeze(1), value, fill).to(torch.uint8)


# Point ops, per image and channel, as ImageOps computes its lookup tables.

def _histograms(images: torch.Tensor) -> torch.Tensor:
    n, channels = images.shape[:2]
    flat = images.reshape(n * channels, -1).long() + 256 * torch.arange(n * channels, device=images.device)[:, None]
    return torch.bincount(flat.flatten(), minlength=256 * n * channels).view(n, channels, 256)


def _lookup(images: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    n, channels = images.shape[:2]
    picked = tables.clamp(0, 255).to(torch.uint8).gather(2, images.reshape(n, channels, -1).long())
    return picked.view(images.shape)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: each channel stretched from its lowest to its highest value."""
    histograms = _histograms(images) > 0
    levels = torch.arange(256, device=images.device, dtype=torch.float64)
    lo = torch.where(histograms, levels, math.inf).amin(2, keepdim=True)
    hi = torch.where(histograms, levels, -math.inf).amax(2, keepdim=True)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)  # a true division: `255.0 / t` multiplies
    stretched = (levels * scale + -lo * scale).trunc()
    return _lookup(images, torch.where(hi > lo, stretched, levels))


def equalize(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: each channel's histogram flattened, in PIL's integer steps."""
    histograms = _histograms(images)
    levels = torch.arange(256, device=images.device)
    present = histograms > 0
    last = histograms.gather(2, torch.where(present, levels, -1).argmax(2, keepdim=True))  # the top value's count
    step = (histograms.sum(2, keepdim=True) - last) // 255
    below = histograms.cumsum(2) - histograms
    tables = (step // 2 + below) // step.clamp(min=1)
    keep = (present.sum(2, keepdim=True) <= 1) | (step == 0)
    return _lookup(images, torch.where(keep, levels, tables))


def invert(images: torch.Tensor) -> torch.Tensor:
    return 255 - images


_POINT = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert}


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: the top `bits` bits of each value kept."""
    mask = (256 - 2 ** (8 - bits.long())).to(torch.uint8)
    return images & _per_image(mask)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: values at or above the threshold inverted."""
    return torch.where(images >= _per_image(threshold), 255 - images, images)


def solarize_add(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: values under 128 raised by `add`, saturating."""
    raised = (images.to(torch.int16) + _per_image(add).to(torch.int16)).clamp(max=255).to(torch.uint8)
    return torch.where(images < 128, raised, images)


# The enhancements: ImageEnhance's blends of each image with a degenerate version of it.

def grey(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, in its fixed-point weights, as (n, 1, H, W) int32."""
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _contrast_degenerate(images: torch.Tensor) -> torch.Tensor:
    level = grey(images)
    mean = level.sum((1, 2, 3), dtype=torch.int64).double() / level[0].numel()
    return _per_image((mean + 0.5).floor()).expand_as(images)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    # ImageFilter.SMOOTH (3x3: 1s around a 5, over 13), rounded; PIL leaves the border pixels as they are.
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5
    kernel /= 13
    channels = images.shape[1]
    smoothed = torch.nn.functional.conv2d(images.float(), kernel.expand(channels, 1, 3, 3), groups=channels)
    out = images.float().clone()
    out[..., 1:-1, 1:-1] = (smoothed + 0.5).floor().clamp(0, 255)
    return out


_DEGENERATE = {
    "Color": lambda images: grey(images).expand_as(images),
    "Contrast": _contrast_degenerate,
    "Brightness": torch.zeros_like,
    "Sharpness": _smooth,
}


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, images, factor) in its float32 arithmetic: truncated, and clipped when
    the factor extrapolates."""
    low = degenerate.float()
    mixed = low + _per_image(factor) * (images.float() - low)
    return mixed.clamp(0, 255).trunc().to(torch.uint8)


# Random erasing.

MIN_AREA, MAX_AREA = 0.02, 1 / 3  # of the image
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
_ERASE_STREAM = 0x45524153


def erase_box(height: int, width: int, probability: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one image's box (h = w = 0: not erased), by timm's rule: erased with `probability`,
    then up to ten tries at an area of 2-33% and an aspect of 0.3-3.3 that fits inside."""
    if rng.random() > probability:
        return 0, 0, 0, 0
    for _ in range(10):
        area = rng.uniform(MIN_AREA, MAX_AREA) * height * width
        aspect = math.exp(rng.uniform(*LOG_ASPECT))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if w < width and h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, 0, 0


class RandomErasing:
    """Batch `index` gets the boxes and noise of (seed, index), whatever the device or the number of workers."""

    def __init__(self, probability: float, seed: int):
        self.probability, self.seed = probability, seed
        self._generator: torch.Generator | None = None  # one, reseeded for each batch's noise

    def __call__(self, images: torch.Tensor, index: int) -> torch.Tensor:
        n, channels, height, width = images.shape
        rng = np.random.default_rng((self.seed, _ERASE_STREAM, index))
        boxes = np.array([erase_box(height, width, self.probability, rng) for _ in range(n)])
        if not boxes[:, 2].any():
            return images
        top, left, h, w = to_device(boxes, images.device).view(n, 4, 1, 1).unbind(1)
        rows = torch.arange(height, device=images.device).view(1, height, 1)
        cols = torch.arange(width, device=images.device).view(1, 1, width)
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        if self._generator is None or self._generator.device != images.device:
            self._generator = torch.Generator(images.device)
        self._generator.manual_seed(int(rng.integers(2 ** 63)))
        noise = torch.randn(images.shape, generator=self._generator, device=images.device, dtype=images.dtype)
        return torch.where(inside.unsqueeze(1), noise, images)
