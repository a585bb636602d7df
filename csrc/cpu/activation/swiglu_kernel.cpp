// SwiGLU forward and backward on the CPU; compiled once per ISA level.
//
// With s = sigmoid(g) (float32, whatever the storage type):
//   forward:  out       = g * s * u                       (silu(g) * up)
//   backward: grad_up   = grad * g * s
//             grad_gate = grad * u * s * (1 + g * (1 - s))  (silu'(g) = s * (1 + g * (1 - s)))
// silu(g) is recomputed in the backward, never stored. Each element is read once and
// written once: the bandwidth floor.
#include <algorithm>

#include "common/parallel.h"
#include "cpu/activation/activation_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

template <typename F>
THRIFTY_INLINE void over_row(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    f(i, W);
    f(i + W, W);
  }
  for (; i + W <= n; i += W) f(i, W);
  if (i < n) f(i, static_cast<int>(n - i));
}

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

template <typename F>
void over_rows(const SwigluParams& p, const F& row_fn) {
  // Contiguous blocks of about 32K elements per task; a row longer than that is split.
  const int64_t n = p.cols;
  const int64_t block = std::max<int64_t>(W, (32768 / W) * W);
  const int64_t per_row = (n + block - 1) / block;
  parallel_for(0, p.rows * per_row, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r = t / per_row, c0 = (t % per_row) * block;
      row_fn(r, c0, std::min(n, c0 + block) - c0);
    }
  });
}

template <typename T>
void fwd(const SwigluParams& p) {
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  T* o = static_cast<T*>(p.out);
  over_rows(p, [&](int64_t r, int64_t c0, int64_t len) {
    const T* gr = g + r * p.gate_stride + c0;
    const T* ur = u + r * p.up_stride + c0;
    T* orow = o + r * p.cols + c0;
    over_row(len, [&](int64_t i, int m) {
      Vec gv = ld(gr + i, m);
      st(gv * sigmoid(gv) * ld(ur + i, m), orow + i, m);
    });
  });
}

template <typename T>
void bwd(const SwigluParams& p) {
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  const T* d = static_cast<const T*>(p.grad);
  T* gg = static_cast<T*>(p.grad_gate);
  T* gu = static_cast<T*>(p.grad_up);
  const Vec one = Vec::set1(1.0f);
  over_rows(p, [&](int64_t r, int64_t c0, int64_t len) {
    const T* gr = g + r * p.gate_stride + c0;
    const T* ur = u + r * p.up_stride + c0;
    const T* dr = d + r * p.grad_stride + c0;
    T* ggr = gg + r * p.cols + c0;
    T* gur = gu + r * p.cols + c0;
    over_row(len, [&](int64_t i, int m) {
      Vec gv = ld(gr + i, m), uv = ld(ur + i, m), dv = ld(dr + i, m);
      Vec s = sigmoid(gv);
      Vec gs = gv * s;  // silu(g)
      st(dv * gs, gur + i, m);
      // s * (1 + g * (1 - s)) = s + g*s - g*s*s = s + gs * (1 - s)
      st(dv * uv * fma(gs, one - s, s), ggr + i, m);
    });
  });
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
