"""The JPEG view decoder (jpeg_crop.cpp, built by `pip install`) as ctypes functions, which numba-compiled code
calls as it calls FFCV's own: `jpeg_view` decodes one sample's view from its JPEG bytes, decoding only the
crop, at the smallest DCT scale that still covers the output; `load_int64` reads a value through its address."""
import ctypes
import importlib.util
from ctypes import c_int64, c_uint64, c_void_p

from supmae.core.errors import SupmaeError

_spec = importlib.util.find_spec("supmae.pipelines._jpeg_crop")
if _spec is None or _spec.origin is None:
    raise SupmaeError("supmae's JPEG decoder is not built; run scripts/setup.sh (or pip install -e . again)")
_library = ctypes.CDLL(_spec.origin)

jpeg_view = _library.supmae_jpeg_view
jpeg_view.argtypes = [c_void_p, c_uint64, c_int64, c_int64, c_int64, c_int64,  # data, size, left, top, width, height
                      c_void_p, c_int64, c_int64, c_int64, c_void_p, c_uint64]  # out, height, width, flip, scratch
jpeg_view.restype = c_int64
UNDECODABLE, TOO_LARGE = -1, -2  # what jpeg_view returns instead of 0

load_int64 = _library.supmae_load_int64
load_int64.argtypes = [c_int64]
load_int64.restype = c_int64
