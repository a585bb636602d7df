// SwiGLU forward and backward on the CPU; compiled once per ISA level.
//
// With s = sigmoid(g) (float32, whatever the storage type):
//   forward:  out       = g * s * u                       (silu(g) * up)
//   backward: grad_up   = grad * g * s
//             grad_gate = grad * u * s * (1 + g * (1 - s))  (silu'(g) = s * (1 + g * (1 - s)))
// silu(g) is recomputed in the backward, never stored. Each element is read once and
// written once: the bandwidth floor. bf16 goes through load_pair/store_pair (no shuffles), and
// the products not on sigmoid's critical path (g * u, grad * g) are formed beside it: on AVX2
// the op is bound by the latency of sigmoid's chain (vec.h).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/parallel.h"
#include "cpu/activation/activation_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

template <typename T>
THRIFTY_INLINE Vec ld(const T* p, int m) {
  return m == W ? Vec::load(p) : Vec::load(p, m);
}
template <typename T>
THRIFTY_INLINE void st(Vec v, T* p, int m) {
  if (m == W)
    v.store(p);
  else
    v.store(p, m);
}
template <bool kStream>
THRIFTY_INLINE void put_pair(Vec even, Vec odd, bf16_t* p) {
  if constexpr (kStream)
    stream_pair(p, even, odd);
  else
    store_pair(p, even, odd);
}

// Elements per unrolled step: two vectors, loaded as a bf16 pair (no shuffles) for bf16.
constexpr int64_t kStep = 2 * W;

// Runs body(i) over full steps of kStep elements and part(i, m) (m <= W) over the rest.
template <typename FB, typename FP>
THRIFTY_INLINE void over_row(int64_t n, const FB& body, const FP& part) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) body(i);
  for (; i < n; i += W) part(i, static_cast<int>(std::min<int64_t>(W, n - i)));
}

// Blocks of kBlock elements (a multiple of kStep) per task; a longer row is split.
constexpr int64_t kBlock = 32768;
static_assert(kBlock % (2 * 16) == 0, "blocks start on a full step at every ISA level");

template <typename F>
void over_rows(const SwigluParams& p, const F& row_fn) {
  const int64_t n = p.cols;
  const int64_t per_row = (n + kBlock - 1) / kBlock;
  parallel_for(0, p.rows * per_row, std::max<int64_t>(1, kBlock / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r = t / per_row, c0 = (t % per_row) * kBlock;
      row_fn(r, c0, std::min(n, c0 + kBlock) - c0);
    }
    stream_fence();
  });
}

// Outputs this large go out as streaming stores (they cannot stay in cache, and a normal store
// first reads each line from memory) when every output row starts 64-byte aligned, so the
// full steps of every block are aligned too.
constexpr int64_t kStreamBytes = 8ll << 20;
template <typename T>
bool use_stream(const SwigluParams& p, std::initializer_list<const void*> outs) {
  if (p.rows * p.cols * static_cast<int64_t>(sizeof(T)) < kStreamBytes) return false;
  if ((p.cols * static_cast<int64_t>(sizeof(T))) % 64 != 0) return false;
  for (const void* o : outs)
    if (reinterpret_cast<uintptr_t>(o) % 64 != 0) return false;
  return true;
}

template <bool kStream, typename T>
void fwd_impl(const SwigluParams& p) {
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  T* o = static_cast<T*>(p.out);
  over_rows(p, [&](int64_t r, int64_t c0, int64_t len) {
    const T* gr = g + r * p.gate_stride + c0;
    const T* ur = u + r * p.up_stride + c0;
    T* orow = o + r * p.cols + c0;
    auto part = [&](int64_t i, int m) {
      Vec gv = ld(gr + i, m);
      st(gv * ld(ur + i, m) * sigmoid(gv), orow + i, m);
    };
    if constexpr (std::is_same_v<T, bf16_t>) {
      over_row(len, [&](int64_t i) {
        Vec g0, g1, u0, u1;
        load_pair(gr + i, g0, g1);
        load_pair(ur + i, u0, u1);
        put_pair<kStream>(g0 * u0 * sigmoid(g0), g1 * u1 * sigmoid(g1), orow + i);
      }, part);
    } else {
      over_row(len, [&](int64_t i) {
        Vec g0 = Vec::load(gr + i), g1 = Vec::load(gr + i + W);
        put<kStream>(g0 * Vec::load(ur + i) * sigmoid(g0), orow + i);
        put<kStream>(g1 * Vec::load(ur + i + W) * sigmoid(g1), orow + i + W);
      }, part);
    }
  });
}

