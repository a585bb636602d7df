// W4A16 / W8A16 on CUDA (format version 1, common/quant_params.h).
//
// GEMV (1 <= M <= kGemvMaxM = 8), the decode path. gemv_vec_kernel: each warp owns kRows output rows n;
// per step a lane loads one 16-byte chunk of each of its packed rows (32 int4 or 16 int8 weights; U
// chunks in flight per lane), turns the codes into floats with a byte permute into the mantissa of
// 2^23 (no int->float conversions), and multiplies them with x read as 16-byte vectors (8 values of
// row m per load, the same 8 k for every row it owns). Per row and m the lane keeps a float32 sum; a
// warp shuffle reduction finishes each output. Weights are read once, x comes from L1/L2.
//   bits 4: w = (q - z) * s: the lane sums x * (q - z) over its 32-weight chunk (one group, G % 32 == 0)
//           and adds that sum times s; bits 8: sum x * q, times s[n] once at the end.
// gemv_scalar_kernel (the original one-warp-per-row kernel, scalar x loads) takes what the vector kernel
// cannot: bits 8 with K % 16 != 0 or a misaligned qweight, x rows not 16-byte aligned.
// M > kGemvMaxM: quant_cuda.cpp dequantizes the weight into a temporary (dequant4_to_kernel below) and
// calls cuBLAS; scale_bias_epilogue_kernel applies per-channel scales and bias and rounds once.
// bf16/f16 x with M <= 32 goes before all of these to the tensor-core kernels of w4_mma.cuh (bits 4) and
// w8_mma.cuh (bits 8) (launch_quant_mma; THRIFTY_CUDA_QUANT_MMA=off or set_cuda_quant_mma("off") turns them off).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant/code_bits.cuh"
#include "cuda/quant/quant_launch.h"

namespace thrifty::cuda {
namespace {

__device__ __forceinline__ float load_float(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return to_float(static_cast<const __half*>(p)[i]);
  }
}

__device__ __forceinline__ float bias_at(const QuantLinearParams& p, int64_t n) {
  return p.bias == nullptr ? 0.0f : load_float(p.bias, n, p.bias_dtype);
}

// The two 16-bit values of a register (element 0 in the low half) as floats.
template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t w);
template <>
__device__ __forceinline__ float2 to_float2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 to_float2<__half>(uint32_t w) {
  __half2 h;
  static_assert(sizeof(h) == sizeof(w), "half2 is 4 bytes");
  memcpy(&h, &w, sizeof(h));
  return __half22float2(h);
}

}  // namespace
}  // namespace thrifty::cuda

#include "cuda/quant/w4_mma.cuh"
#include "cuda/quant/w8_mma.cuh"

namespace thrifty::cuda {
namespace {

// ---------------------------------------------------------------- vector GEMV (magic_byte: code_bits.cuh)

// x[0..7] as floats; p is 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T>  // __nv_bfloat16, __half
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // element 2i in the low half of word i, 2i + 1 in the high half
    const float2 f = to_float2<T>(w[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// out[m][r] += sum_j x[m * xs + j] * w[r][j] for rows m < M: 8 x values (one 16-byte load per row m)
// against 8 dequantized weights of each of the R weight rows.
template <int MB, int R, typename T>
__device__ __forceinline__ void fma_x8(const T* x, int64_t xs, int M, const float (&w)[R][8], float (&out)[MB][R]) {
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m < M) {
      float xv[8];
      load8(x + m * xs, xv);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) out[m][r] = fmaf(xv[j], w[r][j], out[m][r]);
    }
  }
}

constexpr int kGemvThreads = 128;                   // 4 warps per block
constexpr int kRows = 2;                            // output rows n per warp (x loads shared by both)
constexpr int kRowsPerBlock = kRows * kGemvThreads / 32;

// MB: M rounded up to a power of two (rows m >= M are skipped). x: rows 16-byte aligned. qweight: 16-byte
// aligned, K % (BITS == 4 ? 32 : 16) == 0, so every row starts on a 16-byte boundary.
template <typename T, int BITS, int MB>
__global__ void __launch_bounds__(kGemvThreads) gemv_vec_kernel(QuantLinearParams p) {
  constexpr int R = kRows;
  constexpr int KPC = BITS == 4 ? 32 : 16;  // weights per 16-byte chunk
  constexpr int U = MB <= 4 ? 4 : 2;        // chunks per row in flight per lane
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (kGemvThreads / 32) + warp) * R;
  if (n0 >= p.N) return;  // whole warp leaves together
  const int M = static_cast<int>(p.M);
  const int nchunk = static_cast<int>(p.K / KPC);  // chunks per row (launcher: < 2^30)
  const T* x = static_cast<const T*>(p.x);
  const int64_t xs = p.x_stride;

