// Shared device helpers for thrifty's CUDA kernels: element conversion, 16-byte vector
// access, warp/block reductions, launch checks, the multiprocessor count. Torch-free: .cu files include only this,
// CUDA headers and csrc/common/*_params.h, so they compile fast.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace thrifty::cuda {

// Storage type for a DType.
template <DType D> struct storage;
template <> struct storage<DType::f32> { using type = float; };
template <> struct storage<DType::bf16> { using type = __nv_bfloat16; };
template <> struct storage<DType::f16> { using type = __half; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// N elements of T moved as one aligned 16-byte (or smaller) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : 0.0f;
  return warp_sum(x);
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("thrifty: CUDA kernel launch failed in ") + what + ": " +
                             cudaGetErrorString(err));
}

// Multiprocessors of the current device (cached per device).
inline int multiprocessors() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) throw std::runtime_error("thrifty: cudaGetDevice failed");
  static std::atomic<int> cache[64] = {};
  if (dev < 64 && cache[dev].load() > 0) return cache[dev].load();
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1)
    throw std::runtime_error("thrifty: cudaDeviceGetAttribute(multiProcessorCount) failed");
  if (dev < 64) cache[dev].store(sms);
  return sms;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Lets Kernel take `bytes` of dynamic shared memory on the current device. Without the attribute a block gets
// 48 KiB in all, its static __shared__ arrays included: a kernel with 48 KiB of dynamic and 4 KiB of static
// memory fails to launch ("invalid argument", the decode quant kernels on the H200, stop 19), so the attribute
// is set for any size, once per device and size: when a launch needs more than any launch before it on that
// device (kernels whose size depends on the shape work too). Throws naming `what` where the device has less.
template <auto Kernel>
inline void allow_dynamic_smem(int bytes, const char* what) {
  if (bytes <= 0) return;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) throw std::runtime_error("thrifty: cudaGetDevice failed");
  static std::atomic<int> allowed[64] = {};
  if (dev < 64 && bytes <= allowed[dev].load()) return;
  static std::mutex grow;  // two threads raising it at once must not leave the smaller value set
  const std::lock_guard<std::mutex> lock(grow);
  if (dev < 64 && bytes <= allowed[dev].load()) return;
  const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("thrifty: ") + what + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block: " + cudaGetErrorString(err));
  if (dev < 64) allowed[dev].store(bytes);
}

// Kernel<<<grid, threads, smem, stream>>>(args...), with the shared memory opt-in it needs first.
template <auto Kernel, typename... Args>
inline void launch_with_smem(dim3 grid, int threads, int smem, cudaStream_t stream, const char* what, Args... args) {
  allow_dynamic_smem<Kernel>(smem, what);
  Kernel<<<grid, threads, smem, stream>>>(args...);
}

}  // namespace thrifty::cuda

// Calls body with T bound to the storage type of `dt` (f32, bf16, f16).
#define THRIFTY_CUDA_DTYPE_SWITCH(dt, T, ...)                                 \
  [&] {                                                                       \
    switch (dt) {                                                             \
      case ::thrifty::DType::f32: { using T = float; return __VA_ARGS__(); }  \
      case ::thrifty::DType::bf16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
      default: { using T = __half; return __VA_ARGS__(); }                    \
    }                                                                         \
  }()
