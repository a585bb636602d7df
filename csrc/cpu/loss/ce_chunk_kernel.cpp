// Fused softmax cross-entropy over a chunk of logit rows (CPU), compiled once per ISA level.
// Used by linear_cross_entropy after each chunk's logits matmul (see common/loss_glue.h).
//
// Per row, with z the logits (capped: z = c * tanh(x / c) when softcap c > 0), y the label,
// eps the label smoothing and V the vocab:
//   lse  = log sum_j exp(z_j)                       (max-shifted, float32)
//   loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j)      (0 for ignored rows)
//   d loss / d z_j = softmax_j - eps / V - (1 - eps) [j == y]
//   d loss / d x_j = d loss / d z_j * (1 - (z_j / c)^2)            (with softcap)
// With grad_scale, the row is overwritten in place with grad_scale_i * d loss_i / d x.
// Three sweeps over the row (max and sum z; sum exp; gradient): the row (vocab x 2-4 bytes)
// stays in L2 between them, so memory traffic is one read of the logits and one write.
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

template <typename T>
void ce_rows(const CeChunkParams& p) {
  const int64_t V = p.vocab;
  const float cap = p.softcap, inv_cap = cap > 0 ? 1.0f / cap : 0.0f, eps = p.label_smoothing;
  parallel_for(0, p.rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* z = static_cast<T*>(p.logits) + r * p.ld;
      const int64_t y = p.labels[r];
      const bool ignored = y == p.ignore_index;
      // sweep 1: cap in place (rounded to T, as an unfused softcap would be), max, sum z
      Vec vmax = Vec::set1(-INFINITY), vsum = Vec::zero();
      float smax = -INFINITY, ssum = 0.0f;
      int64_t j = 0;
      if (cap > 0) {
        const Vec vc = Vec::set1(cap), vic = Vec::set1(inv_cap);
        for (; j + W <= V; j += W) {
          (vc * tanh_vec(Vec::load(z + j) * vic)).store(z + j);
          Vec v = Vec::load(z + j);
          vmax = max(vmax, v);
          vsum = vsum + v;
        }
        for (; j < V; ++j) {
          z[j] = from_float<T>(cap * std::tanh(to_float(z[j]) * inv_cap));
          const float v = to_float(z[j]);
          smax = std::fmax(smax, v);
          ssum += v;
        }
      } else {
        for (; j + W <= V; j += W) {
          Vec v = Vec::load(z + j);
          vmax = max(vmax, v);
          vsum = vsum + v;
        }
        for (; j < V; ++j) {
          const float v = to_float(z[j]);
          smax = std::fmax(smax, v);
          ssum += v;
        }
      }
      const float m = std::fmax(vmax.reduce_max(), smax);
      const float zsum = vsum.reduce_add() + ssum;
      // sweep 2: sum exp(z - m)
      const Vec vm = Vec::set1(m);
      Vec a0 = Vec::zero(), a1 = Vec::zero();
      j = 0;
      for (; j + 2 * W <= V; j += 2 * W) {
        a0 = a0 + exp(Vec::load(z + j) - vm);
        a1 = a1 + exp(Vec::load(z + j + W) - vm);
      }
      for (; j + W <= V; j += W) a0 = a0 + exp(Vec::load(z + j) - vm);
      float se = 0.0f;
      for (; j < V; ++j) se += std::exp(to_float(z[j]) - m);
      const float lse = m + std::log((a0 + a1).reduce_add() + se);
      p.lse[r] = lse;
      p.loss[r] = ignored ? 0.0f
                          : (1.0f - eps) * (lse - to_float(z[y])) + eps * (lse - zsum / static_cast<float>(V));
      if (p.grad_scale == nullptr) continue;
      // sweep 3: gradient in place
      const float s = ignored ? 0.0f : p.grad_scale[r * p.grad_scale_stride];
      T* g = z;
      const float zy = ignored ? 0.0f : to_float(z[y]);
      const Vec vs = Vec::set1(s), vl = Vec::set1(lse), veps = Vec::set1(eps / static_cast<float>(V));
      const Vec vic = Vec::set1(inv_cap), one = Vec::set1(1.0f);
      auto grad_at = [&](float zj, bool is_y) {
        float d = std::exp(zj - lse) - eps / static_cast<float>(V) - (is_y ? 1.0f - eps : 0.0f);
        if (cap > 0) d *= 1.0f - (zj * inv_cap) * (zj * inv_cap);
        return s * d;
      };
      j = 0;
      if (s == 0.0f) {
        const Vec zero = Vec::zero();
        for (; j + W <= V; j += W) zero.store(g + j);
        for (; j < V; ++j) g[j] = from_float<T>(0.0f);
        continue;
      }
      for (; j + W <= V; j += W) {
        Vec v = Vec::load(z + j);
        Vec d = exp(v - vl) - veps;
        if (cap > 0) {
          Vec t = v * vic;
          d = d * (one - t * t);
        }
        (d * vs).store(g + j);
      }
      for (; j < V; ++j) g[j] = from_float<T>(grad_at(to_float(z[j]), false));
      if (!ignored) g[y] = from_float<T>(grad_at(zy, true));  // the label's entry, from the saved z_y
    }
  });
}

}  // namespace

void ce_chunk(const CeChunkParams& p) {
  switch (p.dtype) {
    case DType::f32: return ce_rows<float>(p);
    case DType::bf16: return ce_rows<bf16_t>(p);
    case DType::f16: return ce_rows<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