  int64_t row[R];  // rows past N read row N - 1 again and store nothing
  const uint4* q[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row[r] = min(n0 + r, p.N - 1);
    q[r] = static_cast<const uint4*>(p.qweight) + row[r] * nchunk;
  }
  const int64_t ng = BITS == 4 ? p.K / p.group_size : 1;
  const int cpg = BITS == 4 ? static_cast<int>(p.group_size / KPC) : 1;  // chunks per group

  float acc[MB][R];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;

  for (int c0 = lane; c0 < nchunk; c0 += 32 * U) {
    uint4 raw[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r) raw[u][r] = c < nchunk ? __ldcs(q[r] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c >= nchunk) break;
      const int64_t kc = static_cast<int64_t>(c) * KPC;  // first k of the chunk
      uint32_t wd[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wd[r][0] = raw[u][r].x, wd[r][1] = raw[u][r].y, wd[r][2] = raw[u][r].z, wd[r][3] = raw[u][r].w;
      }
      if constexpr (BITS == 4) {
        const int g = c / cpg;
        float s[R], z[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          s[r] = __ldg(p.scales + row[r] * ng + g);
          z[r] = __ldg(p.zeros + row[r] * ng + g);
        }
        float part[MB][R];
#pragma unroll
        for (int m = 0; m < MB; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r) part[m][r] = 0.0f;
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {  // word wi: k = kc + 8 wi .. + 7; byte b: k 2b (low nibble), 2b + 1
          float w[R][8];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t lo = wd[r][wi] & 0x0F0F0F0Fu, hi = (wd[r][wi] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
              w[r][2 * b] = (magic_byte(lo, b) - kMagic) - z[r];
              w[r][2 * b + 1] = (magic_byte(hi, b) - kMagic) - z[r];
            }
          }
          fma_x8<MB, R>(x + kc + 8 * wi, xs, M, w, part);
        }
#pragma unroll
        for (int m = 0; m < MB; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r) acc[m][r] = fmaf(part[m][r], s[r], acc[m][r]);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // words 2h, 2h + 1: k = kc + 8 h .. + 7, byte b of word t is k 4t + b
          float w[R][8];
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < 2; ++t) {
              const uint32_t u8 = wd[r][2 * h + t] ^ 0x80808080u;  // int8 q -> q + 128 in [0, 255]
#pragma unroll
              for (int b = 0; b < 4; ++b) w[r][4 * t + b] = magic_byte(u8, b) - (kMagic + 128.0f);
            }
          fma_x8<MB, R>(x + kc + 8 * h, xs, M, w, acc);
        }
      }
    }
  }

  if constexpr (BITS == 8) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float s = __ldg(p.scales + row[r]);
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[m][r] *= s;
    }
  }
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const float b = n < p.N ? bias_at(p, n) : 0.0f;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m < M) {
        const float v = warp_sum(acc[m][r]);
        if (n < p.N && lane == ((m * R + r) & 31)) y[m * p.N + n] = from_float<T>(v + b);
      }
    }
  }
}

