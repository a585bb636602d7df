#!/usr/bin/env bash
# GPU check: build thrifty from source on a GPU machine, run the `cuda` tests and the GPU
# benchmarks, print a short table last. Meant for the lent H100/H200 (no network there):
#   bash bench/gpu_check.sh            (writes logs and JSON under $OUT, default /tmp/thrifty-gpu-check)
# Budget: about 8 minutes. Environment knobs:
#   THRIFTY_CUDA_ARCHS   default 90a (only the machine's own arch, to build fast)
#   GPU_CHECK_TESTS      pytest selection for the CUDA tests (default: -m cuda)
#   GPU_CHECK_FAMILIES   benchmark families (default: every family present)
#   GPU_CHECK_CPU        1 also runs the CPU kernel tests on the host CPU (AVX-512 hosts test the avx512 paths)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/thrifty-gpu-check}
mkdir -p "$OUT" "$OUT/results"
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
grep -o -m1 'avx512[a-z_0-9]*' /proc/cpuinfo | head -1 | sed 's/^/host CPU has /' || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stamp "build (THRIFTY_CUDA_ARCHS=${THRIFTY_CUDA_ARCHS:-90a})"
export THRIFTY_CUDA=on THRIFTY_CUDA_ARCHS=${THRIFTY_CUDA_ARCHS:-90a}
if ! PYTHON=$PY JOBS=$(nproc) tools/build_inplace.sh >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
stamp "built"
export PYTHONPATH=$PWD/python
$PY -m thrifty.cli info | tee "$OUT/info.txt"

stamp "cuda tests"
# shellcheck disable=SC2086
timeout 300 $PY -m pytest tests ${GPU_CHECK_TESTS:--m cuda} -q -p no:cacheprovider -rfE \
  --junitxml="$OUT/cuda_tests.xml" >"$OUT/cuda_tests.log" 2>&1
test_rc=$?
tail -30 "$OUT/cuda_tests.log"

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  stamp "CPU kernel tests on the host CPU (every ISA level it has)"
  cpu_files=$(ls tests/test_{norm,rotary,activation,attention,optim,quant,loss}.py 2>/dev/null)
  # shellcheck disable=SC2086
  timeout 180 $PY -m pytest $cpu_files -q -p no:cacheprovider -m "not cuda and not slow" -rfE \
    >"$OUT/cpu_tests.log" 2>&1
  tail -3 "$OUT/cpu_tests.log"
fi

stamp "GPU benchmarks"
# shellcheck disable=SC2086
THRIFTY_BENCH_OUT="$OUT/results" timeout 300 $PY -m thrifty.cli bench --device cuda --quick ${GPU_CHECK_FAMILIES:-} \
  >"$OUT/bench.log" 2>&1
bench_rc=$?
stamp "done (tests rc=$test_rc, bench rc=$bench_rc)"

# Short table last: one line per benchmark case.
$PY - "$OUT/results" <<'PYEOF'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*-cuda.json")):
    d = json.loads(f.read_text())
    bw = d.get("copy_bandwidth_Bps") or 0
    mm = d.get("matmul_flops") or 0
    print(f"## {d['family']} on {d['machine']}: copy {bw/1e9:.0f} GB/s, matmul {mm/1e12:.0f} TFLOP/s")
    for c in d["cases"]:
        sp = f"x{c['speedup']:.2f}" if c.get("speedup") else "-"
        perf = (f"{c['gbps']:.0f} GB/s" if c.get("gbps") else "") + (f" {c['tflops']:.0f} TFLOP/s" if c.get("tflops") else "")
        pct = f"{c['pct_roofline']:.0f}%" if c.get("pct_roofline") else "-"
        print(f"  {c['op'][:30]:30s} {c['shape'][:26]:26s} {c['dtype']:8s} {c['thrifty_s']*1e3:8.3f} ms {sp:>7s} {perf:>20s} {pct:>5s}")
PYEOF
grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -1
exit $test_rc
