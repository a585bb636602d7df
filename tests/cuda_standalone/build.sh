#!/usr/bin/env bash
# Builds the torch-free CUDA attention check (tests/cuda_standalone/flash_check.cu) with the
# attention kernels into build/flash_check. ARCH defaults to 90a (H100); JOBS parallel nvcc runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${ARCH:-90a}
out=build/flash_check_obj
mkdir -p "$out"
flags="-std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Icsrc -gencode=arch=compute_${arch},code=sm_${arch}"
srcs="csrc/cuda/attention/flash_api.cu tests/cuda_standalone/flash_check.cu $(ls csrc/cuda/attention/inst/*.cu)"
# rebuild an object when its source or a header it uses is newer
common="csrc/cuda/mma.cuh csrc/cuda/attention/flash_common.cuh csrc/cuda/attention/attention_launch.h csrc/common/attention_params.h"
todo=""
for s in $srcs; do
  o="$out/$(basename "$s" .cu).o"
  deps="$s $common"
  case "$s" in *fwd_*) deps="$deps csrc/cuda/attention/flash_fwd.cuh" ;; *bwd_*) deps="$deps csrc/cuda/attention/flash_bwd.cuh" ;; esac
  stale=0
  [ -f "$o" ] || stale=1
  for d in $deps; do [ "$d" -nt "$o" ] && stale=1; done
  [ $stale = 1 ] && todo="$todo $s"
done
if [ -n "$todo" ]; then
  printf '%s\n' $todo | xargs -P "${JOBS:-4}" -I{} sh -c 'nvcc '"$flags"' -c {} -o '"$out"'/$(basename {} .cu).o'
fi
nvcc -gencode=arch=compute_${arch},code=sm_${arch} "$out"/*.o -o build/flash_check
echo "built build/flash_check"
