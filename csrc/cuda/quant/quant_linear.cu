// W4A16 / W8A16 on CUDA (format version 1, common/quant_params.h).
//
// GEMV (M <= 8): one warp per output row n; each lane loads 16 bytes of the packed row per step
// (32 int4 or 16 int8 weights), dequantizes them in registers, (q - z) * s, and accumulates x * w for
// every row of x in float32; a warp shuffle reduction finishes each output. Weights are read once.
// GEMM (M > 8): 64 x 64 output tiles, 32-deep k slices; x and the dequantized weight slice go through
// shared memory as float32 and each of the 256 threads accumulates a 4 x 4 register tile.
// (A tensor-core mma path, Marlin style, is future work: see docs/QUANT_FORMATS.md.)
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/quant/quant_launch.h"

namespace thrifty::cuda {
namespace {

constexpr int kMaxM = 8;

__device__ __forceinline__ float bias_at(const QuantLinearParams& p, int64_t n) {
  if (p.bias == nullptr) return 0.0f;
  switch (p.bias_dtype) {
    case DType::f32: return static_cast<const float*>(p.bias)[n];
    case DType::bf16: return to_float(static_cast<const __nv_bfloat16*>(p.bias)[n]);
    default: return to_float(static_cast<const __half*>(p.bias)[n]);
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(128) gemv_kernel(QuantLinearParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (n >= p.N) return;
  const T* x = static_cast<const T*>(p.x);
  const int M = static_cast<int>(p.M);
  const int64_t K = p.K;
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  if (BITS == 4) {
    const int64_t G = p.group_size, ng = K / G;
    const uint8_t* q = static_cast<const uint8_t*>(p.qweight) + n * (K / 2);
    for (int64_t k0 = static_cast<int64_t>(lane) * 32; k0 < K; k0 += 32 * 32) {
      const uint4 pk = *reinterpret_cast<const uint4*>(q + k0 / 2);  // 32 weights, one group (G % 32 == 0)
      const int64_t g = k0 / G;
      const float s = p.scales[n * ng + g], z = p.zeros[n * ng + g];
      const uint32_t words[4] = {pk.x, pk.y, pk.z, pk.w};
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float w = (static_cast<float>((words[wi] >> (4 * j)) & 15u) - z) * s;
          const int64_t k = k0 + wi * 8 + j;
#pragma unroll
          for (int m = 0; m < kMaxM; ++m)
            if (m < M) acc[m] = fmaf(to_float(x[m * p.x_stride + k]), w, acc[m]);
        }
      }
    }
  } else {
    const int8_t* q = static_cast<const int8_t*>(p.qweight) + n * K;
    const bool vec = (K % 16 == 0) && (reinterpret_cast<uintptr_t>(q) & 15) == 0;
    int64_t k0 = 0;
    if (vec) {
      for (k0 = static_cast<int64_t>(lane) * 16; k0 < K; k0 += 32 * 16) {
        const int4 pk = *reinterpret_cast<const int4*>(q + k0);
        const int8_t* b = reinterpret_cast<const int8_t*>(&pk);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const float w = static_cast<float>(b[j]);
#pragma unroll
          for (int m = 0; m < kMaxM; ++m)
            if (m < M) acc[m] = fmaf(to_float(x[m * p.x_stride + k0 + j]), w, acc[m]);
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float w = static_cast<float>(q[k]);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m)
          if (m < M) acc[m] = fmaf(to_float(x[m * p.x_stride + k]), w, acc[m]);
      }
    }
    const float s = p.scales[n];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[m] *= s;
  }
  T* y = static_cast<T*>(p.y);
  const float b = bias_at(p, n);
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    const float v = warp_sum(acc[m]);
    if (m < M && lane == 0) y[m * p.N + n] = from_float<T>(v + b);
  }
}

template <int BITS>
__device__ __forceinline__ float dequant_at(const QuantLinearParams& p, int64_t n, int64_t k) {
  if (BITS == 4) {
    const int64_t ng = p.K / p.group_size, g = k / p.group_size;
    const uint8_t b = static_cast<const uint8_t*>(p.qweight)[n * (p.K / 2) + k / 2];
    const float qv = static_cast<float>((k & 1) ? (b >> 4) : (b & 15));
    return (qv - p.zeros[n * ng + g]) * p.scales[n * ng + g];
  }
  return static_cast<float>(static_cast<const int8_t*>(p.qweight)[n * p.K + k]) * p.scales[n];
}

constexpr int BM = 64, BN = 64, BK = 32;

template <typename T, int BITS>
__global__ void __launch_bounds__(256) gemm_kernel(QuantLinearParams p) {
  __shared__ float xs[BK][BM + 4];
  __shared__ float ws[BK][BN + 4];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const T* x = static_cast<const T*>(p.x);
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    for (int i = threadIdx.x; i < BM * BK; i += 256) {
      const int mm = i / BK, kk = i % BK;
      const int64_t m = m0 + mm, k = k0 + kk;
      xs[kk][mm] = (m < p.M && k < p.K) ? to_float(x[m * p.x_stride + k]) : 0.0f;
    }
    for (int i = threadIdx.x; i < BN * BK; i += 256) {
      const int nn = i / BK, kk = i % BK;
      const int64_t n = n0 + nn, k = k0 + kk;
      ws[kk][nn] = (n < p.N && k < p.K) ? dequant_at<BITS>(p, n, k) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < p.M && n < p.N) y[m * p.N + n] = from_float<T>(acc[i][j] + bias_at(p, n));
    }
}

__global__ void dequant_kernel(DequantParams d) {
  const int64_t total = d.N * d.K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / d.K, k = i % d.K;
    float w;
    if (d.bits == 4) {
      const int64_t ng = d.K / d.group_size, g = k / d.group_size;
      const uint8_t b = static_cast<const uint8_t*>(d.qweight)[n * (d.K / 2) + k / 2];
      w = (static_cast<float>((k & 1) ? (b >> 4) : (b & 15)) - d.zeros[n * ng + g]) * d.scales[n * ng + g];
    } else {
      w = static_cast<float>(static_cast<const int8_t*>(d.qweight)[i]) * d.scales[n];
    }
    d.w[i] = w;
  }
}

}  // namespace

void launch_quant_linear(const QuantLinearParams& p, cudaStream_t stream) {
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    if (p.M <= kMaxM) {
      const dim3 grid(static_cast<unsigned>((p.N + 3) / 4));
      if (p.bits == 4) gemv_kernel<T, 4><<<grid, 128, 0, stream>>>(p);
      else gemv_kernel<T, 8><<<grid, 128, 0, stream>>>(p);
    } else {
      const dim3 grid(static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + BM - 1) / BM));
      if (p.bits == 4) gemm_kernel<T, 4><<<grid, 256, 0, stream>>>(p);
      else gemm_kernel<T, 8><<<grid, 256, 0, stream>>>(p);
    }
  });
  check_launch("quant_linear");
}

void launch_quant_dequantize(const DequantParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.K;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
  dequant_kernel<<<blocks, 256, 0, stream>>>(p);
  check_launch("quant_dequantize");
}

}  // namespace thrifty::cuda
