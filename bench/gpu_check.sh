#!/usr/bin/env bash
# GPU check: build thrifty from source on a GPU machine, run the `cuda` tests (and, on request, the
# CPU kernel tests on the host CPU at the same time), then the GPU benchmarks one family at a time,
# and print a short table last. Meant for the lent H100/H200 (no network there; device time is
# scarce, so every step has a timeout and the whole run keeps inside GPU_CHECK_DEADLINE):
#   bash bench/gpu_check.sh     (logs and JSON under $GPU_CHECK_LOGS, default /tmp/thrifty-gpu-check,
#                                bundled into $OUT/gpu_check.tgz at the end: one file to fetch back)
# Environment knobs:
#   THRIFTY_CUDA_ARCHS   default 90a (only the machine's own arch, to build fast)
#   GPU_CHECK_TESTS      pytest selection for the CUDA tests (default: -m cuda)
#   GPU_CHECK_TEST_TIMEOUT  seconds for each test run (default 300)
#   GPU_CHECK_JOBS       pytest-xdist workers for the tests (default 6; 0 = no xdist)
#   GPU_CHECK_CPU        1 also runs the CPU kernel tests on the host CPU (AVX-512 hosts test the
#                        avx512 paths natively), concurrently with the CUDA tests
#   GPU_CHECK_CPU_TESTS  test files for that (default: the kernel families' files)
#   GPU_CHECK_CPU_ARGS   extra pytest arguments for them (e.g. "-k bad_input")
#   GPU_CHECK_FAMILIES   benchmark families, in order (default: quant norm optim attention model train)
#   GPU_CHECK_CPU_BENCH  1 also runs `bench attention --quick` on the host CPU (2 threads, its own ISA
#                        level) after the GPU benchmarks, within the deadline (beside them it slowed
#                        the launch-bound small GPU cases 1.5-2x); its table is printed at the end
#   GPU_CHECK_QUICK      1 runs the benchmarks' --quick cases (default: full GPU sizes)
#   GPU_CHECK_DEADLINE   seconds from the start by which the benchmarks must end (default 480): each
#                        family runs under min(GPU_CHECK_FAMILY_TIMEOUT (default 150), time left)
#   GPU_CHECK_DEVICE     benchmark device (default cuda; `cpu` with THRIFTY_CUDA=off dry-runs the script)
#   GPU_CHECK_NCU        1 profiles one call of each kernel of tools/dev/gpu_profile.py with Nsight Compute
#                        after the benchmarks, within the deadline (GPU_CHECK_NCU_TARGETS: its targets, default
#                        all); the full report goes to ncu.txt, a line per kernel (duration, DRAM and SM
#                        throughput, achieved occupancy) to the console
# The `train` family needs datasketch (a `train` extra) that the lent GPU image lacks: carry its wheel in
# .whl/ and install it with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
# PYTHONPATH=/tmp/site before calling this script (PYTHONPATH is kept).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${GPU_CHECK_LOGS:-/tmp/thrifty-gpu-check}
OUT=${OUT:-$LOGS}
mkdir -p "$LOGS/results" "$OUT"
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
DEADLINE=${GPU_CHECK_DEADLINE:-480}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "[gpu_check +$(elapsed)s] $*"; }
bundle() { tar -czf "$OUT/gpu_check.tgz" -C "$LOGS" --exclude gpu_check.tgz . 2>/dev/null; }
trap bundle EXIT

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt"
grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/host CPU: /'; echo
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# No GPU for a cuda check: stop before the build (minutes of device time) rather than skip every test after it.
if [ "$DEV" = cuda ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  stamp "NO GPU: torch sees no CUDA device (GPU_CHECK_DEVICE=cpu with THRIFTY_CUDA=off dry-runs the script)"
  exit 1
fi

export THRIFTY_CUDA=${THRIFTY_CUDA:-on} THRIFTY_CUDA_ARCHS=${THRIFTY_CUDA_ARCHS:-90a}
stamp "build (THRIFTY_CUDA=$THRIFTY_CUDA, archs $THRIFTY_CUDA_ARCHS, $(nproc) jobs)"
if ! PYTHON=$PY JOBS=$(nproc) timeout 400 tools/build_inplace.sh >"$LOGS/build.log" 2>&1; then
  tail -60 "$LOGS/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
stamp "built"
ldd build/dev-*/_C*.so 2>/dev/null | grep -E "stdc\+\+|gomp" | sed 's/^/_C links /'
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}  # keeps carried wheels (/tmp/site) importable
$PY -m thrifty.cli info | tee "$LOGS/info.txt"

jobs=${GPU_CHECK_JOBS:-6}
xdist=()
if [ "$jobs" != 0 ] && $PY -c "import xdist" 2>/dev/null; then xdist=(-n "$jobs"); fi
cpu_pid=
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  stamp "CPU kernel tests on the host CPU, every ISA level it has (in the background)"
  cpu_files=${GPU_CHECK_CPU_TESTS:-$(ls tests/test_{norm,rotary,activation,attention,optim,quant,loss,linear}.py)}
  # shellcheck disable=SC2086
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" $PY -m pytest $cpu_files -q -p no:cacheprovider -m "not cuda and not slow" \
    ${GPU_CHECK_CPU_ARGS:-} -rfE "${xdist[@]}" >"$LOGS/cpu_tests.log" 2>&1 &
  cpu_pid=$!
