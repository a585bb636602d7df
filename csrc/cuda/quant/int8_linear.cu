// W8A8 on CUDA: per-token int8 quantization; int8 x int8 -> int32 on tensor cores for decode-size M
// (int8_mma.cuh, mma m16n8k32); and a tiled GEMM with __dp4a (64 x 64 output tiles, 32-deep k slices in
// shared memory, 4 x 4 register tile per thread) for the shapes neither it nor at::_int_mm takes.
#include <algorithm>
#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant/quant_launch.h"

namespace thrifty::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32;

__device__ __forceinline__ float load_any(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return to_float(static_cast<const __half*>(p)[i]);
  }
}
__device__ __forceinline__ void store_any(void* p, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
  }
}

}  // namespace
}  // namespace thrifty::cuda

#include "cuda/quant/int8_mma.cuh"

namespace thrifty::cuda {
namespace {

__global__ void __launch_bounds__(256) int8_gemm_kernel(Int8LinearParams p) {
  __shared__ __align__(16) int8_t xs[BM][BK + 4];
  __shared__ __align__(16) int8_t ws[BN][BK + 4];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  int acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    for (int i = threadIdx.x; i < BM * BK; i += 256) {
      const int mm = i / BK, kk = i % BK;
      const int64_t m = m0 + mm, k = k0 + kk;
      xs[mm][kk] = (m < p.M && k < p.K) ? p.xq[m * p.K + k] : int8_t(0);
    }
    for (int i = threadIdx.x; i < BN * BK; i += 256) {
      const int nn = i / BK, kk = i % BK;
      const int64_t n = n0 + nn, k = k0 + kk;
      ws[nn][kk] = (n < p.N && k < p.K) ? p.wq[n * p.K + k] : int8_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kw = 0; kw < BK / 4; ++kw) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const int*>(&xs[ty + 16 * i][4 * kw]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const int*>(&ws[tx + 16 * j][4 * kw]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < p.M && n < p.N) {
        float v = static_cast<float>(acc[i][j]) * p.x_scales[m] * p.w_scales[n];
        if (p.bias != nullptr) v += load_any(p.bias, n, p.bias_dtype);
        store_any(p.y, m * p.N + n, v, p.out_dtype);
      }
    }
}

template <typename T>
__global__ void __launch_bounds__(256) quantize_rows_kernel(QuantizePerTokenParams p) {
  __shared__ float red[32];
  __shared__ int nan_flag;
  const int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  if (threadIdx.x == 0) nan_flag = 0;
  __syncthreads();
  float amax = 0.0f;
  bool nan = false;
  for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
    const float v = to_float(x[k]);
    nan |= v != v;
    amax = fmaxf(amax, fabsf(v));
  }
  if (nan) atomicOr(&nan_flag, 1);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = amax;
  __syncthreads();
  amax = lane < (blockDim.x >> 5) ? red[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const bool any_nan = nan_flag != 0;
  if (threadIdx.x == 0) p.scales[r] = any_nan ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, 127.0f);
  const float inv = (amax > 0.0f && isfinite(amax)) ? __fdiv_rn(127.0f, amax) : 0.0f;
  for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
    float v = __fmul_rn(to_float(x[k]), inv);
    v = v != v ? 0.0f : fminf(127.0f, fmaxf(-127.0f, v));
    p.xq[r * p.K + k] = static_cast<int8_t>(__float2int_rn(v));
  }
}

template <int MT>
void launch_int8_mma_mt(const Int8LinearParams& p, int splits, int* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + mmadec::kRowsPerBlock - 1) / mmadec::kRowsPerBlock),
                  static_cast<unsigned>(splits));
  launch_with_smem<i8mma::int8_mma_kernel<MT>>(grid, mmadec::kThreads, i8mma::int8_mma_smem_bytes(), stream,
                                                "int8_linear (mma)", p, partial);
}

// As quant_mma_shape_fits (quant_linear.cu): the launcher re-checks the shape, not the switch.
bool int8_mma_shape_fits(const Int8LinearParams& p) {
  return p.M >= 1 && p.M <= mmadec::kMaxM && p.K % i8mma::kSeg == 0 && p.K / i8mma::kSeg < (int64_t{1} << 30) &&
         aligned16(p.xq) && aligned16(p.wq);
}
}  // namespace

bool int8_mma_fits(const Int8LinearParams& p) { return quant_mma_enabled() && int8_mma_shape_fits(p); }

int int8_mma_splits(const Int8LinearParams& p) {
  return mma_k_splits((p.N + mmadec::kRowsPerBlock - 1) / mmadec::kRowsPerBlock, p.K / i8mma::kSeg, mmadec::kWarps);
}

void launch_int8_mma(const Int8LinearParams& p, int splits, int* partial, cudaStream_t stream) {
  if (!int8_mma_shape_fits(p) || splits < 1 || (splits > 1) != (partial != nullptr))
    throw std::logic_error(
        "thrifty: launch_int8_mma called for a shape int8_mma_fits rejects, or without its workspace");
  if (p.M <= 8) launch_int8_mma_mt<1>(p, splits, partial, stream);
  else if (p.M <= 16) launch_int8_mma_mt<2>(p, splits, partial, stream);
  else launch_int8_mma_mt<4>(p, splits, partial, stream);
  static_assert(mmadec::kMaxM == 32, "the m-tile buckets above end at kMaxM");
  if (splits > 1)
    i8mma::int8_mma_finish_kernel<<<static_cast<unsigned>((p.M * p.N + 255) / 256), 256, 0, stream>>>(p, partial,
                                                                                                      splits);
  check_launch("int8_linear (mma)");
}

void launch_int8_linear(const Int8LinearParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + BM - 1) / BM));
  int8_gemm_kernel<<<grid, 256, 0, stream>>>(p);
  check_launch("int8_linear");
}

void launch_quantize_per_token(const QuantizePerTokenParams& p, cudaStream_t stream) {
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    quantize_rows_kernel<T><<<static_cast<unsigned>(p.rows), 256, 0, stream>>>(p);
  });
  check_launch("quantize_per_token");
}

}  // namespace thrifty::cuda
