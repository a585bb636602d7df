#!/usr/bin/env bash
# Runs the CPU test suite at the avx512 and avx512_bf16 ISA levels on a machine WITHOUT AVX-512,
# with the AVX-512 intrinsics emulated by SIMDe (CMake THRIFTY_EMULATE_AVX512, see
# tools/avx512_emu/shim.h). Catches bugs in the AVX-512 code paths before they reach users with
# AVX-512 (+BF16, VNNI) machines; it says nothing about their speed.
#
#   tools/test_avx512_emulated.sh [pytest args]     e.g.  -x  or  tests/test_norm.py (default: all of tests/)
#
# 1. fetches SIMDe's headers into build/simde/include (PyPI package simde-py, not committed),
# 2. builds thrifty._C into build/emu-avx512 (the normal build/dev-* and python/thrifty/_C*.so
#    are left alone),
# 3. runs pytest on a temporary copy of python/ holding the emulated _C, with THRIFTY_TEST_ISAS
#    limiting the `cpu_isa` fixture to the emulated levels (tests without the fixture run at the
#    default level, avx512_bf16).
# Env: PYTHON (default python), JOBS (build jobs, default 2), SIMDE_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-python}
simde_version=${SIMDE_VERSION:-0.8.2.post1}
simde_dir=$root/build/simde/include
bdir=$root/build/emu-avx512
t_start=$(date +%s)

# ---- 1. SIMDe ----
if [[ ! -f $simde_dir/simde/x86/avx512.h ]]; then
  echo "== fetching SIMDe (PyPI simde-py==$simde_version) into $simde_dir"
  dl=$(mktemp -d)
  "$py" -m pip download --no-deps -q -d "$dl" "simde-py==$simde_version"
  archive=$(ls "$dl"/simde_py-* | head -1)
  mkdir -p "$dl/x"
  case $archive in
    *.whl | *.zip) "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$archive" "$dl/x" ;;
    *) tar xzf "$archive" -C "$dl/x" ;;
  esac
  src=$(dirname "$(find "$dl/x" -path '*/simde/x86/avx512.h' | head -1)")  # .../simde/x86
  [[ -d $src ]] || { echo "no simde/x86/avx512.h in $archive" >&2; exit 1; }
  mkdir -p "$simde_dir"
  rm -rf "$simde_dir/simde"
  cp -r "$(dirname "$src")" "$simde_dir/simde"
  rm -rf "$dl"
fi

# ---- 2. build ----
echo "== building the emulated extension in $bdir"
cmake -S . -B "$bdir" -G Ninja -DPython_EXECUTABLE="$(command -v "$py")" -DTHRIFTY_CUDA=off \
  -DTHRIFTY_EMULATE_AVX512=ON -DTHRIFTY_SIMDE_DIR="$simde_dir" >/dev/null
cmake --build "$bdir" -j "${JOBS:-2}"
t_built=$(date +%s)

# ---- 3. test, on a copy of python/ so the normal build's _C stays in place ----
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r python "$tmp/python"
rm -f "$tmp"/python/thrifty/_C*.so "$tmp"/python/thrifty/_build_info.py
find "$tmp/python" -name __pycache__ -prune -exec rm -rf {} +
cp "$bdir"/_C*.so "$bdir"/_build_info.py "$tmp/python/thrifty/"
"$bdir/thrifty_avx512_emu_selftest"
export PYTHONPATH=$tmp/python
export THRIFTY_TEST_ISAS=avx512,avx512_bf16
"$py" - <<'EOF'
import thrifty
info = thrifty._C.build_info()
assert info["emulated_avx512"], "the emulated _C was not the one imported"
avail = thrifty._C.cpu_isa_available()
assert "avx512" in avail and "avx512_bf16" in avail, avail
thrifty.info()
EOF

# Tests left out, each with the reason (emulated AVX-512 runs about 5-20x slower than AVX2 code).
skips=(
  "tests/test_attention.py::test_memory_seqlen_32k_dense|@slow: dense causal attention over 32768 tokens, about 15 min emulated (the rest of the suite takes about 3); the windowed 32k test runs the same kernels and memory bound"
)
deselect=()
if ((${#skips[@]})); then
  echo "== NOT run under emulation:"
  for s in "${skips[@]}"; do
    echo "   ${s%%|*}  -- ${s#*|}"
    deselect+=(--deselect "${s%%|*}")
  done
fi

echo "== pytest, cpu_isa levels: $THRIFTY_TEST_ISAS"
set +e
"$py" -m pytest -q -p no:cacheprovider "${deselect[@]}" "$@"  # testpaths = tests (pyproject.toml)
rc=$?
set -e
t_end=$(date +%s)
echo "== emulated AVX-512 run: build $((t_built - t_start)) s, tests $((t_end - t_built)) s, exit $rc"
exit $rc