fi

stamp "cuda tests ${xdist[*]}"
# shellcheck disable=SC2086
OMP_NUM_THREADS=2 timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" $PY -m pytest tests ${GPU_CHECK_TESTS:--m cuda} -q -p no:cacheprovider -rfE \
  "${xdist[@]}" --junitxml="$LOGS/cuda_tests.xml" >"$LOGS/cuda_tests.log" 2>&1
test_rc=$?
tail -40 "$LOGS/cuda_tests.log"
if [ -n "$cpu_pid" ]; then
  wait "$cpu_pid"; stamp "CPU tests rc=$?"
  tail -25 "$LOGS/cpu_tests.log"
fi

# One family at a time, each under its own timeout, so one slow family cannot eat the others' time.
quick=(); [ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--quick)
bench_rc=0
for fam in ${GPU_CHECK_FAMILIES:-quant norm optim attention model train}; do
  left=$(( DEADLINE - $(elapsed) )); ft=${GPU_CHECK_FAMILY_TIMEOUT:-150}; [ "$left" -lt "$ft" ] && ft=$left
  if [ "$ft" -lt 15 ]; then stamp "bench $fam skipped (the ${DEADLINE}s deadline is near)"; continue; fi
  stamp "bench $fam (timeout ${ft}s)"
  THRIFTY_BENCH_OUT="$LOGS/results" timeout "$ft" $PY -m thrifty.cli bench --device "$DEV" "${quick[@]}" "$fam" \
    >"$LOGS/bench_$fam.log" 2>&1
  rc=$?
  if [ $rc != 0 ]; then bench_rc=$rc; stamp "bench $fam rc=$rc"; tail -15 "$LOGS/bench_$fam.log"; fi
done
if [ "${GPU_CHECK_CPU_BENCH:-0}" = 1 ]; then
  left=$(( DEADLINE - $(elapsed) ))
  if [ "$left" -ge 60 ]; then
    stamp "CPU attention bench on the host CPU, 2 threads (timeout ${left}s)"
    mkdir -p "$LOGS/cpu_bench"
    OMP_NUM_THREADS=2 THRIFTY_BENCH_OUT="$LOGS/cpu_bench" timeout "$left" \
      $PY -m thrifty.cli bench --device cpu --quick attention >"$LOGS/cpu_bench.log" 2>&1
    grep -E '^\|' "$LOGS/cpu_bench.log" || tail -5 "$LOGS/cpu_bench.log"
  else
    stamp "CPU attention bench skipped (the ${DEADLINE}s deadline is near)"
  fi
fi
if [ "${GPU_CHECK_NCU:-0}" = 1 ]; then
  left=$(( DEADLINE - $(elapsed) ))
  if [ "$left" -ge 30 ] && command -v ncu >/dev/null; then
    stamp "Nsight Compute: tools/dev/gpu_profile.py ${GPU_CHECK_NCU_TARGETS:-} (timeout ${left}s)"
    # shellcheck disable=SC2086
    timeout "$left" ncu --nvtx --nvtx-include "profile/" --clock-control none --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      $PY tools/dev/gpu_profile.py ${GPU_CHECK_NCU_TARGETS:-} >"$LOGS/ncu.txt" 2>&1
    stamp "ncu rc=$?"
    grep -E "^  [A-Za-z_].*\(|profiled:|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy" \
      "$LOGS/ncu.txt" | sed 's/  */ /g' | cut -c1-160
  else
    stamp "Nsight Compute skipped (the ${DEADLINE}s deadline is near, or no ncu)"
  fi
fi
stamp "done (tests rc=$test_rc, bench rc=$bench_rc)"

# Short table last: one line per benchmark case.
$PY - "$LOGS/results" "$DEV" <<'PYEOF'
import json, pathlib, sys
res = pathlib.Path(sys.argv[1])
for f in sorted([*res.glob(f"*-{sys.argv[2]}.json"), *res.glob(f"*-{sys.argv[2]}-quick.json")]):
    d = json.loads(f.read_text())
    bw = d.get("copy_bandwidth_Bps") or 0
    mm = d.get("matmul_flops") or 0
    print(f"## {d['family']} on {d['machine']}: copy {bw/1e9:.0f} GB/s, matmul {mm/1e12:.0f} TFLOP/s")
    for c in d["cases"]:
        sp = f"x{c['speedup']:.2f}" if c.get("speedup") else "-"
        perf = (f"{c['gbps']:.0f} GB/s" if c.get("gbps") else "") + (f" {c['tflops']:.0f} TFLOP/s" if c.get("tflops") else "")
        pct = f"{c['pct_roofline']:.0f}%" if c.get("pct_roofline") else "-"
        print(f"  {c['op'][:34]:34s} {c['shape'][:24]:24s} {c['dtype'][:8]:8s} {c['thrifty_s']*1e3:8.3f} ms {sp:>7s} {perf:>20s} {pct:>5s}")
PYEOF
grep -E "passed|failed|error" "$LOGS/cuda_tests.log" | tail -1
# Non-zero when the tests or any benchmark family failed (the table above still shows what ran).
[ "$test_rc" != 0 ] && exit "$test_rc"
exit "$bench_rc"
