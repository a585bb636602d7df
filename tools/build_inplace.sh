#!/usr/bin/env bash
# Quick developer build: compiles thrifty._C into build/dev-<cuda> and copies it (with
# _build_info.py) into python/thrifty/, so `PYTHONPATH=python pytest` runs the tree as it is.
# Usage: tools/build_inplace.sh [cmake -D options...]   e.g. THRIFTY_CUDA=off tools/build_inplace.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
mode=${THRIFTY_CUDA:-off}
bdir=build/dev-${mode}
cmake -S . -B "$bdir" -G Ninja -DPython_EXECUTABLE="$(command -v "$py")" -DTHRIFTY_CUDA="$mode" "$@" >/dev/null
cmake --build "$bdir" -j "${JOBS:-2}"
# copy, then rename over the old files: cp over a loaded .so in place would crash the processes running it
for f in "$bdir"/_C*.so "$bdir"/_build_info.py; do
  cp "$f" "python/thrifty/.$(basename "$f").tmp"
  mv -f "python/thrifty/.$(basename "$f").tmp" "python/thrifty/$(basename "$f")"
done
echo "built $(ls "$bdir"/_C*.so) -> python/thrifty/"
