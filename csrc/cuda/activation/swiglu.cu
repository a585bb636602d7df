// SwiGLU forward and backward on CUDA: elementwise over (rows, cols) with per-row strides
// (so gate and up may be the two halves of one fused gate_up tensor), 16-byte vector
// loads where strides and alignment allow, float32 math, silu(gate) recomputed in the
// backward. HBM traffic: each input read once, each output written once.
#include "cuda/common.cuh"
#include "cuda/activation/activation_launch.h"

namespace thrifty::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T, int V, bool BWD>
__global__ void swiglu_kernel(SwigluParams p, int64_t col_blocks) {
  const int64_t row = blockIdx.x / col_blocks;
  const int64_t col = (blockIdx.x - row * col_blocks) * (kThreads * V) + threadIdx.x * V;
  if (col >= p.cols) return;
  const T* g = static_cast<const T*>(p.gate) + row * p.gate_stride + col;
  const T* u = static_cast<const T*>(p.up) + row * p.up_stride + col;
  float gv[V], uv[V], dv[V], o1[V], o2[V];
  const bool full = col + V <= p.cols;
  if (full) {
    load_pack<T, V>(g, gv);
    load_pack<T, V>(u, uv);
    if constexpr (BWD) load_pack<T, V>(static_cast<const T*>(p.grad) + row * p.grad_stride + col, dv);
  } else {  // only reached when V == 1 (vector widths divide cols), kept for safety
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const bool in = col + e < p.cols;
      gv[e] = in ? to_float(g[e]) : 0.0f;
      uv[e] = in ? to_float(u[e]) : 0.0f;
      if constexpr (BWD) dv[e] = in ? to_float(static_cast<const T*>(p.grad)[row * p.grad_stride + col + e]) : 0.0f;
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float s = sigmoidf(gv[e]), gs = gv[e] * s;
    if constexpr (BWD) {
      o1[e] = dv[e] * uv[e] * (s + gs * (1.0f - s));  // grad_gate
      o2[e] = dv[e] * gs;                              // grad_up
    } else {
      o1[e] = gs * uv[e];
    }
  }
  const int64_t off = row * p.cols + col;
  T* out1 = static_cast<T*>(BWD ? p.grad_gate : p.out) + off;
  T* out2 = BWD ? static_cast<T*>(p.grad_up) + off : nullptr;
  if (full) {
    store_pack<T, V>(out1, o1);
    if constexpr (BWD) store_pack<T, V>(out2, o2);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (col + e < p.cols) {
        out1[e] = from_float<T>(o1[e]);
        if constexpr (BWD) out2[e] = from_float<T>(o2[e]);
      }
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
  const int64_t col_blocks = (p.cols + kThreads * V - 1) / (kThreads * V);
  const int64_t blocks = p.rows * col_blocks;
  if (blocks > 0x7fffffffLL) throw std::runtime_error("thrifty.swiglu: tensor too large for one launch");
  swiglu_kernel<T, V, BWD><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(p, col_blocks);
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
