"""The JPEG view decoder against decoding the whole image, then cropping and resizing the same box."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from supmae.pipelines.decode import load_rgb
from supmae.pipelines.jpeg_crop import TOO_LARGE, UNDECODABLE, jpeg_view
from supmae.pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():
    from ffcv.fields.rgb_image import encode_jpeg
    from ffcv.libffcv import imdecode

WIDTH, HEIGHT = 203, 157  # odd, and not a whole number of 16-pixel iMCUs


def stored(mode: str) -> np.ndarray:
    """Ramps across and down the image in `mode`, stored as convert stores it: upright RGB, then FFCV's JPEG
    encoder. Any resampler that keeps its place reproduces a ramp, so what differs is where pixels land."""
    x, y = np.meshgrid(np.linspace(0, 1, WIDTH), np.linspace(0, 1, HEIGHT))
    ramps = np.stack([40 + 180 * x, 30 + 200 * y, 220 - 90 * x - 90 * y, 255 - 60 * y], axis=-1)
    image = Image.fromarray(np.rint(ramps).astype(np.uint8), "RGBA")
    image = image.convert("CMYK") if mode == "CMYK" else image.convert(mode)
    encoded = io.BytesIO()
    image.save(encoded, "JPEG" if mode != "RGBA" else "PNG", quality=95)
    return encode_jpeg(np.asarray(load_rgb(encoded.getvalue())), 90)


def whole(data: np.ndarray) -> np.ndarray:
    pixels = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    imdecode(data, pixels, HEIGHT, WIDTH, HEIGHT, WIDTH, 0, 0, 1, 1, False, False)
    return pixels


def view(data: np.ndarray, box, out: tuple[int, int], flip: bool = False) -> np.ndarray:
    left, top, w, h = box
    pixels, scratch = np.zeros((*out, 3), np.uint8), np.empty(WIDTH * HEIGHT * 3, np.uint8)
    status = jpeg_view(data.ctypes.data, data.size, left, top, w, h, pixels.ctypes.data, out[0], out[1], flip,
                       scratch.ctypes.data, scratch.size)
    assert status == 0
    return pixels


def reference(data: np.ndarray, box, out: tuple[int, int], interpolation: int) -> np.ndarray:
    left, top, w, h = box
    return cv2.resize(whole(data)[top:top + h, left:left + w], out[::-1], interpolation=interpolation)


# Boxes touching each edge, odd sizes, and the whole image.
BOXES = [(0, 0, WIDTH, HEIGHT), (0, 11, 97, 83), (WIDTH - 121, 5, 121, 99), (37, 0, 101, 77),
         (13, HEIGHT - 109, 131, 109), (WIDTH - 145, HEIGHT - 131, 145, 131)]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA"])
@pytest.mark.parametrize("box", BOXES)
def test_at_full_scale_a_view_is_the_whole_decode_cropped_and_resized(mode, box):
    """A box less than twice the output decodes at full scale: pixel for pixel the whole decode, cropped, resized."""
    data = stored(mode)
    out = (box[3] * 3 // 4, box[2] * 3 // 4)
    np.testing.assert_array_equal(view(data, box, out), reference(data, box, out, cv2.INTER_LINEAR))
    np.testing.assert_array_equal(view(data, box, (box[3], box[2])), whole(data)[box[1]:box[1] + box[3],
                                                                                 box[0]:box[0] + box[2]])


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("shrink", [2, 4, 8], ids=["half", "quarter", "eighth"])
def test_at_each_dct_scale_a_view_is_close_to_the_area_resize(mode, box, shrink):
    """A box `shrink` or more times the output decodes at 1/shrink: close to FFCV's way, the whole image
    decoded and the box area-resized. Where the ramps land is exact (a pixel's shift would cost 7 levels at
    1/8); what remains is the smaller inverse DCTs' rounding."""
    data = stored(mode)
    out = (box[3] // shrink, box[2] // shrink)
    difference = np.abs(view(data, box, out).astype(np.int16) - reference(data, box, out, cv2.INTER_AREA))
    assert difference.mean() < 2 and np.percentile(difference, 99) <= 6


def test_a_flip_mirrors_the_view():
    data, box = stored("RGB"), (5, 7, 150, 120)
    np.testing.assert_array_equal(view(data, box, (60, 75), flip=True), view(data, box, (60, 75))[:, ::-1])


def test_an_upscaled_view_is_the_bilinear_resize():
    data, box = stored("RGB"), (50, 40, 31, 23)
    np.testing.assert_array_equal(view(data, box, (64, 64)), reference(data, box, (64, 64), cv2.INTER_LINEAR))


def test_bad_bytes_and_a_small_scratch_are_reported():
    data, pixels = stored("RGB"), np.zeros((8, 8, 3), np.uint8)
    junk = np.frombuffer(b"not a jpeg at all" * 10, np.uint8)
    small = np.empty(100, np.uint8)
    for source, scratch, status in [(junk, np.empty(WIDTH * HEIGHT * 3, np.uint8), UNDECODABLE),
                                    (data, small, TOO_LARGE)]:
        assert jpeg_view(source.ctypes.data, source.size, 0, 0, WIDTH, HEIGHT, pixels.ctypes.data, 8, 8, False,
                         scratch.ctypes.data, scratch.size) == status
