// Fused softmax cross-entropy on the CPU, compiled once per ISA level; used by
// linear_cross_entropy around its matmuls (see common/loss_glue.h).
//
// With z the logits (capped: z = c * tanh(x / c) when softcap c > 0, kept in float32 and
// recomputed from x where needed, so the cap adds no rounding), y the label, eps the label
// smoothing and V the vocab:
//   forward, per row:  lse  = log sum_j exp(z_j)     (max-shifted)
//                      loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j)   (0 if ignored)
//   gradient:          d loss / d x_j = (exp(z_j - lse) - eps / V - (1 - eps) [j == y]) * (1 - (z_j / c)^2)
// ce_fwd makes two sweeps over a row (max and sum z; sum exp), the row staying in L2 between
// them; ce_grad one sweep over a (rows x block of columns) tile, writing the gradient in place.
#include <cmath>

#include "common/parallel.h"
#include "cpu/loss/loss_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

THRIFTY_INLINE Vec tanh_vec(Vec x) {
  // tanh(x) = 1 - 2 / (exp(2x) + 1); exp overflow to inf gives 1, underflow gives -1.
  const Vec one = Vec::set1(1.0f), two = Vec::set1(2.0f);
  return one - two / (exp(x * two) + one);
}

struct Cap {
  float c, inv;
  Vec vc, vinv;
  explicit Cap(float cap) : c(cap), inv(cap > 0 ? 1.0f / cap : 0.0f), vc(Vec::set1(cap)), vinv(Vec::set1(inv)) {}
  THRIFTY_INLINE Vec operator()(Vec x) const { return c > 0 ? vc * tanh_vec(x * vinv) : x; }
  THRIFTY_INLINE float operator()(float x) const { return c > 0 ? c * std::tanh(x * inv) : x; }
};

template <typename T>
void fwd_rows(const CeFwdParams& p) {
  const int64_t V = p.vocab;
  const float eps = p.label_smoothing;
  const Cap cap(p.softcap);
  parallel_for(0, p.rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* z = static_cast<const T*>(p.logits) + r * p.ld;
      const int64_t y = p.labels[r];
      // sweep 1: max and sum of the (capped) logits
      Vec vmax = Vec::set1(-INFINITY), vsum = Vec::zero();
      float smax = -INFINITY, ssum = 0.0f;
      int64_t j = 0;
      for (; j + W <= V; j += W) {
        Vec v = cap(Vec::load(z + j));
        vmax = max(vmax, v);
        vsum = vsum + v;
      }
      for (; j < V; ++j) {
        const float v = cap(to_float(z[j]));
        smax = std::fmax(smax, v);
        ssum += v;
      }
      const float m = std::fmax(vmax.reduce_max(), smax);
      const float zsum = vsum.reduce_add() + ssum;
      // sweep 2: sum exp(z - m)
      const Vec vm = Vec::set1(m);
      Vec a0 = Vec::zero(), a1 = Vec::zero();
      j = 0;
      for (; j + 2 * W <= V; j += 2 * W) {
        a0 = a0 + exp(cap(Vec::load(z + j)) - vm);
        a1 = a1 + exp(cap(Vec::load(z + j + W)) - vm);
      }
      for (; j + W <= V; j += W) a0 = a0 + exp(cap(Vec::load(z + j)) - vm);
      float se = 0.0f;
      for (; j < V; ++j) se += std::exp(cap(to_float(z[j])) - m);
      const float lse = m + std::log((a0 + a1).reduce_add() + se);
      p.lse[r] = lse;
      // each term only where its weight is not 0: an infinite logit makes zsum (or z_y) infinite, and 0 * inf
      // would be NaN where F.cross_entropy's loss is finite
      float loss = 0.0f;
      if (y != p.ignore_index) {
        if (eps < 1.0f) loss = (1.0f - eps) * (lse - cap(to_float(z[y])));
        if (eps > 0.0f) loss += eps * (lse - zsum / static_cast<float>(V));
      }
      p.loss[r] = loss;
    }
  });
}

template <typename T>
void grad_rows(const CeGradParams& p) {
  const int64_t C = p.cols;
  const float eps_v = p.label_smoothing / static_cast<float>(p.vocab), on = 1.0f - p.label_smoothing;
  const Cap cap(p.softcap);
  const bool capped = p.softcap > 0;
  parallel_for(0, p.rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* g = static_cast<T*>(p.logits) + r * p.ld;
      const int64_t y = p.labels[r];
      const float s = y == p.ignore_index ? 0.0f : p.grad_scale[r * p.grad_scale_stride];
      const float lse = p.lse[r];
      const int64_t yl = y - p.col0;  // the label's column in this block, if there
      const float zy = (yl >= 0 && yl < C) ? cap(to_float(g[yl])) : 0.0f;
      int64_t j = 0;
      if (s == 0.0f) {
        const Vec zero = Vec::zero();
        for (; j + W <= C; j += W) zero.store(g + j);
        for (; j < C; ++j) g[j] = from_float<T>(0.0f);
        continue;
      }
      const Vec vs = Vec::set1(s), vl = Vec::set1(lse), veps = Vec::set1(eps_v), one = Vec::set1(1.0f),
                vinv = Vec::set1(cap.inv);
      for (; j + W <= C; j += W) {
        Vec v = cap(Vec::load(g + j));
        Vec d = exp(v - vl) - veps;
        if (capped) {
          Vec t = v * vinv;
          d = d * (one - t * t);
        }
        (d * vs).store(g + j);
      }
      auto grad_at = [&](float z, bool is_y) {
        float d = std::exp(z - lse) - eps_v - (is_y ? on : 0.0f);
        if (capped) d *= 1.0f - (z * cap.inv) * (z * cap.inv);
        return s * d;
      };
      for (; j < C; ++j) g[j] = from_float<T>(grad_at(cap(to_float(g[j])), false));
      if (yl >= 0 && yl < C) g[yl] = from_float<T>(grad_at(zy, true));  // from the saved z_y
    }
  });
}

}  // namespace

void ce_fwd(const CeFwdParams& p) {
  switch (p.dtype) {
    case DType::f32: return fwd_rows<float>(p);
    case DType::bf16: return fwd_rows<bf16_t>(p);
    case DType::f16: return fwd_rows<f16_t>(p);
  }
}

void ce_grad(const CeGradParams& p) {
  switch (p.dtype) {
    case DType::f32: return grad_rows<float>(p);
    case DType::bf16: return grad_rows<bf16_t>(p);
    case DType::f16: return grad_rows<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
