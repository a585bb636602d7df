#!/usr/bin/env bash
# One-shot GPU check of the optim family on a lent GPU machine: build (sm_90a only), the optim
# cuda tests, the optim GPU benchmark. Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/optim-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[+$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export THRIFTY_CUDA=on THRIFTY_CUDA_ARCHS=${THRIFTY_CUDA_ARCHS:-90a}
if ! PYTHON=$PY JOBS=$(nproc) tools/build_inplace.sh >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
fi
stamp built
export PYTHONPATH=$PWD/python
timeout ${TEST_TIMEOUT:-170} $PY -m pytest tests/test_optim.py -m cuda -q -p no:cacheprovider -rfE >"$OUT/tests.log" 2>&1
stamp "tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25
THRIFTY_BENCH_OUT="$OUT" timeout ${BENCH_TIMEOUT:-200} $PY bench/optim.py --device cuda >"$OUT/bench.log" 2>&1
stamp "bench rc=$?"
tail -22 "$OUT/bench.log"