// ---------------------------------------------------------------- scalar GEMV (odd shapes)

template <typename T, int BITS, int MB>
__global__ void __launch_bounds__(128) gemv_scalar_kernel(QuantLinearParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (n >= p.N) return;
  const T* x = static_cast<const T*>(p.x);
  const int M = static_cast<int>(p.M);
  const int64_t K = p.K;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.0f;
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
          for (int m = 0; m < MB; ++m)
            if (m < M) acc[m] = fmaf(to_float(x[m * p.x_stride + k]), w, acc[m]);
        }
      }
    }
  } else {
    const int8_t* q = static_cast<const int8_t*>(p.qweight) + n * K;
    for (int64_t k = lane; k < K; k += 32) {
      const float w = static_cast<float>(q[k]);
#pragma unroll
      for (int m = 0; m < MB; ++m)
        if (m < M) acc[m] = fmaf(to_float(x[m * p.x_stride + k]), w, acc[m]);
    }
    const float s = p.scales[n];
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[m] *= s;
  }
  T* y = static_cast<T*>(p.y);
  const float b = bias_at(p, n);
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) y[m * p.N + n] = from_float<T>(v + b);
    }
  }
}

template <typename T, int BITS, int MB>
void launch_gemv(const QuantLinearParams& p, bool vec, cudaStream_t stream) {
  if (vec) {
    const dim3 grid(static_cast<unsigned>((p.N + kRowsPerBlock - 1) / kRowsPerBlock));
    gemv_vec_kernel<T, BITS, MB><<<grid, kGemvThreads, 0, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>((p.N + 3) / 4));
    gemv_scalar_kernel<T, BITS, MB><<<grid, 128, 0, stream>>>(p);
  }
}

template <typename T, int BITS>
void launch_gemv_m(const QuantLinearParams& p, bool vec, cudaStream_t stream) {
  if (p.M <= 1) launch_gemv<T, BITS, 1>(p, vec, stream);
  else if (p.M <= 2) launch_gemv<T, BITS, 2>(p, vec, stream);
  else if (p.M <= 4) launch_gemv<T, BITS, 4>(p, vec, stream);
  else launch_gemv<T, BITS, 8>(p, vec, stream);
  static_assert(kGemvMaxM == 8, "the M buckets above end at kGemvMaxM");
}

// ---------------------------------------------------------------- dequantization (large M, backward)

// 8 consecutive elements from float32 values; p is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float lo[4] = {v[0], v[1], v[2], v[3]}, hi[4] = {v[4], v[5], v[6], v[7]};
    store_pack<T, 4>(p, lo);
    store_pack<T, 4>(p + 4, hi);
  } else {
    store_pack<T, 8>(p, v);
  }
}

// One thread per packed 32-bit word (8 weights of one row, one group): w = (q - z) * s in float32.
template <typename T, bool SPLIT>
__global__ void __launch_bounds__(256) dequant4_to_kernel(DequantToParams d) {
  const int64_t kw = d.K / 8;  // words per row
  const int64_t total = d.N * kw, ng = d.K / d.group_size;
  const uint32_t* q = reinterpret_cast<const uint32_t*>(d.qweight);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / kw, k = (i - n * kw) * 8;
    const int64_t gi = n * ng + k / d.group_size;
    const float s = d.scales[gi], z = d.zeros[gi];
    const uint32_t word = __ldcs(q + i);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (static_cast<float>((word >> (4 * j)) & 15u) - z) * s;
    T* row = static_cast<T*>(d.w) + n * d.ldw;
    if constexpr (SPLIT) {
      float hi[8], lo[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        hi[j] = to_float(from_float<T>(v[j]));
        lo[j] = v[j] - hi[j];  // exact in float32; rounded once more by the store
      }
      store8(row + k, hi);
      store8(row + d.K + k, lo);
    } else {
      store8(row + k, v);
    }
  }
}

