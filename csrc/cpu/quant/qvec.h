// Quantization helpers on top of csrc/cpu/vec.h, one definition per ISA level (include only
// from csrc/cpu/quant/*_kernel.cpp).
//
//   nibbles(p, lo, hi)   Vec::W bytes at p -> floats of their low and high nibbles
//   load_i8f(p)          Vec::W int8 at p -> floats
//   IVec                 IVec::W int32 lanes; "pair form" = 2 * IVec::W int16 (two per lane):
//     IVec::load_i16(p)  2W int16;  IVec::widen_i8(p) 2W int8 widened to int16;  IVec::bcast_pair(p) p[0..1] in every lane
//     madd_add(acc, a, b)  acc + per-lane (a.lo * b.lo + a.hi * b.hi), exact in int32 (VNNI vpdpwssd where present)
//     reduce_add()       sum of the lanes
//   transpose16(r)       (AVX-512) 16 x 16 int32 transpose in registers, for packing weight panels
//   load_vec_any(p, i, n, dt)  n floats from a float32 / bf16 / f16 array
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/isa_macros.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {

#if defined(THRIFTY_AVX512)
THRIFTY_INLINE void nibbles(const uint8_t* p, Vec& lo, Vec& hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
THRIFTY_INLINE Vec load_i8f(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
struct IVec {
  static constexpr int W = 16;
  __m512i v;
  THRIFTY_INLINE IVec() = default;
  THRIFTY_INLINE IVec(__m512i x) : v(x) {}
  THRIFTY_INLINE static IVec zero() { return _mm512_setzero_si512(); }
  THRIFTY_INLINE static IVec load(const int32_t* p) { return _mm512_loadu_si512(p); }
  THRIFTY_INLINE void store(int32_t* p) const { _mm512_storeu_si512(p, v); }
  THRIFTY_INLINE static IVec load_i16(const int16_t* p) { return _mm512_loadu_si512(p); }
  THRIFTY_INLINE static IVec widen_i8(const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  THRIFTY_INLINE static IVec bcast_pair(const int16_t* p) {
    int32_t u;
    std::memcpy(&u, p, 4);
    return _mm512_set1_epi32(u);
  }
  THRIFTY_INLINE friend IVec operator+(IVec a, IVec b) { return _mm512_add_epi32(a.v, b.v); }
  THRIFTY_INLINE friend IVec madd_add(IVec acc, IVec a, IVec b) {
#if defined(THRIFTY_AVX512_VNNI)
    return _mm512_dpwssd_epi32(acc.v, a.v, b.v);
#else
    return _mm512_add_epi32(acc.v, _mm512_madd_epi16(a.v, b.v));
#endif
  }
  THRIFTY_INLINE int32_t reduce_add() const { return _mm512_reduce_add_epi32(v); }
};

// 16 x 16 int32 transpose in registers: r[i][c] -> r[c][i].
THRIFTY_INLINE void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16], v[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      v[8 * h + i] = _mm512_shuffle_i32x4(u[8 * h + i], u[8 * h + 4 + i], 0x88);
      v[8 * h + 4 + i] = _mm512_shuffle_i32x4(u[8 * h + i], u[8 * h + 4 + i], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(v[i], v[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(v[i], v[8 + i], 0xdd);
  }
}

#elif defined(__AVX2__)
THRIFTY_INLINE void nibbles(const uint8_t* p, Vec& lo, Vec& hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
THRIFTY_INLINE Vec load_i8f(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
struct IVec {
  static constexpr int W = 8;
  __m256i v;
  THRIFTY_INLINE IVec() = default;
  THRIFTY_INLINE IVec(__m256i x) : v(x) {}
  THRIFTY_INLINE static IVec zero() { return _mm256_setzero_si256(); }
  THRIFTY_INLINE static IVec load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  THRIFTY_INLINE void store(int32_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  THRIFTY_INLINE static IVec load_i16(const int16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  THRIFTY_INLINE static IVec widen_i8(const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  THRIFTY_INLINE static IVec bcast_pair(const int16_t* p) {
    int32_t u;
    std::memcpy(&u, p, 4);
    return _mm256_set1_epi32(u);
  }
  THRIFTY_INLINE friend IVec operator+(IVec a, IVec b) { return _mm256_add_epi32(a.v, b.v); }
  THRIFTY_INLINE friend IVec madd_add(IVec acc, IVec a, IVec b) {
    return _mm256_add_epi32(acc.v, _mm256_madd_epi16(a.v, b.v));
  }
  THRIFTY_INLINE int32_t reduce_add() const {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }
};

#else
THRIFTY_INLINE void nibbles(const uint8_t* p, Vec& lo, Vec& hi) {
  lo = static_cast<float>(p[0] & 15);
  hi = static_cast<float>(p[0] >> 4);
}
THRIFTY_INLINE Vec load_i8f(const int8_t* p) { return static_cast<float>(p[0]); }
struct IVec {
  static constexpr int W = 1;
  int32_t a = 0, b = 0;  // accumulators use a; pair form uses (a, b)
  THRIFTY_INLINE static IVec zero() { return IVec{}; }
  THRIFTY_INLINE static IVec load(const int32_t* p) { IVec r; r.a = p[0]; return r; }
  THRIFTY_INLINE void store(int32_t* p) const { p[0] = a; }
  THRIFTY_INLINE static IVec load_i16(const int16_t* p) { IVec r; r.a = p[0]; r.b = p[1]; return r; }
  THRIFTY_INLINE static IVec widen_i8(const int8_t* p) { IVec r; r.a = p[0]; r.b = p[1]; return r; }
  THRIFTY_INLINE static IVec bcast_pair(const int16_t* p) { return load_i16(p); }
  THRIFTY_INLINE friend IVec operator+(IVec x, IVec y) { IVec r; r.a = x.a + y.a; return r; }
  THRIFTY_INLINE friend IVec madd_add(IVec acc, IVec x, IVec y) {
    IVec r;
    r.a = acc.a + x.a * y.a + x.b * y.b;
    return r;
  }
  THRIFTY_INLINE int32_t reduce_add() const { return a; }
};
#endif

// n <= Vec::W elements at p + i of a float32 / bf16 / f16 array, as floats (bias vectors of any dtype).
THRIFTY_INLINE Vec load_vec_any(const void* p, int64_t i, int n, DType dt) {
  switch (dt) {
    case DType::f32: return Vec::load(static_cast<const float*>(p) + i, n);
    case DType::bf16: return Vec::load(static_cast<const bf16_t*>(p) + i, n);
    default: return Vec::load(static_cast<const f16_t*>(p) + i, n);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
