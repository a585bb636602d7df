// A small float vector type for the CPU kernel cores, one definition per ISA level.
//
// Include only from csrc/cpu/**/*_kernel.cpp (compiled once per level with that level's
// -m flags and THRIFTY_ISA_NS defined); everything here lands in
// thrifty::cpu::THRIFTY_ISA_NS so no two levels share a symbol.
//
//   Vec::W                      lanes (16 on AVX-512, 8 on AVX2, 1 scalar)
//   Vec::load(p) / store(p)     from/to float, bf16_t, f16_t (16-bit types widen to float)
//   Vec::load(p, n)/store(p, n) the first n < W lanes (tails); other lanes load as 0
//   + - * / fma max min, reduce_add, reduce_max, exp, sigmoid
//   Vec::stream(p), stream_fence()  streaming (non-temporal) full-vector stores
//   load_pair/store_pair(bf16_t*)   2W bf16 as (even, odd) lanes without shuffles
// Rounding to bf16 is round-to-nearest-even with NaN kept NaN; f16 uses F16C (hardware
// RNE) where the level has it.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "cpu/isa_macros.h"  // THRIFTY_AVX512*: the compiler's __AVX512*__, or emulated

#if defined(__AVX2__) || defined(THRIFTY_AVX512)
#include <immintrin.h>
#endif

#ifndef THRIFTY_ISA_NS
#error "csrc/cpu/vec.h is for kernel cores compiled per ISA level (THRIFTY_ISA_NS undefined)"
#endif

#define THRIFTY_INLINE inline __attribute__((always_inline))