// quant_dequantize for the shapes dequant4_to_kernel does not take (bits 8, misaligned bits 4).
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

unsigned grid_for(int64_t items, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + threads - 1) / threads, 1 << 16)));
}

// ---------------------------------------------------------------- epilogue

template <typename A, typename O, int V>
__global__ void __launch_bounds__(256) scale_bias_epilogue_kernel(EpilogueParams e) {
  const int64_t total = e.M * e.N / V;  // V divides N: the V values of a thread share a row
  const A* acc = static_cast<const A*>(e.acc);
  O* y = static_cast<O*>(e.y);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = i * V, m = i0 / e.N, n0 = i0 - m * e.N;
    A a[V];
    if constexpr (V == 4) {
      static_assert(sizeof(A) == 4, "4 x 4 bytes");
      const uint4 u = *reinterpret_cast<const uint4*>(acc + i0);
      memcpy(a, &u, sizeof(u));
    } else {
      a[0] = acc[i0];
    }
    const float rs = e.row_scale != nullptr ? e.row_scale[m] : 1.0f;
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float t = static_cast<float>(a[j]);
      if (e.row_scale != nullptr) t = t * rs;
      if (e.col_scale != nullptr) t = t * e.col_scale[n0 + j];
      if (e.bias != nullptr) t += load_float(e.bias, n0 + j, e.bias_dtype);
      v[j] = t;
    }
    if constexpr (V == 4) {
      store_pack<O, 4>(y + i0, v);
    } else {
      y[i0] = from_float<O>(v[0]);
    }
  }
}

template <typename A>
void launch_epilogue_a(const EpilogueParams& e, cudaStream_t stream) {
  const bool vec = e.N % 4 == 0 && aligned16(e.acc) && aligned16(e.y);
  const int64_t items = vec ? e.M * e.N / 4 : e.M * e.N;
  THRIFTY_CUDA_DTYPE_SWITCH(e.out_dtype, O, [&] {
    if (vec) scale_bias_epilogue_kernel<A, O, 4><<<grid_for(items, 256), 256, 0, stream>>>(e);
    else scale_bias_epilogue_kernel<A, O, 1><<<grid_for(items, 256), 256, 0, stream>>>(e);
  });
}

template <typename T, bool BF16, int S>
void launch_w4_mma_s(const QuantLinearParams& p, int splits, float* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + mmadec::kRowsPerBlock - 1) / mmadec::kRowsPerBlock),
                  static_cast<unsigned>(splits));
  constexpr int smem = w4mma::w4_mma_smem_bytes<S>();
  constexpr const char* what = "quant_linear (W4 mma)";
  constexpr int threads = mmadec::kThreads;
  if (p.M <= 8) launch_with_smem<w4mma::w4_mma_kernel<T, BF16, S, 1>>(grid, threads, smem, stream, what, p, partial);
  else if (p.M <= 16)
    launch_with_smem<w4mma::w4_mma_kernel<T, BF16, S, 2>>(grid, threads, smem, stream, what, p, partial);
  else launch_with_smem<w4mma::w4_mma_kernel<T, BF16, S, 4>>(grid, threads, smem, stream, what, p, partial);
  static_assert(mmadec::kMaxM == 32, "the m-tile buckets above end at kMaxM");
  if (splits > 1)
    w4mma::w4_mma_finish_kernel<T><<<static_cast<unsigned>((p.M * p.N + 255) / 256), 256, 0, stream>>>(p, partial,
                                                                                                     splits);
}

// k per segment of the W4 mma kernel: the largest of 128, 64, 32 dividing the group size.
int64_t w4_mma_segment(int64_t group_size) { return group_size % 128 == 0 ? 128 : group_size % 64 == 0 ? 64 : 32; }