// With s = sigmoid(g), gs = g * s = silu(g):  grad_up = d * gs,  grad_gate = d * u * (s + gs * (1 - s)).
THRIFTY_INLINE void bwd_math(Vec gv, Vec uv, Vec dv, Vec& grad_gate, Vec& grad_up) {
  Vec oms;  // 1 - s, accurate where s rounds to 1
  Vec s = sigmoid(gv, oms);
  Vec gs = gv * s;
  grad_up = dv * gv * s;
  grad_gate = dv * uv * fma(gs, oms, s);
}

template <bool kStream, typename T>
void bwd_impl(const SwigluParams& p) {
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  const T* d = static_cast<const T*>(p.grad);
  T* gg = static_cast<T*>(p.grad_gate);
  T* gu = static_cast<T*>(p.grad_up);
  over_rows(p, [&](int64_t r, int64_t c0, int64_t len) {
    const T* gr = g + r * p.gate_stride + c0;
    const T* ur = u + r * p.up_stride + c0;
    const T* dr = d + r * p.grad_stride + c0;
    T* ggr = gg + r * p.cols + c0;
    T* gur = gu + r * p.cols + c0;
    auto part = [&](int64_t i, int m) {
      Vec a, b;
      bwd_math(ld(gr + i, m), ld(ur + i, m), ld(dr + i, m), a, b);
      st(a, ggr + i, m);
      st(b, gur + i, m);
    };
    if constexpr (std::is_same_v<T, bf16_t>) {
      over_row(len, [&](int64_t i) {
        Vec g0, g1, u0, u1, d0, d1, a0, a1, b0, b1;
        load_pair(gr + i, g0, g1);
        load_pair(ur + i, u0, u1);
        load_pair(dr + i, d0, d1);
        bwd_math(g0, u0, d0, a0, b0);
        bwd_math(g1, u1, d1, a1, b1);
        put_pair<kStream>(a0, a1, ggr + i);
        put_pair<kStream>(b0, b1, gur + i);
      }, part);
    } else {
      over_row(len, [&](int64_t i) {
        for (int k = 0; k < 2; ++k) {
          const int64_t j = i + k * W;
          Vec a, b;
          bwd_math(Vec::load(gr + j), Vec::load(ur + j), Vec::load(dr + j), a, b);
          put<kStream>(a, ggr + j);
          put<kStream>(b, gur + j);
        }
      }, part);
    }
  });
}

template <typename T>
void fwd(const SwigluParams& p) {
  if (use_stream<T>(p, {p.out}))
    fwd_impl<true, T>(p);
  else
    fwd_impl<false, T>(p);
}

template <typename T>
void bwd(const SwigluParams& p) {
  if (use_stream<T>(p, {p.grad_gate, p.grad_up}))
    bwd_impl<true, T>(p);
  else
    bwd_impl<false, T>(p);
}

}  // namespace

void swiglu_fwd(const SwigluParams& p) {
  switch (p.dtype) {
    case DType::f32: return fwd<float>(p);
    case DType::bf16: return fwd<bf16_t>(p);
    case DType::f16: return fwd<f16_t>(p);
  }
}

void swiglu_bwd(const SwigluParams& p) {
  switch (p.dtype) {
    case DType::f32: return bwd<float>(p);
    case DType::bf16: return bwd<bf16_t>(p);
    case DType::f16: return bwd<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
