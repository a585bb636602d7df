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
cp "$bdir"/_C*.so python/thrifty/
cp "$bdir"/_build_info.py python/thrifty/
echo "built $(ls "$bdir"/_C*.so) -> python/thrifty/"
