// RMSNorm forward and backward on the CPU; compiled once per ISA level.
//
// Forward, per row (float32 accumulation whatever the storage type):
//   h = x (+ residual, rounded to the storage type, as an unfused add would)
//   rstd = 1 / sqrt(mean(h^2) + eps);  y = h * rstd * w
// Two passes over the row; the second reads it back from L1/L2, so memory traffic is one
// read of x (and residual) and one write of y (and h): the bandwidth floor.
//
// Backward, with xhat = h * rstd and gw = grad_y * w:
//   grad_h = rstd * (gw - xhat * mean(gw * xhat))   (+ grad flowing into h directly)
//   grad_w = sum over rows of grad_y * xhat
// grad_w is summed per fixed chunk of rows into a float32 scratch, then over chunks in
// chunk order: the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/parallel.h"
#include "cpu/norm/norm_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

template <typename T>
THRIFTY_INLINE float sum_squares(const T* x, int64_t n) {
  Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  int64_t i = 0;
  if constexpr (std::is_same_v<T, bf16_t>) {  // pairs: no widening shuffles
    for (; i + 4 * W <= n; i += 4 * W) {
      Vec v0, v1, v2, v3;
      load_pair(x + i, v0, v1);
      load_pair(x + i + 2 * W, v2, v3);
      a0 = fma(v0, v0, a0);
      a1 = fma(v1, v1, a1);
      a2 = fma(v2, v2, a2);
      a3 = fma(v3, v3, a3);
    }
  }
  for (; i + 4 * W <= n; i += 4 * W) {
    Vec v0 = Vec::load(x + i), v1 = Vec::load(x + i + W), v2 = Vec::load(x + i + 2 * W),
        v3 = Vec::load(x + i + 3 * W);
    a0 = fma(v0, v0, a0);
    a1 = fma(v1, v1, a1);
    a2 = fma(v2, v2, a2);
    a3 = fma(v3, v3, a3);
  }
  for (; i + W <= n; i += W) {
    Vec v = Vec::load(x + i);
    a0 = fma(v, v, a0);
  }
  if (i < n) {
    Vec v = Vec::load(x + i, static_cast<int>(n - i));
    a1 = fma(v, v, a1);
  }
  return ((a0 + a1) + (a2 + a3)).reduce_add();
}

// h = x + r rounded to T, stored; returns sum of squares of the rounded h.
template <typename T>
THRIFTY_INLINE float add_store_sum_squares(const T* x, const T* r, T* h, int64_t n) {
  Vec a0 = Vec::zero(), a1 = Vec::zero();
  int64_t i = 0;
  auto step = [&](int64_t j, int m, Vec& acc) {
    Vec s = m == W ? Vec::load(x + j) + Vec::load(r + j) : Vec::load(x + j, m) + Vec::load(r + j, m);
    if (m == W) {
      s.store(h + j);
      s = Vec::load(h + j);  // the rounded value is what the norm (and its backward) sees
    } else {
      s.store(h + j, m);
      s = Vec::load(h + j, m);
    }
    acc = fma(s, s, acc);
  };
  for (; i + 2 * W <= n; i += 2 * W) {
    step(i, W, a0);
    step(i + W, W, a1);
  }
  for (; i + W <= n; i += W) step(i, W, a0);
  if (i < n) step(i, static_cast<int>(n - i), a1);
  return (a0 + a1).reduce_add();
}


