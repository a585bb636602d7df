// Rotary position embedding on the CPU; compiled once per ISA level.
//
// For each token t with angle row cos_sin[positions[t]] = [c_0..c_{h-1} | s_0..s_{h-1}]
// (h = rot_dim / 2) and each head of q and k, pairs (x1, x2) rotate by the angle:
//   neox    (interleaved=false): x1 = x[i],  x2 = x[i + h]
//   GPT-J   (interleaved=true):  x1 = x[2i], x2 = x[2i + 1]
//   x1' = x1 * c_i - x2 * s_i;   x2' = x2 * c_i + x1 * s_i      (s_i negated when inverse)
// computed in float32 and rounded once; features [rot_dim, head_dim) are copied.
// Memory traffic: one read of q and k, one write of the outputs, one cache row per token.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/parallel.h"
#include "cpu/isa_macros.h"
#include "cpu/rotary/rotary_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

#if defined(THRIFTY_AVX512)
// [p0, p0, p1, p1, ...]: the first W/2 floats of p (n of them, n <= W/2) each doubled.
THRIFTY_INLINE Vec load_dup_pairs(const float* p, int n) {
  __m256 h = n >= W / 2 ? _mm256_loadu_ps(p) : _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1u), p);
  const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(h));
}
// [x1, x0, x3, x2, ...]
THRIFTY_INLINE Vec swap_pairs(Vec x) { return _mm512_permute_ps(x.v, 0xB1); }
#elif defined(__AVX2__)
THRIFTY_INLINE Vec load_dup_pairs(const float* p, int n) {
  __m128 h = n >= W / 2 ? _mm_loadu_ps(p)
                        : _mm_maskload_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)));
  const __m256i idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(h), idx);
}
THRIFTY_INLINE Vec swap_pairs(Vec x) { return _mm256_permute_ps(x.v, 0xB1); }
#endif

// One head: neox half-split rotation of x (h pairs) into y.
// n pairs starting at x; the partner of x[i] is x[i + half] (half = h for a whole head).
template <typename T>
THRIFTY_INLINE void rotate_neox(const T* x, T* y, const float* c, const float* s, int64_t n, Vec sgn, int64_t half) {
  const int64_t h = half;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec x1 = Vec::load(x + i), x2 = Vec::load(x + h + i);
    Vec cv = Vec::load(c + i), sv = Vec::load(s + i) * sgn;
    (x1 * cv - x2 * sv).store(y + i);
    fma(x1, sv, x2 * cv).store(y + h + i);
  }
  if (i < n) {
    const int m = static_cast<int>(n - i);
    Vec x1 = Vec::load(x + i, m), x2 = Vec::load(x + h + i, m);
    Vec cv = Vec::load(c + i, m), sv = Vec::load(s + i, m) * sgn;
    (x1 * cv - x2 * sv).store(y + i, m);
    fma(x1, sv, x2 * cv).store(y + h + i, m);
  }
}

// bf16 neox heads in pairs (vec.h load_pair: even and odd elements of 2W, no shuffles). The
// token's cos/sin row is rearranged once into that lane order (ce/co, se/so: W floats per
// 2W-chunk each, sin already signed) and reused by every head of the token.
constexpr int64_t kPairMaxHalf = 256;  // h up to this uses the pair path (head_dim <= 512)

struct PairAngles {
  alignas(64) float ce[kPairMaxHalf / 2], co[kPairMaxHalf / 2], se[kPairMaxHalf / 2], so[kPairMaxHalf / 2];
  void fill(const float* c, const float* s, int64_t h, float sign) {
    for (int64_t j = 0; j + 2 * W <= h; j += 2 * W)
      for (int k = 0; k < W; ++k) {
        ce[j / 2 + k] = c[j + 2 * k];
        co[j / 2 + k] = c[j + 2 * k + 1];
        se[j / 2 + k] = s[j + 2 * k] * sign;
        so[j / 2 + k] = s[j + 2 * k + 1] * sign;
      }
  }
};

