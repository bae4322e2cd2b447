"""supmae's one compiled piece, the JPEG view decoder (pipelines/jpeg_crop.cpp), built against libjpeg-turbo and
OpenCV as pkg-config finds them: the libraries FFCV builds against. Everything else is in pyproject.toml."""
import subprocess

from setuptools import Extension, setup


def pkg_config(option: str, *packages: str) -> list[str]:
    try:
        flags = subprocess.run(["pkg-config", option, *packages], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"supmae's JPEG decoder needs pkg-config and the development files of "
                         f"{' and '.join(packages)} (Debian/Ubuntu: scripts/setup.sh installs them): {error}") from None
    return flags.stdout.split()


# A plain shared library that ctypes loads (numba calls it from FFCV's compiled pipelines); only the name
# follows Python's extension modules, so it installs beside the package's Python files.
packages = ("libjpeg", "opencv4")
setup(ext_modules=[Extension(
    "supmae.pipelines._jpeg_crop", ["pipelines/jpeg_crop.cpp"],
    include_dirs=[f[2:] for f in pkg_config("--cflags-only-I", *packages)],
    library_dirs=[f[2:] for f in pkg_config("--libs-only-L", *packages)],
    libraries=["jpeg", "opencv_core", "opencv_imgproc"],
    extra_compile_args=["-O2", "-std=c++17"],
)])