// y = x * rstd * w. kStream: full vectors go out as streaming stores (y must then be aligned
// from the head onwards; a misaligned head is stored normally).
template <bool kStream, typename T, typename TW>
THRIFTY_INLINE void scale_store(const T* x, const TW* w, float rstd, T* y, int64_t n) {
  const Vec r = Vec::set1(rstd);
  int64_t i = 0;
  constexpr bool kPair = std::is_same_v<T, bf16_t> && std::is_same_v<TW, bf16_t>;
  if constexpr (kStream) {
    const int64_t head = std::min<int64_t>(stream_head(y, kPair ? 4 * W : W * static_cast<int>(sizeof(T))), n);
    for (; i < head; i += W) {
      const int m = static_cast<int>(std::min<int64_t>(W, head - i));
      (Vec::load(x + i, m) * r * Vec::load(w + i, m)).store(y + i, m);
    }
    i = head;
  }
  if constexpr (kPair) {  // bf16 x and weight: pairs, no shuffles
    for (; i + 2 * W <= n; i += 2 * W) {
      Vec x0, x1, w0, w1;
      load_pair(x + i, x0, x1);
      load_pair(w + i, w0, w1);
      if constexpr (kStream)
        stream_pair(y + i, x0 * r * w0, x1 * r * w1);
      else
        store_pair(y + i, x0 * r * w0, x1 * r * w1);
    }
  }
  for (; i + 2 * W <= n; i += 2 * W) {
    put<kStream>(Vec::load(x + i) * r * Vec::load(w + i), y + i);
    put<kStream>(Vec::load(x + i + W) * r * Vec::load(w + i + W), y + i + W);
  }
  for (; i + W <= n; i += W) put<kStream>(Vec::load(x + i) * r * Vec::load(w + i), y + i);
  if (i < n) {
    int m = static_cast<int>(n - i);
    (Vec::load(x + i, m) * r * Vec::load(w + i, m)).store(y + i, m);
  }
}

template <bool kStream, typename T, typename TW>
void fwd_impl(const RmsNormParams& p) {
  const int64_t n = p.hidden;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const TW* w = static_cast<const TW*>(p.weight);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const T* xr = x + row * p.x_stride;
      const T* src = xr;
      float ss;
      if (res != nullptr) {
        T* hr = h + row * n;
        ss = add_store_sum_squares(xr, res + row * p.r_stride, hr, n);
        src = hr;
      } else {
        ss = sum_squares(xr, n);
      }
      const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + p.eps);
      p.rstd[row] = rstd;
      scale_store<kStream>(src, w, rstd, y + row * n, n);
    }
    if constexpr (kStream) stream_fence();
  });
}

// An output larger than this bypasses the caches (streaming stores): it could not stay in
// them anyway, and a normal store would first read every line of y from memory.
constexpr int64_t kStreamBytes = 8ll << 20;

template <typename T, typename TW>
void fwd(const RmsNormParams& p) {
  if (p.rows * p.hidden * static_cast<int64_t>(sizeof(T)) >= kStreamBytes)
    fwd_impl<true, T, TW>(p);
  else
    fwd_impl<false, T, TW>(p);
}

