// Rotary position embedding on CUDA (forward, and the backward as the inverse rotation).
//
// One block per token; its threads stride over (head, group of V rotated features) of q
// and k, reading x with 16-byte vector loads where strides and alignment allow (V elements:
// 4 float32 or 8 bfloat16/float16), the token's cos/sin row from L1/L2, and writing the
// rotated pairs in float32 math rounded once. Features [rot_dim, head_dim) are copied.
// HBM traffic: one read of q and k, one write of the outputs, one cache row per token.
#include "cuda/common.cuh"
#include "cuda/rotary/rotary_launch.h"

namespace thrifty::cuda {
namespace {

template <typename T, bool INTERLEAVED, int V>
__global__ void rotary_kernel(RotaryParams p, float sign) {
  const int64_t t = blockIdx.x;
  int64_t pos = p.positions_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(p.positions)[t])
                                  : static_cast<const int64_t*>(p.positions)[t];
  // The glue checked the range (or remembers having checked this very tensor); the clamp only keeps a
  // write it could not see (common/rotary_glue.h) from reading outside the cache.
  pos = pos < 0 ? 0 : (pos >= p.max_position ? p.max_position - 1 : pos);
  const int h = static_cast<int>(p.rot_dim / 2), hd = static_cast<int>(p.head_dim);
  const int qh = static_cast<int>(p.q_heads), nh = static_cast<int>(p.q_heads + p.k_heads);
  const float* cs = p.cos_sin + pos * p.rot_dim;
  const float* sn = cs + h;
  const T* q = static_cast<const T*>(p.q) + t * p.q_tok_stride;
  const T* k = static_cast<const T*>(p.k) + t * p.k_tok_stride;
  T* qo = static_cast<T*>(p.q_out) + t * p.q_heads * hd;
  T* ko = static_cast<T*>(p.k_out) + t * p.k_heads * hd;

  // G features per unit: V (one vector) in neox style; at least one pair in GPT-J style.
  constexpr int G = INTERLEAVED && V < 2 ? 2 : V;
  const int units = (INTERLEAVED ? 2 * h : h) / G;
  for (int u = threadIdx.x; u < nh * units; u += blockDim.x) {
    const int head = u / units, j = (u - head * units) * G;
    const T* x = head < qh ? q + head * p.q_head_stride : k + (head - qh) * p.k_head_stride;
    T* y = head < qh ? qo + head * hd : ko + (head - qh) * hd;
    if constexpr (INTERLEAVED) {
      float a[G], o[G];
      if constexpr (G == V) {
        load_pack<T, V>(x + j, a);
      } else {
#pragma unroll
        for (int e = 0; e < G; ++e) a[e] = to_float(x[j + e]);
      }
#pragma unroll
      for (int e = 0; e < G; e += 2) {
        const float c = __ldg(cs + (j + e) / 2), s = sign * __ldg(sn + (j + e) / 2);
        o[e] = a[e] * c - a[e + 1] * s;
        o[e + 1] = a[e + 1] * c + a[e] * s;
      }
      if constexpr (G == V) {
        store_pack<T, V>(y + j, o);
      } else {
#pragma unroll
        for (int e = 0; e < G; ++e) y[j + e] = from_float<T>(o[e]);
      }
    } else {
      float a[V], b[V], o1[V], o2[V];
      load_pack<T, V>(x + j, a);
      load_pack<T, V>(x + h + j, b);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float c = __ldg(cs + j + e), s = sign * __ldg(sn + j + e);
        o1[e] = a[e] * c - b[e] * s;
        o2[e] = b[e] * c + a[e] * s;
      }
      store_pack<T, V>(y + j, o1);
      store_pack<T, V>(y + h + j, o2);
    }
  }
  const int rd = 2 * h, rest = hd - rd;
  if (rest > 0) {
    for (int u = threadIdx.x; u < nh * rest; u += blockDim.x) {
      const int head = u / rest, j = rd + (u - head * rest);
      const T* x = head < qh ? q + head * p.q_head_stride : k + (head - qh) * p.k_head_stride;
      T* y = head < qh ? qo + head * hd : ko + (head - qh) * hd;
      y[j] = x[j];
    }
  }
}

template <typename T, bool INTERLEAVED, int V>
void launch_v(const RotaryParams& p, cudaStream_t s) {
  const int64_t units = (p.q_heads + p.k_heads) * (p.rot_dim / 2) / (V > 1 ? (INTERLEAVED ? V / 2 : V) : 1);
  int threads = static_cast<int>((units + 31) / 32 * 32);
  threads = threads < 64 ? 64 : (threads > 256 ? 256 : threads);
  rotary_kernel<T, INTERLEAVED, V><<<static_cast<unsigned>(p.tokens), threads, 0, s>>>(p, p.inverse ? -1.0f : 1.0f);
}

// Widest V (16 bytes of T) that every base pointer, stride and split point allows.
template <typename T>
int pick_vec(const RotaryParams& p) {
  int v = 16 / static_cast<int>(sizeof(T));
  const int64_t split = p.interleaved ? p.rot_dim : p.rot_dim / 2;  // vectors must not straddle it
  while (v > 1) {
    const int64_t bytes = static_cast<int64_t>(sizeof(T)) * v;
    bool ok = split % v == 0 && p.head_dim % v == 0 && p.q_tok_stride % v == 0 && p.q_head_stride % v == 0 &&
              p.k_tok_stride % v == 0 && p.k_head_stride % v == 0;
    for (const void* ptr : {p.q, p.k, static_cast<const void*>(p.q_out), static_cast<const void*>(p.k_out)})
      if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) ok = false;
    if (ok) break;
    v /= 2;
  }
  return v;
}

template <typename T, bool INTERLEAVED>
void launch_t(const RotaryParams& p, cudaStream_t s) {
  constexpr int VMAX = 16 / sizeof(T);
  if (pick_vec<T>(p) == VMAX) return launch_v<T, INTERLEAVED, VMAX>(p, s);
  return launch_v<T, INTERLEAVED, 1>(p, s);
}

}  // namespace

void launch_rotary_embedding(const RotaryParams& p, cudaStream_t s) {
  if (p.tokens == 0 || p.q_heads + p.k_heads == 0) return;
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    if (p.interleaved)
      launch_t<T, true>(p, s);
    else
      launch_t<T, false>(p, s);
  });
  check_launch("rotary_embedding");
}

}  // namespace thrifty::cuda
