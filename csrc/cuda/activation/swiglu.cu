// SwiGLU forward and backward on CUDA: elementwise over (rows, cols) with per-row strides
// (so gate and up may be the two halves of one fused gate_up tensor), 16-byte vector
// loads where strides and alignment allow, float32 math, silu(gate) recomputed in the
// backward. HBM traffic: each input read once, each output written once. Grid: one block per
// (row, kThreads * V * U columns).
#include "cuda/common.cuh"
#include "cuda/activation/activation_launch.h"

namespace thrifty::cuda {
namespace {

constexpr int kThreads = 256;

// Fast exp and division (2 ulp each), as with --use_fast_math, which this file no longer gets.
__device__ __forceinline__ float sigmoidf(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// U vectors of V elements per thread, kThreads * V apart so each warp's accesses stay contiguous;
// every load is issued before any math: a thread keeps 2U (3U backward) 16-byte loads in flight,
// which is what it takes to cover HBM latency at full bandwidth (one vector per thread left an
// H200 at 40% of its copy bandwidth).
template <typename T, int V, int U, bool BWD>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(SwigluParams p, unsigned col_blocks) {
  const unsigned row32 = blockIdx.x / col_blocks;
  const int64_t row = row32;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x - row32 * col_blocks) * (kThreads * V * U) + threadIdx.x * V;
  const T* g = static_cast<const T*>(p.gate) + row * p.gate_stride;
  const T* u = static_cast<const T*>(p.up) + row * p.up_stride;
  const T* d = BWD ? static_cast<const T*>(p.grad) + row * p.grad_stride : nullptr;
  float gv[U][V], uv[U][V], dv[U][V];
  // With V > 1, V divides cols (can_vec), so a vector starting inside the row lies wholly inside it.
#pragma unroll
  for (int i = 0; i < U; ++i) {
    const int64_t col = col0 + static_cast<int64_t>(i) * (kThreads * V);
    if (V > 1) {
      if (col < p.cols) {
        load_pack<T, V>(g + col, gv[i]);
        load_pack<T, V>(u + col, uv[i]);
        if constexpr (BWD) load_pack<T, V>(d + col, dv[i]);
      }
    } else {
      const bool in = col < p.cols;
      gv[i][0] = in ? to_float(g[col]) : 0.0f;
      uv[i][0] = in ? to_float(u[col]) : 0.0f;
      if constexpr (BWD) dv[i][0] = in ? to_float(d[col]) : 0.0f;
    }
  }
  T* out1 = static_cast<T*>(BWD ? p.grad_gate : p.out) + row * p.cols;
  T* out2 = BWD ? static_cast<T*>(p.grad_up) + row * p.cols : nullptr;
#pragma unroll
  for (int i = 0; i < U; ++i) {
    const int64_t col = col0 + static_cast<int64_t>(i) * (kThreads * V);
    if (col >= p.cols) continue;
    float o1[V], o2[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float s = sigmoidf(gv[i][e]), gs = gv[i][e] * s;
      if constexpr (BWD) {
        o1[e] = dv[i][e] * uv[i][e] * (s + gs * (1.0f - s));  // grad_gate
        o2[e] = dv[i][e] * gs;                                  // grad_up
      } else {
        o1[e] = gs * uv[i][e];
      }
    }
    if (V > 1) {
      store_pack<T, V>(out1 + col, o1);
      if constexpr (BWD) store_pack<T, V>(out2 + col, o2);
    } else {
      out1[col] = from_float<T>(o1[0]);
      if constexpr (BWD) out2[col] = from_float<T>(o2[0]);
    }
  }
}

template <typename T>
bool can_vec(const SwigluParams& p, bool bwd) {
  constexpr int V = 16 / sizeof(T);
  bool ok = p.cols % V == 0 && p.gate_stride % V == 0 && p.up_stride % V == 0 && aligned16(p.gate) && aligned16(p.up);
  if (bwd)
    ok = ok && p.grad_stride % V == 0 && aligned16(p.grad) && aligned16(p.grad_gate) && aligned16(p.grad_up);
  else
    ok = ok && aligned16(p.out);
  return ok;
}

template <typename T, int V, bool BWD>
void launch_v(const SwigluParams& p, cudaStream_t s) {
  constexpr int U = 4;
  const int64_t col_blocks = (p.cols + kThreads * V * U - 1) / (kThreads * V * U);
  const int64_t blocks = p.rows * col_blocks;
  if (blocks > 0x7fffffffLL) throw std::runtime_error("thrifty.swiglu: tensor too large for one launch");
  swiglu_kernel<T, V, U, BWD><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(p, static_cast<unsigned>(col_blocks));
}

template <bool BWD>
void launch(const SwigluParams& p, cudaStream_t s) {
  if (p.rows == 0 || p.cols == 0) return;
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    if (can_vec<T>(p, BWD))
      launch_v<T, 16 / sizeof(T), BWD>(p, s);
    else
      launch_v<T, 1, BWD>(p, s);
  });
  check_launch(BWD ? "swiglu backward" : "swiglu forward");
}

}  // namespace

void launch_swiglu_fwd(const SwigluParams& p, cudaStream_t s) { launch<false>(p, s); }
void launch_swiglu_bwd(const SwigluParams& p, cudaStream_t s) { launch<true>(p, s); }

}  // namespace thrifty::cuda