template <typename T, bool BF16>
void launch_w4_mma_t(const QuantLinearParams& p, int splits, float* partial, cudaStream_t stream) {
  switch (w4_mma_segment(p.group_size)) {
    case 128: return launch_w4_mma_s<T, BF16, 128>(p, splits, partial, stream);
    case 64: return launch_w4_mma_s<T, BF16, 64>(p, splits, partial, stream);
    default: return launch_w4_mma_s<T, BF16, 32>(p, splits, partial, stream);
  }
}

template <typename T, bool BF16>
void launch_w8_mma_t(const QuantLinearParams& p, int splits, float* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + mmadec::kRowsPerBlock - 1) / mmadec::kRowsPerBlock),
                  static_cast<unsigned>(splits));
  constexpr int smem = w8mma::w8_mma_smem_bytes();
  constexpr const char* what = "quant_linear (W8 mma)";
  constexpr int threads = mmadec::kThreads;
  if (p.M <= 8) launch_with_smem<w8mma::w8_mma_kernel<T, BF16, 1>>(grid, threads, smem, stream, what, p, partial);
  else if (p.M <= 16) launch_with_smem<w8mma::w8_mma_kernel<T, BF16, 2>>(grid, threads, smem, stream, what, p, partial);
  else launch_with_smem<w8mma::w8_mma_kernel<T, BF16, 4>>(grid, threads, smem, stream, what, p, partial);
  static_assert(mmadec::kMaxM == 32, "the m-tile buckets above end at kMaxM");
  if (splits > 1)
    w8mma::w8_mma_finish_kernel<T><<<static_cast<unsigned>((p.M * p.N + 255) / 256), 256, 0, stream>>>(p, partial,
                                                                                                     splits);
}

}  // namespace

int mma_k_splits(int64_t blocks, int64_t nseg, int warps) {
  // Double the K splits while the blocks would not fill two per multiprocessor and every warp keeps at
  // least 2 segments: decode shapes with few rows (GQA's K/V projections) otherwise leave SMs idle.
  const int64_t sms = multiprocessors();
  int splits = 1;
  while (splits < 16 && blocks * splits < 2 * sms && nseg >= int64_t{4} * warps * splits) splits *= 2;
  return splits;
}

namespace {

std::atomic<bool>& quant_mma_flag() {
  static std::atomic<bool> on([] {
    const char* env = std::getenv("THRIFTY_CUDA_QUANT_MMA");
    return env == nullptr || env[0] == '\0' ? true : parse_quant_mma_mode(env);
  }());
  return on;
}

}  // namespace

bool parse_quant_mma_mode(const std::string& mode) {
  if (mode == "on") return true;
  if (mode == "off") return false;
  throw std::invalid_argument("THRIFTY_CUDA_QUANT_MMA / set_cuda_quant_mma: unknown mode '" + mode +
                              "'; expected on or off");
}

bool quant_mma_enabled() { return quant_mma_flag().load(); }

std::string set_quant_mma(const std::string& mode) {
  const bool on = parse_quant_mma_mode(mode);
  return quant_mma_flag().exchange(on) ? "on" : "off";
}

namespace {
// The shapes and alignments the mma decode kernels take (the switch aside: the launcher re-checks only
// these, so THRIFTY_CUDA_QUANT_MMA switched off by another thread between the glue's check and the launch
// cannot make it throw).
bool quant_mma_shape_fits(const QuantLinearParams& p) {
  if (p.dtype == DType::f32 || p.M < 1 || p.M > mmadec::kMaxM || !aligned16(p.qweight) || !aligned16(p.x) ||
      (p.M > 1 && p.x_stride % 8 != 0))  // 8 x 16-bit elements: 16-byte x rows
    return false;
  if (p.bits == 4) return p.group_size % 32 == 0 && p.K % p.group_size == 0 && p.K / 32 < (int64_t{1} << 30);
  return p.bits == 8 && p.K % w8mma::kSeg == 0 && p.K / w8mma::kSeg < (int64_t{1} << 30);
}
}  // namespace

