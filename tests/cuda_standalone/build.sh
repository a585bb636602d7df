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
printf '%s\n' $srcs | xargs -P "${JOBS:-4}" -I{} sh -c 'nvcc '"$flags"' -c {} -o '"$out"'/$(basename {} .cu).o'
nvcc -gencode=arch=compute_${arch},code=sm_${arch} "$out"/*.o -o build/flash_check
echo "built build/flash_check"