namespace thrifty::cpu::THRIFTY_ISA_NS {

// ---- scalar conversions (all levels) ----
THRIFTY_INLINE float to_float(float x) { return x; }
THRIFTY_INLINE float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
THRIFTY_INLINE float to_float(f16_t h) {
  // IEEE half -> float, subnormals and inf/NaN included.
  uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1f;
  uint32_t man = h.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
THRIFTY_INLINE T from_float(float x);
template <>
THRIFTY_INLINE float from_float<float>(float x) {
  return x;
}
template <>
THRIFTY_INLINE bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <>
THRIFTY_INLINE f16_t from_float<f16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {                                                     // subnormal or zero in half
    // Add 0.5 in float so the FPU rounds the mantissa for us (RNE).
    float f;
    std::memcpy(&f, &a, 4);
    f += 0.5f;
    uint32_t v;
    std::memcpy(&v, &f, 4);
    return f16_t{static_cast<uint16_t>(sign | (v - 0x3f000000u))};
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return f16_t{static_cast<uint16_t>(sign | (a >> 13))};
}

// Polynomial exp on [-ln2/2, ln2/2] after range reduction (Cephes coefficients), ~1 ulp.
THRIFTY_INLINE float exp_scalar(float x) { return std::exp(x); }

#if defined(THRIFTY_AVX512)
// ======================= AVX-512: 16 float lanes =======================
struct Vec {
  static constexpr int W = 16;
  __m512 v;
  THRIFTY_INLINE Vec() = default;
  THRIFTY_INLINE Vec(__m512 x) : v(x) {}
  THRIFTY_INLINE static Vec set1(float x) { return _mm512_set1_ps(x); }
  THRIFTY_INLINE static Vec zero() { return _mm512_setzero_ps(); }
  THRIFTY_INLINE static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

  THRIFTY_INLINE static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  THRIFTY_INLINE static Vec load(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  THRIFTY_INLINE static Vec widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  THRIFTY_INLINE static Vec load(const bf16_t* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
  THRIFTY_INLINE static Vec load(const bf16_t* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  THRIFTY_INLINE static Vec load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  THRIFTY_INLINE static Vec load(const f16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }

  THRIFTY_INLINE __m256i to_bf16_bits() const {
#if defined(THRIFTY_AVX512_BF16)
    // VCVTNEPS2BF16 treats denormal inputs as zero whatever MXCSR says (Intel SDM), where the
    // rule above, the other levels and torch round them to bf16 denormals: a vector holding a
    // denormal (fpclass 0x20; rare) takes the integer rounding below instead.
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  }
  THRIFTY_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }
  THRIFTY_INLINE void store(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  THRIFTY_INLINE void store(bf16_t* p) const { _mm256_storeu_si256((__m256i*)p, to_bf16_bits()); }
  THRIFTY_INLINE void store(bf16_t* p, int n) const { _mm256_mask_storeu_epi16(p, mask(n), to_bf16_bits()); }
  THRIFTY_INLINE void store(f16_t* p) const {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  THRIFTY_INLINE void store(f16_t* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Non-temporal (streaming) stores: p aligned to the stored width (64 B for float, 32 B for 16-bit).
  THRIFTY_INLINE void stream(float* p) const { _mm512_stream_ps(p, v); }
  THRIFTY_INLINE void stream(bf16_t* p) const { _mm256_stream_si256((__m256i*)p, to_bf16_bits()); }
  THRIFTY_INLINE void stream(f16_t* p) const {
    _mm256_stream_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  THRIFTY_INLINE friend Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }  // a*b+c
  THRIFTY_INLINE friend Vec max(Vec a, Vec b) { return _mm512_max_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec min(Vec a, Vec b) { return _mm512_min_ps(a.v, b.v); }
  THRIFTY_INLINE float reduce_add() const { return _mm512_reduce_add_ps(v); }
  THRIFTY_INLINE float reduce_max() const { return _mm512_reduce_max_ps(v); }
};

THRIFTY_INLINE Vec exp(Vec x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2; degree-6 polynomial for exp(r).
  const __m512 hi = _mm512_set1_ps(88.3762626647949f), lo = _mm512_set1_ps(-88.3762626647949f);
  __m512 xc = _mm512_min_ps(_mm512_max_ps(x.v, lo), hi);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  // scalef computes p * 2^n without integer exponent tricks (handles n = 128 too).
  __m512 y = _mm512_scalef_ps(p, n);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, lo, _CMP_LT_OQ), y, _mm512_setzero_ps());  // underflow, -inf
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, hi, _CMP_GT_OQ), y, _mm512_set1_ps(INFINITY));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), y, x.v);  // NaN stays NaN
}

// sigmoid(x) = 1 / (1 + exp(-x)) (and 1 - that) for activations; the AVX2 version below says why it
// is written this way (latency-bound: -x folded into constants, Estrin polynomial, one division).
// x is clamped to +-104, where VSCALEFPS takes exp(-x) to inf (x < -88.7: s = 1 / inf = 0) or 0
// (x > 103: 1 - s = 0), so the saturated side is exactly 0, as silu(g) = g s needs for huge |g|; then
// 1 - s = t s is inf * 0 = NaN, which the min turns into 1. NaN propagates in s (min/max return their
// second operand on NaN); 1 - s reads 1 for a NaN x, s itself is NaN.
THRIFTY_INLINE Vec sigmoid(Vec x, Vec& one_minus_s) {
  __m512 xc = _mm512_min_ps(_mm512_set1_ps(104.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x.v));
  // t = exp(-x) = 2^n exp(r), n = round(-x / ln2), r = -x - n ln2 (two-constant ln2)
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(-1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // exp(r) = 1 + r + r^2 (c2 + c3 r + r^2 (c4 + c5 r + c6 r^2))
  __m512 r2 = _mm512_mul_ps(r, r);
  __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(1.6666665459e-1f), r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 b = _mm512_fmadd_ps(_mm512_set1_ps(8.3334519073e-3f), r, _mm512_set1_ps(4.1665795894e-2f));
  __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  __m512 q = _mm512_fmadd_ps(_mm512_fmadd_ps(c, r2, b), r2, a);
  __m512 p = _mm512_fmadd_ps(q, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 t = _mm512_scalef_ps(p, n);  // exp(-x): inf or 0 past +-88.7 / 103
  __m512 e = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(t, _mm512_set1_ps(1.0f)));
  one_minus_s = _mm512_min_ps(_mm512_mul_ps(t, e), _mm512_set1_ps(1.0f));
  return e;
}

// bf16 in pairs: 2W consecutive bf16 values as two float vectors, `even` holding elements
// 0, 2, 4, ... and `odd` elements 1, 3, 5, ...: widening and rounding stay inside 32-bit lanes
// (no cross-lane shuffles), for elementwise maths whose lane order does not matter.
THRIFTY_INLINE void load_pair(const bf16_t* p, Vec& even, Vec& odd) {
  __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// float -> bf16 bits in the high half of each lane (round to nearest even, NaN kept NaN).
THRIFTY_INLINE __m512i bf16_high(Vec a) {
  __m512i u = _mm512_castps_si512(a.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), r,
                                 _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}
THRIFTY_INLINE __m512i pack_pair(Vec even, Vec odd) {
  return _mm512_or_si512(_mm512_srli_epi32(bf16_high(even), 16),
                         _mm512_and_si512(bf16_high(odd), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
THRIFTY_INLINE void store_pair(bf16_t* p, Vec even, Vec odd) { _mm512_storeu_si512(p, pack_pair(even, odd)); }
THRIFTY_INLINE void stream_pair(bf16_t* p, Vec even, Vec odd) { _mm512_stream_si512((__m512i*)p, pack_pair(even, odd)); }

#elif defined(__AVX2__)
// ======================= AVX2 + FMA + F16C: 8 float lanes =======================
struct Vec {
  static constexpr int W = 8;
  __m256 v;
  THRIFTY_INLINE Vec() = default;
  THRIFTY_INLINE Vec(__m256 x) : v(x) {}
  THRIFTY_INLINE static Vec set1(float x) { return _mm256_set1_ps(x); }
  THRIFTY_INLINE static Vec zero() { return _mm256_setzero_ps(); }
  THRIFTY_INLINE static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }

  THRIFTY_INLINE static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  THRIFTY_INLINE static Vec load(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  THRIFTY_INLINE static Vec widen_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  THRIFTY_INLINE static __m128i load_partial16(const uint16_t* p, int n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    return _mm_load_si128((const __m128i*)buf);
  }
  THRIFTY_INLINE static Vec load(const bf16_t* p) { return widen_bf16(_mm_loadu_si128((const __m128i*)p)); }
  THRIFTY_INLINE static Vec load(const bf16_t* p, int n) { return widen_bf16(load_partial16(&p->bits, n)); }
  THRIFTY_INLINE static Vec load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  THRIFTY_INLINE static Vec load(const f16_t* p, int n) { return _mm256_cvtph_ps(load_partial16(&p->bits, n)); }

  THRIFTY_INLINE __m128i to_bf16_bits() const {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    // pack 8 x u32 (each <= 0xffff) to 8 x u16 across the two 128-bit lanes
    __m256i packed = _mm256_packus_epi32(r, r);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  THRIFTY_INLINE static void store_partial16(uint16_t* p, __m128i h, int n) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128((__m128i*)buf, h);
    for (int i = 0; i < n; ++i) p[i] = buf[i];
  }
  THRIFTY_INLINE void store(float* p) const { _mm256_storeu_ps(p, v); }
  THRIFTY_INLINE void store(float* p, int n) const { _mm256_maskstore_ps(p, mask(n), v); }
  THRIFTY_INLINE void store(bf16_t* p) const { _mm_storeu_si128((__m128i*)p, to_bf16_bits()); }
  THRIFTY_INLINE void store(bf16_t* p, int n) const { store_partial16(&p->bits, to_bf16_bits(), n); }
  THRIFTY_INLINE __m128i to_f16_bits() const { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  THRIFTY_INLINE void store(f16_t* p) const { _mm_storeu_si128((__m128i*)p, to_f16_bits()); }
  THRIFTY_INLINE void store(f16_t* p, int n) const { store_partial16(&p->bits, to_f16_bits(), n); }
  // Non-temporal (streaming) stores: p aligned to the stored width (32 B for float, 16 B for 16-bit).
  THRIFTY_INLINE void stream(float* p) const { _mm256_stream_ps(p, v); }
  THRIFTY_INLINE void stream(bf16_t* p) const { _mm_stream_si128((__m128i*)p, to_bf16_bits()); }
  THRIFTY_INLINE void stream(f16_t* p) const { _mm_stream_si128((__m128i*)p, to_f16_bits()); }

  THRIFTY_INLINE friend Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  THRIFTY_INLINE friend Vec max(Vec a, Vec b) { return _mm256_max_ps(a.v, b.v); }
  THRIFTY_INLINE friend Vec min(Vec a, Vec b) { return _mm256_min_ps(a.v, b.v); }
  THRIFTY_INLINE float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  THRIFTY_INLINE float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

THRIFTY_INLINE Vec exp(Vec x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447505531f);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x.v, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n split in two factors so n = 128 (x near the top of the range) does not overflow the exponent field.
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x.v, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x.v, _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
}

// sigmoid(x) = 1 / (1 + exp(-x)) (and 1 - that) for activations. x is clamped to +-87 (sigmoid has
// saturated there; the saturated side is set to 0 beyond) so 2^n is a single exponent field. Written for a short dependency chain: at
// ~27 vector ops per element the loop is bound by latency over the out-of-order window, not by
// throughput, so -x is folded into the constants, the polynomial is evaluated Estrin-style
// (3 dependent FMAs instead of 6) and 1/(1+t) is one division (shorter than rcp + Newton, and
// exact). NaN propagates (min/max return their second operand on NaN).
THRIFTY_INLINE Vec sigmoid(Vec x, Vec& one_minus_s) {
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(87.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x.v));
  // t = exp(-x) = 2^n exp(r), n = round(-x / ln2), r = -x - n ln2 (two-constant ln2)
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(-1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  __m256 r = _mm256_fnmsub_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // exp(r) = 1 + r + r^2 (c2 + c3 r + r^2 (c4 + c5 r + c6 r^2))
  __m256 r2 = _mm256_mul_ps(r, r);
  __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(1.6666665459e-1f), r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(8.3334519073e-3f), r, _mm256_set1_ps(4.1665795894e-2f));
  __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
  __m256 q = _mm256_fmadd_ps(_mm256_fmadd_ps(c, r2, b), r2, a);
  __m256 p = _mm256_fmadd_ps(q, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256 t = _mm256_mul_ps(p, scale);  // exp(-x)
  __m256 e = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(t, _mm256_set1_ps(1.0f)));
  // past the clamp the saturated side is 0, not exp(-87) ~ 1.6e-38: silu(g) = g s must not grow with |g|
  one_minus_s = _mm256_andnot_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(87.0f), _CMP_GT_OQ), _mm256_mul_ps(t, e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), e);
}

// bf16 in pairs: 2W consecutive bf16 values as two float vectors, `even` holding elements
// 0, 2, 4, ... and `odd` elements 1, 3, 5, ...: widening and rounding stay inside 32-bit lanes
// (no cross-lane shuffles), for elementwise maths whose lane order does not matter.
THRIFTY_INLINE void load_pair(const bf16_t* p, Vec& even, Vec& odd) {
  __m256i v = _mm256_loadu_si256((const __m256i*)p);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
// float -> bf16 bits in the high half of each lane (round to nearest even, NaN kept NaN).
THRIFTY_INLINE __m256i bf16_high(Vec a) {
  __m256i u = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}
THRIFTY_INLINE __m256i pack_pair(Vec even, Vec odd) {
  return _mm256_or_si256(_mm256_srli_epi32(bf16_high(even), 16),
                         _mm256_and_si256(bf16_high(odd), _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
THRIFTY_INLINE void store_pair(bf16_t* p, Vec even, Vec odd) { _mm256_storeu_si256((__m256i*)p, pack_pair(even, odd)); }
THRIFTY_INLINE void stream_pair(bf16_t* p, Vec even, Vec odd) { _mm256_stream_si256((__m256i*)p, pack_pair(even, odd)); }

#else
// ======================= portable: 1 lane =======================
struct Vec {
  static constexpr int W = 1;
  float v;
  THRIFTY_INLINE Vec() = default;
  THRIFTY_INLINE Vec(float x) : v(x) {}
  THRIFTY_INLINE static Vec set1(float x) { return x; }
  THRIFTY_INLINE static Vec zero() { return 0.0f; }
  template <typename T>
  THRIFTY_INLINE static Vec load(const T* p) { return to_float(*p); }
  template <typename T>
  THRIFTY_INLINE static Vec load(const T* p, int n) { return n > 0 ? to_float(*p) : 0.0f; }
  template <typename T>
  THRIFTY_INLINE void store(T* p) const { *p = from_float<T>(v); }
  template <typename T>
  THRIFTY_INLINE void store(T* p, int n) const {
    if (n > 0) *p = from_float<T>(v);
  }
  template <typename T>
  THRIFTY_INLINE void stream(T* p) const { *p = from_float<T>(v); }
  THRIFTY_INLINE friend Vec operator+(Vec a, Vec b) { return a.v + b.v; }
  THRIFTY_INLINE friend Vec operator-(Vec a, Vec b) { return a.v - b.v; }
  THRIFTY_INLINE friend Vec operator*(Vec a, Vec b) { return a.v * b.v; }
  THRIFTY_INLINE friend Vec operator/(Vec a, Vec b) { return a.v / b.v; }
  THRIFTY_INLINE friend Vec fma(Vec a, Vec b, Vec c) { return std::fma(a.v, b.v, c.v); }
  THRIFTY_INLINE friend Vec max(Vec a, Vec b) { return a.v > b.v ? a.v : b.v; }
  THRIFTY_INLINE friend Vec min(Vec a, Vec b) { return a.v < b.v ? a.v : b.v; }
  THRIFTY_INLINE float reduce_add() const { return v; }
  THRIFTY_INLINE float reduce_max() const { return v; }
};
THRIFTY_INLINE Vec exp(Vec x) { return std::exp(x.v); }
// sigmoid(x) = 1 / (1 + exp(-x)); exp saturates to inf for x << 0, giving exactly 0.
THRIFTY_INLINE Vec sigmoid(Vec x, Vec& one_minus_s) {
  one_minus_s = 1.0f / (1.0f + std::exp(x.v));
  return 1.0f / (1.0f + std::exp(-x.v));
}
// bf16 pairs (see the AVX2 level): here simply two consecutive elements.
THRIFTY_INLINE void load_pair(const bf16_t* p, Vec& even, Vec& odd) {
  even = to_float(p[0]);
  odd = to_float(p[1]);
}
THRIFTY_INLINE void store_pair(bf16_t* p, Vec even, Vec odd) {
  p[0] = from_float<bf16_t>(even.v);
  p[1] = from_float<bf16_t>(odd.v);
}
THRIFTY_INLINE void stream_pair(bf16_t* p, Vec even, Vec odd) { store_pair(p, even, odd); }
#endif

// sigmoid(x) alone. sigmoid(x, one_minus_s) also gives 1 - sigmoid(x) = sigmoid(-x) to full
// relative accuracy (1 - s would cancel for large x, where silu' = s + x s (1 - s) needs it).
THRIFTY_INLINE Vec sigmoid(Vec x) {
  Vec unused;
  return sigmoid(x, unused);
}

// Orders the streaming stores of this thread before what follows (end of a parallel chunk).
#if defined(__AVX2__) || defined(THRIFTY_AVX512)
THRIFTY_INLINE void stream_fence() { _mm_sfence(); }
#else
THRIFTY_INLINE void stream_fence() {}
#endif

// One full-vector store, streaming or not by a compile-time switch (kernels that stream only
// outputs too large for the cache instantiate both).
template <bool kStream, typename T>
THRIFTY_INLINE void put(Vec v, T* p) {
  if constexpr (kStream)
    v.stream(p);
  else
    v.store(p);
}

// Elements of T before p reaches the alignment of a streaming store of `bytes` (by default a
// full vector of T: W * sizeof(T); a bf16 pair needs 2 * W * 2).
template <typename T>
THRIFTY_INLINE int stream_head(const T* p, int bytes = Vec::W * static_cast<int>(sizeof(T))) {
  const uintptr_t a = static_cast<uintptr_t>(bytes);
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) % a;
  return off == 0 ? 0 : static_cast<int>((a - off) / sizeof(T));
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
