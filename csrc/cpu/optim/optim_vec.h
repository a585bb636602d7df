// Vec helpers the optimizer kernels need beyond csrc/cpu/vec.h (sqrt, abs, sign; the 8-bit state's
// dequantize and quantize table lookups), one definition per ISA level.
#pragma once
#include "common/optim_quant.h"
#include "cpu/isa_macros.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {

// The code of x from the table (rule and entry layout: common/optim_quant.h). Scalar reference of
// the vector versions below, which compute the same integers lane by lane; used for block tails.
THRIFTY_INLINE uint8_t quant_code(const QuantLut& lut, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t low = (1u << lut.shift) - 1u;
  const uint32_t pos = (u & low) ^ ((u >> 31) ? low : 0u);
  const uint32_t e = lut.entry[u >> lut.shift];
  return static_cast<uint8_t>((e >> 24) + (pos > (e & kQNoMid) ? 1u : 0u));
}

#if defined(THRIFTY_AVX512)
THRIFTY_INLINE Vec vsqrt(Vec a) { return _mm512_sqrt_ps(a.v); }
THRIFTY_INLINE Vec vabs(Vec a) { return _mm512_abs_ps(a.v); }
// +1 for x > 0, -1 for x < 0, 0 for zeros (and NaN)
THRIFTY_INLINE Vec vsign(Vec a) {
  __mmask16 pos = _mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_GT_OQ);
  __mmask16 neg = _mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 r = _mm512_mask_blend_ps(pos, _mm512_setzero_ps(), _mm512_set1_ps(1.0f));
  return _mm512_mask_blend_ps(neg, r, _mm512_set1_ps(-1.0f));
}
// W codes -> qmap[code] * scale (one gather from the 256-entry map, L1-resident). AVX-512 keeps the
// hardware gathers (fast on the Intel cores this level mostly runs on; not measured here, unlike
// the AVX2 choice below).
THRIFTY_INLINE Vec dequant8(const uint8_t* codes, const float* qmap, Vec scale) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_mul_ps(_mm512_i32gather_ps(c, qmap, 4), scale.v);
}
// The table's parameters broadcast once per chunk (the loop would reload them: the code stores
// may alias the table as far as the compiler knows).
struct QuantConsts {
  const uint32_t* entry;
  __m128i shift;
  __m512i low;
};
THRIFTY_INLINE QuantConsts quant_consts(const QuantLut& lut) {
  return {lut.entry, _mm_cvtsi32_si128(static_cast<int>(lut.shift)),
          _mm512_set1_epi32(static_cast<int>((1u << lut.shift) - 1u))};
}
// W codes of x (quant_code lane by lane: the same integer ops, one gather of table entries).
THRIFTY_INLINE void quant8_store(const QuantConsts& q, Vec x, uint8_t* out) {
  const __m512i u = _mm512_castps_si512(x.v);
  const __m512i e = _mm512_i32gather_epi32(_mm512_srl_epi32(u, q.shift), q.entry, 4);
  const __m512i pos = _mm512_and_si512(_mm512_xor_si512(u, _mm512_srai_epi32(u, 31)), q.low);
  const __mmask16 up = _mm512_cmpgt_epi32_mask(pos, _mm512_and_si512(e, _mm512_set1_epi32(kQNoMid)));
  __m512i code = _mm512_srli_epi32(e, 24);
  code = _mm512_mask_add_epi32(code, up, code, _mm512_set1_epi32(1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(code));
}
#if defined(THRIFTY_AVX512_BF16)
// Gather-free dequantization where the CPU has AVX512-VBMI (cpu_has_avx512_vbmi(); this level only, so
// the avx512 level keeps testing the gathers on the same machine). A 16-lane gather costs ~20 cycles on
// AMD Zen 4; here the 256-entry float map is split into its 4 byte planes, and 64 codes at a time look
// each plane up with two VPERMI2B (entries 0-127 and 128-255, chosen by the code's top bit), then the
// planes are interleaved back into 64 floats: 1 + 12 + 8 byte ops for 64 values instead of 4 gathers.
// The planes (QuantLut::planes) are built with the map's other tables, once per map, by the CPU glue.
//
// out[0..64) = map[codes[i]] * scale (the same floats and products as dequant8). Not inlined: only this
// function is compiled for VBMI, and its caller runs it only where the CPU has it.
__attribute__((target("avx512vbmi"), noinline)) inline void dequant64_vbmi(const uint8_t* codes,
                                                                           const uint8_t (*planes)[256], Vec scale,
                                                                           float* out) {
  // Code i goes to byte 16L + 4q + j (i = 16q + 4L + j) so that the in-lane unpacks below leave output
  // vector q holding codes 16q .. 16q + 15 in order.
  alignas(64) static constexpr uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,  4, 5, 6, 7, 20, 21, 22, 23,
      36, 37, 38, 39, 52, 53, 54, 55, 8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
      12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i c = _mm512_permutexvar_epi8(_mm512_load_si512(kOrder), _mm512_loadu_si512(codes));
  const __mmask64 top = _mm512_movepi8_mask(c);
  __m512i b[4];
  for (int p = 0; p < 4; ++p) {
    const uint8_t* tp = planes[p];
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(tp), c, _mm512_loadu_si512(tp + 64));
    const __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(tp + 128), c, _mm512_loadu_si512(tp + 192));
    b[p] = _mm512_mask_blend_epi8(top, lo, hi);
  }
  const __m512i w01l = _mm512_unpacklo_epi8(b[0], b[1]), w01h = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23l = _mm512_unpacklo_epi8(b[2], b[3]), w23h = _mm512_unpackhi_epi8(b[2], b[3]);
  const __m512i f[4] = {_mm512_unpacklo_epi16(w01l, w23l), _mm512_unpackhi_epi16(w01l, w23l),
                        _mm512_unpacklo_epi16(w01h, w23h), _mm512_unpackhi_epi16(w01h, w23h)};
  for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + 16 * q, _mm512_mul_ps(_mm512_castsi512_ps(f[q]), scale.v));
}
#endif
#elif defined(__AVX2__)
THRIFTY_INLINE Vec vsqrt(Vec a) { return _mm256_sqrt_ps(a.v); }
THRIFTY_INLINE Vec vabs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
THRIFTY_INLINE Vec vsign(Vec a) {
  __m256 pos = _mm256_and_ps(_mm256_cmp_ps(a.v, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_set1_ps(1.0f));
  __m256 neg = _mm256_and_ps(_mm256_cmp_ps(a.v, _mm256_setzero_ps(), _CMP_LT_OQ), _mm256_set1_ps(-1.0f));
  return _mm256_or_ps(pos, neg);
}
// AVX2 gathers are slow on AMD Zen (about 12 cycles for 8 lanes, measured on Zen 3): eight scalar
// loads inserted into the vector are 1.75x faster for the dequantize lookup (the indices come
// straight from one 64-bit load) and 1.2x for the table lookup (indices extracted from the vector).
THRIFTY_INLINE Vec dequant8(const uint8_t* codes, const float* qmap, Vec scale) {
  uint64_t c;
  std::memcpy(&c, codes, 8);
  __m128 lo = _mm_load_ss(qmap + (c & 0xff));
  lo = _mm_insert_ps(lo, _mm_load_ss(qmap + ((c >> 8) & 0xff)), 0x10);
  lo = _mm_insert_ps(lo, _mm_load_ss(qmap + ((c >> 16) & 0xff)), 0x20);
  lo = _mm_insert_ps(lo, _mm_load_ss(qmap + ((c >> 24) & 0xff)), 0x30);
  __m128 hi = _mm_load_ss(qmap + ((c >> 32) & 0xff));
  hi = _mm_insert_ps(hi, _mm_load_ss(qmap + ((c >> 40) & 0xff)), 0x10);
  hi = _mm_insert_ps(hi, _mm_load_ss(qmap + ((c >> 48) & 0xff)), 0x20);
  hi = _mm_insert_ps(hi, _mm_load_ss(qmap + (c >> 56)), 0x30);
  return _mm256_mul_ps(_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1), scale.v);
}
// t[idx[lane]] for 8 lanes (see dequant8 on gathers).
THRIFTY_INLINE __m256i lookup8(const uint32_t* t, __m256i idx) {
  const __m128i il = _mm256_castsi256_si128(idx), ih = _mm256_extracti128_si256(idx, 1);
  const uint64_t a = static_cast<uint64_t>(_mm_cvtsi128_si64(il)), b = static_cast<uint64_t>(_mm_extract_epi64(il, 1));
  const uint64_t c = static_cast<uint64_t>(_mm_cvtsi128_si64(ih)), d = static_cast<uint64_t>(_mm_extract_epi64(ih, 1));
  __m128i lo = _mm_cvtsi32_si128(static_cast<int>(t[static_cast<uint32_t>(a)]));
  lo = _mm_insert_epi32(lo, static_cast<int>(t[a >> 32]), 1);
  lo = _mm_insert_epi32(lo, static_cast<int>(t[static_cast<uint32_t>(b)]), 2);
  lo = _mm_insert_epi32(lo, static_cast<int>(t[b >> 32]), 3);
  __m128i hi = _mm_cvtsi32_si128(static_cast<int>(t[static_cast<uint32_t>(c)]));
  hi = _mm_insert_epi32(hi, static_cast<int>(t[c >> 32]), 1);
  hi = _mm_insert_epi32(hi, static_cast<int>(t[static_cast<uint32_t>(d)]), 2);
  hi = _mm_insert_epi32(hi, static_cast<int>(t[d >> 32]), 3);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
struct QuantConsts {
  const uint32_t* entry;
  __m128i shift;
  __m256i low;
};
THRIFTY_INLINE QuantConsts quant_consts(const QuantLut& lut) {
  return {lut.entry, _mm_cvtsi32_si128(static_cast<int>(lut.shift)),
          _mm256_set1_epi32(static_cast<int>((1u << lut.shift) - 1u))};
}
THRIFTY_INLINE void quant8_store(const QuantConsts& q, Vec x, uint8_t* out) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i e = lookup8(q.entry, _mm256_srl_epi32(u, q.shift));
  const __m256i pos = _mm256_and_si256(_mm256_xor_si256(u, _mm256_srai_epi32(u, 31)), q.low);
  const __m256i up = _mm256_cmpgt_epi32(pos, _mm256_and_si256(e, _mm256_set1_epi32(kQNoMid)));
  const __m256i code = _mm256_sub_epi32(_mm256_srli_epi32(e, 24), up);  // up is -1 where pos > t
  // byte 0 of each 32-bit lane -> 8 consecutive bytes
  const __m256i b = _mm256_shuffle_epi8(code, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                               -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                                               -1, -1, -1, -1));
  const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi32(lo, hi));
}
#else
THRIFTY_INLINE Vec vsqrt(Vec a) { return std::sqrt(a.v); }
THRIFTY_INLINE Vec vabs(Vec a) { return std::fabs(a.v); }
THRIFTY_INLINE Vec vsign(Vec a) { return a.v > 0.0f ? 1.0f : (a.v < 0.0f ? -1.0f : 0.0f); }
THRIFTY_INLINE Vec dequant8(const uint8_t* codes, const float* qmap, Vec scale) { return qmap[*codes] * scale.v; }
struct QuantConsts {
  const QuantLut* lut;
};
THRIFTY_INLINE QuantConsts quant_consts(const QuantLut& lut) { return {&lut}; }
THRIFTY_INLINE void quant8_store(const QuantConsts& q, Vec x, uint8_t* out) { *out = quant_code(*q.lut, x.v); }
#endif

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
