"""Turning whatever an image file holds into upright 8-bit RGB, the one pixel format every engine trains on."""
import io
import math

import numpy as np
from PIL import Image, ImageOps

# The errors Pillow raises for files that are not images, are damaged or are cut short.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF rotation applied, CMYK/grey/palette converted, 16-bit scaled, alpha laid on white."""
    image = ImageOps.exif_transpose(image) if image.getexif().get(_ORIENTATION, 1) != 1 else image
    if image.mode in _SIXTEEN_BIT:
        # convert("RGB") would clip 16-bit values at 255, turning almost every pixel white.
        grey = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels often hold arbitrary colour; what a viewer shows is the image over white.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _source(path_or_bytes):
    """What PIL opens: a path as it is, encoded bytes (or a uint8 array of them) as a file."""
    if isinstance(path_or_bytes, np.ndarray):
        return io.BytesIO(path_or_bytes.data)
    return io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray, memoryview)) else path_or_bytes


def load_rgb(path_or_bytes) -> Image.Image:
    """Decode a file (path) or encoded bytes fully; raises one of UNREADABLE for anything broken."""
    with Image.open(_source(path_or_bytes)) as image:
        image.load()
        return to_rgb(image)


def load_reduced_rgb(path_or_bytes, longest: int) -> tuple[Image.Image, tuple[int, int]]:
    """Upright RGB and the file's full upright (width, height). A JPEG at least twice `longest` on its longest
    side decodes at the smallest DCT scale (1/2, 1/4, 1/8) that keeps that side at least `longest`, as
    Pillow's thumbnail decodes (its draft mode): a fraction of the work, for an image about to be shrunk."""
    with Image.open(_source(path_or_bytes)) as image:
        full = _upright_size(image)
        width, height = image.size
        if longest and image.format == "JPEG" and max(width, height) >= 2 * longest:
            scale = longest / max(width, height)
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        return to_rgb(image), full


def _upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if image.getexif().get(_ORIENTATION) in _TRANSPOSED else (width, height)


def upright_size(path_or_bytes) -> tuple[int, int]:
    """(width, height) of a file (path) or encoded bytes after EXIF rotation, from the header alone; raises
    one of UNREADABLE for what is not an image."""
    with Image.open(_source(path_or_bytes)) as image:
        return _upright_size(image)


_PNG = b"\x89PNG\r\n\x1a\n"


def without_png_profile(data: np.ndarray) -> np.ndarray:
    """PNG bytes without their iCCP chunk (an embedded colour profile); any other bytes as they are. No
    decoder here applies the profile, so the pixels do not change, but DALI's libpng prints a warning
    to stderr for every image whose profile it finds malformed, which is common in scraped data."""
    if data[:8].tobytes() != _PNG:
        return data
    kept, at, dropped = [data[:8]], 8, False
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4].tobytes(), "big"), data[at + 4:at + 8].tobytes()
        if kind == b"IDAT":  # a profile comes before the image data
            break
        end = at + 12 + length  # length, type, data, CRC
        if kind == b"iCCP":
            dropped = True
        else:
            kept.append(data[at:end])
        at = end
    return np.concatenate([*kept, data[at:]]) if dropped else data