template <typename T, typename TW>
void bwd(const RmsNormBwdParams& p) {
  const int64_t n = p.hidden;
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* x = static_cast<const T*>(p.x);
  const T* gh = static_cast<const T*>(p.grad_h);
  const TW* w = static_cast<const TW*>(p.weight);
  T* gx = static_cast<T*>(p.grad_x);
  const int64_t rows_per_chunk = (p.rows + p.chunks - 1) / p.chunks;
  parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* dw = p.grad_weight_partial + c * n;
      for (int64_t i = 0; i < n; ++i) dw[i] = 0.0f;
      const int64_t r_end = std::min(p.rows, (c + 1) * rows_per_chunk);
      for (int64_t row = c * rows_per_chunk; row < r_end; ++row) {
        const T* g = gy + row * p.gy_stride;
        const T* xr = x + row * p.x_stride;
        const float rstd = p.rstd[row];
        // pass 1: dot = sum(g * w * x)
        Vec a0 = Vec::zero(), a1 = Vec::zero();
        int64_t i = 0;
        for (; i + 2 * W <= n; i += 2 * W) {
          a0 = fma(Vec::load(g + i) * Vec::load(w + i), Vec::load(xr + i), a0);
          a1 = fma(Vec::load(g + i + W) * Vec::load(w + i + W), Vec::load(xr + i + W), a1);
        }
        for (; i + W <= n; i += W) a0 = fma(Vec::load(g + i) * Vec::load(w + i), Vec::load(xr + i), a0);
        if (i < n) {
          int m = static_cast<int>(n - i);
          a1 = fma(Vec::load(g + i, m) * Vec::load(w + i, m), Vec::load(xr + i, m), a1);
        }
        const float dot = (a0 + a1).reduce_add();
        // grad_h = rstd * gw - x * (rstd^3 * dot / n)
        const Vec vr = Vec::set1(rstd), vc = Vec::set1(rstd * rstd * rstd * dot / static_cast<float>(n));
        T* gxr = gx + row * n;
        const T* ghr = gh != nullptr ? gh + row * p.gh_stride : nullptr;
        auto step = [&](int64_t j, int m) {
          const bool full = m == W;
          Vec gv = full ? Vec::load(g + j) : Vec::load(g + j, m);
          Vec xv = full ? Vec::load(xr + j) : Vec::load(xr + j, m);
          Vec wv = full ? Vec::load(w + j) : Vec::load(w + j, m);
          Vec d = fma(gv * wv, vr, Vec::zero() - xv * vc);
          if (ghr != nullptr) d = d + (full ? Vec::load(ghr + j) : Vec::load(ghr + j, m));
          Vec acc = full ? Vec::load(dw + j) : Vec::load(dw + j, m);
          acc = fma(gv * xv, vr, acc);
          if (full) {
            d.store(gxr + j);
            acc.store(dw + j);
          } else {
            d.store(gxr + j, m);
            acc.store(dw + j, m);
          }
        };
        i = 0;
        for (; i + W <= n; i += W) step(i, W);
        if (i < n) step(i, static_cast<int>(n - i));
      }
    }
  });
}

template <typename TW>
void reduce_grad_weight(const float* partial, int64_t chunks, int64_t n, TW* out) {
  parallel_for(0, (n + W - 1) / W, 64, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t j = blk * W;
      const int m = static_cast<int>(std::min<int64_t>(W, n - j));
      Vec acc = Vec::zero();
      for (int64_t c = 0; c < chunks; ++c) acc = acc + Vec::load(partial + c * n + j, m);
      acc.store(out + j, m);
    }
  });
}

template <template <typename, typename> class F, typename P>
void by_dtype(const P& p) {
  if (p.wdtype == DType::f32) {
    switch (p.dtype) {
      case DType::f32: return F<float, float>::run(p);
      case DType::bf16: return F<bf16_t, float>::run(p);
      case DType::f16: return F<f16_t, float>::run(p);
    }
  } else if (p.wdtype == DType::bf16) {
    return F<bf16_t, bf16_t>::run(p);
  } else {
    return F<f16_t, f16_t>::run(p);
  }
}

template <typename T, typename TW>
struct Fwd {
  static void run(const RmsNormParams& p) { fwd<T, TW>(p); }
};

}  // namespace

void rms_norm_fwd(const RmsNormParams& p) { by_dtype<Fwd>(p); }

namespace {
template <typename T, typename TW>
struct Bwd {
  static void run(const RmsNormBwdParams& p) {
    bwd<T, TW>(p);
  }
};
}  // namespace

void rms_norm_bwd(const RmsNormBwdParams& p) { by_dtype<Bwd>(p); }

void rms_norm_reduce_grad_weight(const float* partial, int64_t chunks, int64_t n, DType wdtype, void* out) {
  switch (wdtype) {
    case DType::f32: return reduce_grad_weight(partial, chunks, n, static_cast<float*>(out));
    case DType::bf16: return reduce_grad_weight(partial, chunks, n, static_cast<bf16_t*>(out));
    case DType::f16: return reduce_grad_weight(partial, chunks, n, static_cast<f16_t*>(out));
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
