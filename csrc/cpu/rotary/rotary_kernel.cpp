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

#include "common/parallel.h"
#include "cpu/rotary/rotary_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

#if defined(__AVX512F__)
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
template <typename T>
THRIFTY_INLINE void rotate_neox(const T* x, T* y, const float* c, const float* s, int64_t h, Vec sgn) {
  int64_t i = 0;
  for (; i + W <= h; i += W) {
    Vec x1 = Vec::load(x + i), x2 = Vec::load(x + h + i);
    Vec cv = Vec::load(c + i), sv = Vec::load(s + i) * sgn;
    (x1 * cv - x2 * sv).store(y + i);
    fma(x1, sv, x2 * cv).store(y + h + i);
  }
  if (i < h) {
    const int m = static_cast<int>(h - i);
    Vec x1 = Vec::load(x + i, m), x2 = Vec::load(x + h + i, m);
    Vec cv = Vec::load(c + i, m), sv = Vec::load(s + i, m) * sgn;
    (x1 * cv - x2 * sv).store(y + i, m);
    fma(x1, sv, x2 * cv).store(y + h + i, m);
  }
}

// One head: GPT-J interleaved rotation of x (2h features) into y.
template <typename T>
THRIFTY_INLINE void rotate_gptj(const T* x, T* y, const float* c, const float* s, int64_t h, float sign) {
#if defined(__AVX512F__) || defined(__AVX2__)
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
  parallel_for(0, p.tokens, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t pos = p.positions_int32 ? static_cast<const int32_t*>(p.positions)[t]
                                            : static_cast<const int64_t*>(p.positions)[t];
      const float* c = p.cos_sin + pos * p.rot_dim;
      const float* s = c + h;
      auto head = [&](const T* x, T* y) {
        if (p.interleaved)
          rotate_gptj(x, y, c, s, h, sign);
        else
          rotate_neox(x, y, c, s, h, sgn);
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