bool quant_mma_fits(const QuantLinearParams& p) { return quant_mma_enabled() && quant_mma_shape_fits(p); }

int quant_mma_splits(const QuantLinearParams& p) {
  const int64_t nseg = p.bits == 4 ? p.K / w4_mma_segment(p.group_size) : p.K / w8mma::kSeg;
  return mma_k_splits((p.N + mmadec::kRowsPerBlock - 1) / mmadec::kRowsPerBlock, nseg, mmadec::kWarps);
}

void launch_quant_mma(const QuantLinearParams& p, int splits, float* partial, cudaStream_t stream) {
  if (!quant_mma_shape_fits(p) || splits < 1 || (splits > 1) != (partial != nullptr))
    throw std::logic_error(
        "thrifty: launch_quant_mma called for a shape quant_mma_fits rejects, or without its workspace");
  const bool bf16 = p.dtype == DType::bf16;
  if (p.bits == 4) {
    if (bf16) launch_w4_mma_t<__nv_bfloat16, true>(p, splits, partial, stream);
    else launch_w4_mma_t<__half, false>(p, splits, partial, stream);
  } else {
    if (bf16) launch_w8_mma_t<__nv_bfloat16, true>(p, splits, partial, stream);
    else launch_w8_mma_t<__half, false>(p, splits, partial, stream);
  }
  check_launch("quant_linear (mma)");
}

void launch_quant_linear(const QuantLinearParams& p, cudaStream_t stream) {
  if (p.M < 1 || p.M > kGemvMaxM)
    throw std::logic_error("thrifty: launch_quant_linear is the GEMV for 1 <= M <= kGemvMaxM (the glue takes larger M)");
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    const int64_t kpc = p.bits == 4 ? 32 : 16;
    const bool x_ok = aligned16(p.x) && (p.M == 1 || (p.x_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
    const bool vec = x_ok && aligned16(p.qweight) && p.K % kpc == 0 && p.K / kpc < (int64_t{1} << 30);
    if (p.bits == 4) launch_gemv_m<T, 4>(p, vec, stream);
    else launch_gemv_m<T, 8>(p, vec, stream);
  });
  check_launch("quant_linear");
}

void launch_quant_dequantize(const DequantParams& p, cudaStream_t stream) {
  if (p.bits == 4 && aligned16(p.qweight) && aligned16(p.w)) {
    DequantToParams d = dequant4_from(p);
    d.dtype = DType::f32;
    d.w = p.w;
    d.ldw = p.K;
    launch_dequantize4_to(d, stream);
    return;
  }
  dequant_kernel<<<grid_for(p.N * p.K, 256), 256, 0, stream>>>(p);
  check_launch("quant_dequantize");
}

void launch_dequantize4_to(const DequantToParams& d, cudaStream_t stream) {
  if (!aligned16(d.qweight) || !aligned16(d.w) || d.K % 32 != 0 || d.ldw % 8 != 0 || (d.split && d.dtype == DType::f32))
    throw std::logic_error("thrifty: launch_dequantize4_to needs 16-byte aligned qweight and w, K % 32 == 0");
  const unsigned grid = grid_for(d.N * (d.K / 8), 256);
  THRIFTY_CUDA_DTYPE_SWITCH(d.dtype, T, [&] {
    if (d.split) dequant4_to_kernel<T, true><<<grid, 256, 0, stream>>>(d);
    else dequant4_to_kernel<T, false><<<grid, 256, 0, stream>>>(d);
  });
  check_launch("quant_linear (dequantize)");
}

void launch_scale_bias_epilogue(const EpilogueParams& e, cudaStream_t stream) {
  if (e.M * e.N == 0) return;
  if (e.acc_int32) launch_epilogue_a<int32_t>(e, stream);
  else launch_epilogue_a<float>(e, stream);
  check_launch("quant epilogue");
}

}  // namespace thrifty::cuda
