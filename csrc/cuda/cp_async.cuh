// cp.async (sm_80+): global -> shared copies that run while the thread goes on, in commit groups.
// Shared by the attention kernels (attention/flash_common.cuh) and the decode quant kernels
// (quant/mma_decode.cuh's lane ring).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace thrifty::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// B (4, 8 or 16) bytes global -> shared; 16-byte copies bypass L1 (.cg), smaller ones cannot (.ca). The
// "memory" clobber keeps the compiler from sinking earlier shared-memory reads of the slot being refilled
// below the copy (the decode ring refills a slot right after computing from it, with no barrier between).
template <int B>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  static_assert(B == 4 || B == 8 || B == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (B == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "n"(B) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's commit groups are still in flight; the finished copies are then
// visible to this thread (other threads need a barrier as well). The "memory" clobber keeps the compiler from
// hoisting this thread's shared-memory reads above the wait (the decode ring has no __syncthreads to do it).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The block's dynamic shared memory (the size given at launch), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char thrifty_dynamic_smem[];
  return thrifty_dynamic_smem;
}

}  // namespace thrifty::cuda
