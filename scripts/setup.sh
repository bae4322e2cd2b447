#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in this checkout and installs supmae into it with
# everything it needs. Safe to run again: it only installs when the build's inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "supmae needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }

# Debian and Ubuntu ship venv support as a separate package.
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null
  else
    echo "install your distribution's python3-venv package first" >&2; exit 1
  fi
fi

# ffcv and supmae's JPEG view decoder compile against libjpeg-turbo and OpenCV, found through pkg-config.
if ! { command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg libjpeg opencv4; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libturbojpeg0-dev, libjpeg-dev, libopencv-dev and pkg-config (first time: a few minutes)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      libturbojpeg0-dev libjpeg-dev libopencv-dev pkg-config >/dev/null
  else
    echo "ffcv and supmae's JPEG decoder need libjpeg-turbo and OpenCV development files and pkg-config;" \
         "install them first (Debian/Ubuntu: libturbojpeg0-dev libjpeg-dev libopencv-dev pkg-config)" >&2; exit 1
  fi
fi

# ffcv and supmae's JPEG decoder are C++; Triton builds a small C launcher the first time it runs on a GPU.
include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if ! { command -v cc >/dev/null && command -v c++ >/dev/null && [ -f "$include/Python.h" ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "setup: installing C and C++ compilers and Python $ver headers" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc g++ "python$ver-dev" >/dev/null
  else
    echo "supmae needs C and C++ compilers and Python's headers; install them first" \
         "(Debian/Ubuntu: gcc g++ python3-dev)" >&2; exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.supmae-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ pipelines/jpeg_crop.cpp -nt "$stamp" ] || ! ls pipelines/_jpeg_crop.*.so >/dev/null 2>&1; then
  echo "setup: installing supmae and its dependencies into .venv (first time: a few minutes)" >&2
  # The registry's torch/torchvision builds are the CUDA ones; they run on CPU-only machines as well.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 \
    | { grep -v "^WARNING: Location" || true; } >&2
  touch "$stamp"
fi