THRIFTY_INLINE void rotate_neox_pairs(const bf16_t* x, bf16_t* y, const float* c, const float* s,
                                      const PairAngles& a, int64_t h, Vec sgn) {
  int64_t i = 0;
  for (; i + 2 * W <= h; i += 2 * W) {
    Vec x1e, x1o, x2e, x2o;
    load_pair(x + i, x1e, x1o);
    load_pair(x + h + i, x2e, x2o);
    const Vec ce = Vec::load(a.ce + i / 2), co = Vec::load(a.co + i / 2);
    const Vec se = Vec::load(a.se + i / 2), so = Vec::load(a.so + i / 2);
    store_pair(y + i, x1e * ce - x2e * se, x1o * co - x2o * so);
    store_pair(y + h + i, fma(x1e, se, x2e * ce), fma(x1o, so, x2o * co));
  }
  if (i < h) rotate_neox(x + i, y + i, c + i, s + i, h - i, sgn, h);
}

// One head: GPT-J interleaved rotation of x (2h features) into y.
template <typename T>
THRIFTY_INLINE void rotate_gptj(const T* x, T* y, const float* c, const float* s, int64_t h, float sign) {
#if defined(THRIFTY_AVX512) || defined(__AVX2__)
  // y = x * [c0 c0 c1 c1 ..] + swap_pairs(x) * [-s0 s0 -s1 s1 ..]
  alignas(64) float alt[W];
  for (int j = 0; j < W; ++j) alt[j] = (j % 2 == 0 ? -sign : sign);
  const Vec sg = Vec::load(alt);
  const int64_t n = 2 * h;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec xv = Vec::load(x + i);
    Vec cv = load_dup_pairs(c + i / 2, W / 2), sv = load_dup_pairs(s + i / 2, W / 2) * sg;
    fma(xv, cv, swap_pairs(xv) * sv).store(y + i);
  }
  if (i < n) {
    const int m = static_cast<int>(n - i);  // even
    Vec xv = Vec::load(x + i, m);
    Vec cv = load_dup_pairs(c + i / 2, m / 2), sv = load_dup_pairs(s + i / 2, m / 2) * sg;
    fma(xv, cv, swap_pairs(xv) * sv).store(y + i, m);
  }
#else
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = to_float(x[2 * i]), x2 = to_float(x[2 * i + 1]);
    const float cv = c[i], sv = s[i] * sign;
    y[2 * i] = from_float<T>(x1 * cv - x2 * sv);
    y[2 * i + 1] = from_float<T>(x2 * cv + x1 * sv);
  }
#endif
}

template <typename T>
void run(const RotaryParams& p) {
  const int64_t h = p.rot_dim / 2, hd = p.head_dim, rest = hd - p.rot_dim;
  const float sign = p.inverse ? -1.0f : 1.0f;
  const Vec sgn = Vec::set1(sign);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  T* qo = static_cast<T*>(p.q_out);
  T* ko = static_cast<T*>(p.k_out);
  const int64_t per_token = (p.q_heads + p.k_heads) * hd;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(per_token, 1));
  const bool use_pairs = std::is_same_v<T, bf16_t> && !p.interleaved && h <= kPairMaxHalf;
  parallel_for(0, p.tokens, grain, [&](int64_t b, int64_t e) {
    PairAngles angles;
    for (int64_t t = b; t < e; ++t) {
      const int64_t pos = p.positions_int32 ? static_cast<const int32_t*>(p.positions)[t]
                                            : static_cast<const int64_t*>(p.positions)[t];
      const float* c = p.cos_sin + pos * p.rot_dim;
      const float* s = c + h;
      if (use_pairs) angles.fill(c, s, h, sign);
      auto head = [&](const T* x, T* y) {
        if (p.interleaved)
          rotate_gptj(x, y, c, s, h, sign);
        else if constexpr (std::is_same_v<T, bf16_t>) {
          if (use_pairs)
            rotate_neox_pairs(x, y, c, s, angles, h, sgn);
          else
            rotate_neox(x, y, c, s, h, sgn, h);
        } else
          rotate_neox(x, y, c, s, h, sgn, h);
        if (rest > 0) std::memcpy(y + p.rot_dim, x + p.rot_dim, rest * sizeof(T));
      };
      for (int64_t hh = 0; hh < p.q_heads; ++hh)
        head(q + t * p.q_tok_stride + hh * p.q_head_stride, qo + (t * p.q_heads + hh) * hd);
      for (int64_t hh = 0; hh < p.k_heads; ++hh)
        head(k + t * p.k_tok_stride + hh * p.k_head_stride, ko + (t * p.k_heads + hh) * hd);
    }
  });
}

}  // namespace

void rotary_embedding_fwd(const RotaryParams& p) {
  switch (p.dtype) {
    case DType::f32: return run<float>(p);
    case DType::bf16: return run<bf16_t>(p);
    case DType::f16: return run<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
