// AVX-512 on AVX2 hardware, for testing only: force-included (-include) into the avx512 and
// avx512_bf16 kernel objects of a THRIFTY_EMULATE_AVX512 build (CMakeLists.txt), never into a
// normal build. SIMDe (https://github.com/simd-everywhere/simde, fetched by
// tools/test_avx512_emulated.sh, not committed) implements the _mm512_* intrinsics on top of the
// native AVX2 ones; with SIMDE_ENABLE_NATIVE_ALIASES the kernels' intrinsic names map to it.
//
// __AVX512F__ stays undefined (SIMDe would take it for native AVX-512): the kernels test
// THRIFTY_AVX512* from csrc/cpu/isa_macros.h, which THRIFTY_EMULATED_AVX512* switch on.
//
// Below SIMDe, this file adds what SIMDe 0.8.2 lacks and replaces what it gets wrong for our use,
// each written from Intel's pseudocode (Intrinsics Guide / SDM) so that a kernel passing here
// behaves the same on real AVX-512 hardware:
//  - masked loads/stores: SIMDe reads the whole vector, and its masked stores write ZEROS to
//    the masked-off lanes. Hardware touches only the selected lanes (no fault, no write, past
//    the end of a buffer): here too, lane by lane.
//  - aligned and streaming (non-temporal) 512-bit loads/stores: hardware raises #GP (SIGSEGV)
//    when the address is not 64-byte aligned; SIMDe does not check. Here a misaligned address
//    aborts with a message.
//  - bf16: SIMDe has no _mm512_cvtneps_pbh / _mm512_cvtne2ps_pbh; its dpbf16 sums the two
//    products before adding them to the accumulator and keeps denormals. VCVTNEPS2BF16 and
//    VDPBF16PS treat input denormals as zero and flush output denormals (MXCSR not consulted),
//    and VDPBF16PS adds the odd pair's product first, then the even pair's, rounding each time.
//  - _mm512_rcp14_ps: SIMDe returns the exact 1/x; hardware guarantees only 2^-14 relative
//    error. Here 1/x with its mantissa truncated to 14 bits (error < 2^-14, always toward zero):
//    a kernel that needs more than rcp14 promises fails here instead of on a user's machine.
//  - _mm512_scalef_ps: SIMDe computes a * exp2(floor(b)), which overflows for b = 128 where the
//    product is still finite, and flushes denormal inputs; here a single-rounding ldexp.
//  - _mm512_reduce_{add,max}_ps / _mm512_reduce_add_epi32: no instruction, a compiler
//    sequence; SIMDe sums/maxes left to right and skips NaNs. Here GCC's own sequence (the
//    tree in avx512fintrin.h), so sums round and NaNs propagate as a GCC build's would.
//  - missing in SIMDe: _mm512_fpclass_ps_mask, _mm512_cvtps_ph, _mm512_permute_ps, _mm512_i32gather_epi32,
//    _mm512_cvtepi8_epi32, _mm512_cvtepu8_epi32, _mm512_cvtepi32_epi8/epi16,
//    _mm512_stream_ps/si512.
#pragma once

#if defined(__AVX512F__)
#error "tools/avx512_emu/shim.h is for AVX2-only compiles (-mavx2 without -mavx512f)"
#endif
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "tools/avx512_emu/shim.h needs -mavx2 -mfma -mf16c"
#endif

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <immintrin.h>
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// Templates over the vector types drop their may_alias/aligned attributes (harmless here: the
// lanes go through memcpy).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"

namespace thrifty_emu {

#define THRIFTY_EMU_INLINE static inline __attribute__((always_inline))
#define THRIFTY_EMU_MEMBER inline __attribute__((always_inline))

// ---- raw lane access (memcpy: no aliasing assumptions) ----
template <typename V, typename T, int N>
struct Lanes {
  T a[N];
  static THRIFTY_EMU_MEMBER Lanes of(const V& v) {
    static_assert(sizeof(V) == sizeof(T) * N, "lane layout");
    Lanes l;
    std::memcpy(l.a, &v, sizeof(V));
    return l;
  }
  THRIFTY_EMU_MEMBER V vec() const {
    V v;
    std::memcpy(&v, a, sizeof(V));
    return v;
  }
};
using F16x = Lanes<__m512, float, 16>;
using I16x = Lanes<__m512i, int32_t, 16>;

THRIFTY_EMU_INLINE uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
THRIFTY_EMU_INLINE float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

[[noreturn]] static void misaligned(const char* what, const void* p, unsigned align) {
  std::fprintf(stderr,
               "thrifty AVX-512 emulation: %s at %p is not %u-byte aligned; real AVX-512 hardware "
               "raises #GP (SIGSEGV) here\n",
               what, p, align);
  std::fflush(stderr);
  std::abort();
}
THRIFTY_EMU_INLINE void check_align(const char* what, const void* p, unsigned align) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) misaligned(what, p, align);
}

// ---- masked loads / stores: only the selected lanes touch memory ----
template <typename V, int LaneBytes>
THRIFTY_EMU_INLINE V mask_load(V src, uint64_t k, const void* p) {
  constexpr int N = static_cast<int>(sizeof(V)) / LaneBytes;
  unsigned char buf[sizeof(V)];
  std::memcpy(buf, &src, sizeof(V));
  const unsigned char* m = static_cast<const unsigned char*>(p);
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1u) std::memcpy(buf + i * LaneBytes, m + i * LaneBytes, LaneBytes);
  V r;
  std::memcpy(&r, buf, sizeof(V));
  return r;
}
template <typename V, int LaneBytes>
THRIFTY_EMU_INLINE V maskz_load(uint64_t k, const void* p) {
  V zero;
  std::memset(&zero, 0, sizeof(V));
  return mask_load<V, LaneBytes>(zero, k, p);
}
template <typename V, int LaneBytes>
THRIFTY_EMU_INLINE void mask_store(void* p, uint64_t k, V a) {
  constexpr int N = static_cast<int>(sizeof(V)) / LaneBytes;
  unsigned char buf[sizeof(V)];
  std::memcpy(buf, &a, sizeof(V));
  unsigned char* m = static_cast<unsigned char*>(p);
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1u) std::memcpy(m + i * LaneBytes, buf + i * LaneBytes, LaneBytes);
}

// ---- aligned and streaming 512-bit accesses ----
THRIFTY_EMU_INLINE void stream_ps(void* p, __m512 a) {
  check_align("_mm512_stream_ps", p, 64);
  const F16x l = F16x::of(a);
  _mm256_stream_ps(static_cast<float*>(p), _mm256_loadu_ps(l.a));
  _mm256_stream_ps(static_cast<float*>(p) + 8, _mm256_loadu_ps(l.a + 8));
}
THRIFTY_EMU_INLINE void stream_si512(void* p, __m512i a) {
  check_align("_mm512_stream_si512", p, 64);
  const I16x l = I16x::of(a);
  _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l.a)));
  _mm256_stream_si256(static_cast<__m256i*>(p) + 1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l.a + 8)));
}
template <typename V>
THRIFTY_EMU_INLINE V load_aligned(const char* what, const void* p) {
  check_align(what, p, sizeof(V));
  V r;
  std::memcpy(&r, p, sizeof(V));
  return r;
}
template <typename V>
THRIFTY_EMU_INLINE void store_aligned(const char* what, void* p, V a) {
  check_align(what, p, sizeof(V));
  std::memcpy(p, &a, sizeof(V));
}

// ---- bf16 (Intel SDM: VCVTNEPS2BF16, VDPBF16PS) ----
THRIFTY_EMU_INLINE uint16_t cvtne_bf16(float x) {
  const uint32_t u = bits(x);
  const uint32_t exp = (u >> 23) & 0xffu, man = u & 0x7fffffu;
  if (exp == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);  // zero or denormal: signed zero
  if (exp == 0xffu) return static_cast<uint16_t>((u >> 16) | (man != 0 ? 0x40u : 0u));  // inf; NaN made quiet
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}
THRIFTY_EMU_INLINE float daz(float x) { return ((bits(x) >> 23) & 0xffu) == 0 ? from_bits(bits(x) & 0x80000000u) : x; }
THRIFTY_EMU_INLINE float bf16_to_f32(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

template <typename BH, int N>  // N floats -> N bf16 in BH (N * 2 bytes)
THRIFTY_EMU_INLINE BH cvtneps_pbh(const float* x) {
  uint16_t h[N];
  for (int i = 0; i < N; ++i) h[i] = cvtne_bf16(x[i]);
  BH r;
  static_assert(sizeof(BH) == sizeof(h), "bf16 vector size");
  std::memcpy(&r, h, sizeof(h));
  return r;
}
THRIFTY_EMU_INLINE __m256bh mm512_cvtneps_pbh(__m512 a) { return cvtneps_pbh<__m256bh, 16>(F16x::of(a).a); }
THRIFTY_EMU_INLINE __m128bh mm256_cvtneps_pbh(__m256 a) {
  float x[8];
  std::memcpy(x, &a, 32);
  return cvtneps_pbh<__m128bh, 8>(x);
}
// dst.bf16[0..15] = b (the second operand), dst.bf16[16..31] = a
THRIFTY_EMU_INLINE __m512bh mm512_cvtne2ps_pbh(__m512 a, __m512 b) {
  float x[32];
  std::memcpy(x, &b, 64);
  std::memcpy(x + 16, &a, 64);
  return cvtneps_pbh<__m512bh, 32>(x);
}
template <typename V, typename BH, int N>  // N float lanes; a, b hold 2N bf16
THRIFTY_EMU_INLINE V dpbf16(V src, BH a, BH b) {
  float acc[N];
  uint16_t ha[2 * N], hb[2 * N];
  std::memcpy(acc, &src, sizeof(V));
  std::memcpy(ha, &a, sizeof(BH));
  std::memcpy(hb, &b, sizeof(BH));
  for (int i = 0; i < N; ++i) {
    // FMA with denormals in treated as zero, denormals out flushed, round to nearest even:
    // the odd (upper) pair first, then the even one.
    float d = daz(acc[i]);
    d = daz(std::fma(daz(bf16_to_f32(ha[2 * i + 1])), daz(bf16_to_f32(hb[2 * i + 1])), d));
    d = daz(std::fma(daz(bf16_to_f32(ha[2 * i])), daz(bf16_to_f32(hb[2 * i])), d));
    acc[i] = d;
  }
  V r;
  std::memcpy(&r, acc, sizeof(V));
  return r;
}

// ---- rcp14 (rel. error < 2^-14 on hardware; here the worst case, truncated) ----
THRIFTY_EMU_INLINE __m512 rcp14_ps(__m512 a) {
  F16x l = F16x::of(a);
  for (float& x : l.a) {
    float r = 1.0f / x;  // inf for +-0, 0 for inf, NaN for NaN: as hardware
    const uint32_t u = bits(r), e = (u >> 23) & 0xffu;
    if (e != 0 && e != 0xffu) r = from_bits(u & ~0x1ffu);  // keep 14 of 23 mantissa bits
    x = r;
  }
  return l.vec();
}

// ---- scalef: a * 2^floor(b), one rounding (Intel's special cases: NaN, +-inf in b) ----
THRIFTY_EMU_INLINE __m512 scalef_ps(__m512 a, __m512 b) {
  F16x x = F16x::of(a);
  const F16x y = F16x::of(b);
  for (int i = 0; i < 16; ++i) {
    const float s = x.a[i], t = y.a[i];
    if (std::isnan(s)) x.a[i] = s + 0.0f;  // quiet NaN
    else if (std::isnan(t)) x.a[i] = t + 0.0f;
    else if (std::isinf(t)) x.a[i] = s * (t > 0 ? INFINITY : 0.0f);  // 0 * inf and inf * 0: NaN, as specified
    else {
      const float f = std::floor(t);
      const int n = f > 400.0f ? 400 : (f < -400.0f ? -400 : static_cast<int>(f));
      x.a[i] = std::ldexp(s, n);
    }
  }
  return x.vec();
}

// ---- reductions: GCC 12 avx512fintrin.h's sequences ----
THRIFTY_EMU_INLINE float reduce_add_ps(__m512 a) {
  const F16x l = F16x::of(a);
  const __m256 t3 = _mm256_add_ps(_mm256_loadu_ps(l.a + 8), _mm256_loadu_ps(l.a));
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
THRIFTY_EMU_INLINE float reduce_max_ps(__m512 a) {
  const F16x l = F16x::of(a);
  const __m256 t3 = _mm256_max_ps(_mm256_loadu_ps(l.a + 8), _mm256_loadu_ps(l.a));
  const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m128 t10 = _mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1)));
  return _mm_cvtss_f32(t10);
}
THRIFTY_EMU_INLINE int32_t reduce_add_epi32(__m512i a) {
  const I16x l = I16x::of(a);
  uint32_t s = 0;  // wraps like the vector adds
  for (int32_t v : l.a) s += static_cast<uint32_t>(v);
  return static_cast<int32_t>(s);
}

// ---- conversions, shuffles, gathers and classes SIMDe lacks ----
// VFPCLASSPS: bit i of imm selects QNaN, +0, -0, +inf, -inf, denormal, finite negative, SNaN.
THRIFTY_EMU_INLINE __mmask16 fpclass_ps_mask(__m512 a, int imm) {
  const F16x l = F16x::of(a);
  unsigned k = 0;
  for (int i = 0; i < 16; ++i) {
    const uint32_t u = bits(l.a[i]), e = (u >> 23) & 0xffu, m = u & 0x7fffffu, neg = u >> 31;
    const bool nan = e == 0xffu && m != 0;
    const bool hit = ((imm & 0x01) && nan && (m & 0x400000u)) || ((imm & 0x02) && u == 0) ||
                     ((imm & 0x04) && u == 0x80000000u) || ((imm & 0x08) && u == 0x7f800000u) ||
                     ((imm & 0x10) && u == 0xff800000u) || ((imm & 0x20) && e == 0 && m != 0) ||
                     ((imm & 0x40) && neg && e != 0xffu && (u & 0x7fffffffu) != 0) || ((imm & 0x80) && nan && !(m & 0x400000u));
    k |= (hit ? 1u : 0u) << i;
  }
  return static_cast<__mmask16>(k);
}
template <int Imm>
THRIFTY_EMU_INLINE __m256i cvtps_ph512(__m512 a) {
  const F16x l = F16x::of(a);
  const __m128i lo = _mm256_cvtps_ph(_mm256_loadu_ps(l.a), Imm);
  const __m128i hi = _mm256_cvtps_ph(_mm256_loadu_ps(l.a + 8), Imm);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
template <int Imm>
THRIFTY_EMU_INLINE __m512 permute_ps512(__m512 a) {  // Imm picks within each 128-bit lane
  F16x l = F16x::of(a), r;
  for (int q = 0; q < 4; ++q)
    for (int j = 0; j < 4; ++j) r.a[4 * q + j] = l.a[4 * q + ((Imm >> (2 * j)) & 3)];
  return r.vec();
}
THRIFTY_EMU_INLINE __m512i i32gather_epi32(__m512i idx, const void* base, int scale) {
  const I16x ix = I16x::of(idx);
  I16x r;
  for (int i = 0; i < 16; ++i)
    std::memcpy(&r.a[i], static_cast<const char*>(base) + static_cast<int64_t>(ix.a[i]) * scale, 4);
  return r.vec();
}
// VPMOVSXBD / VPMOVZXBD: 16 bytes widened to 16 int32, sign- or zero-extended by the byte type B.
template <typename B>
THRIFTY_EMU_INLINE __m512i widen_bytes_epi32(__m128i a) {
  B b[16];
  std::memcpy(b, &a, 16);
  I16x r;
  for (int i = 0; i < 16; ++i) r.a[i] = b[i];
  return r.vec();
}
THRIFTY_EMU_INLINE __m512i cvtepi8_epi32(__m128i a) { return widen_bytes_epi32<int8_t>(a); }
THRIFTY_EMU_INLINE __m512i cvtepu8_epi32(__m128i a) { return widen_bytes_epi32<uint8_t>(a); }
// VPMOVDB / VPMOVDW: 16 int32 truncated to 16 elements of U, returned as the vector type V.
template <typename V, typename U>
THRIFTY_EMU_INLINE V narrow_epi32(__m512i a) {
  const I16x l = I16x::of(a);
  U t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<U>(l.a[i]);
  static_assert(sizeof(V) == sizeof(t), "16 narrowed lanes fill the result");
  V r;
  std::memcpy(&r, t, sizeof(r));
  return r;
}
THRIFTY_EMU_INLINE __m128i cvtepi32_epi8(__m512i a) { return narrow_epi32<__m128i, uint8_t>(a); }
THRIFTY_EMU_INLINE __m256i cvtepi32_epi16(__m512i a) { return narrow_epi32<__m256i, uint16_t>(a); }

#undef THRIFTY_EMU_INLINE
#undef THRIFTY_EMU_MEMBER
}  // namespace thrifty_emu

#pragma GCC diagnostic pop

// ---- the intrinsic names, pointed at the versions above ----
// Masked loads/stores of every width and lane size the kernels may use.
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) (::thrifty_emu::maskz_load<__m512, 4>((k), (p)))
#undef _mm512_mask_loadu_ps
#define _mm512_mask_loadu_ps(s, k, p) (::thrifty_emu::mask_load<__m512, 4>((s), (k), (p)))
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, a) (::thrifty_emu::mask_store<__m512, 4>((p), (k), (a)))
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32(k, p) (::thrifty_emu::maskz_load<__m512i, 4>((k), (p)))
#undef _mm512_mask_loadu_epi32
#define _mm512_mask_loadu_epi32(s, k, p) (::thrifty_emu::mask_load<__m512i, 4>((s), (k), (p)))
#undef _mm512_mask_storeu_epi32
#define _mm512_mask_storeu_epi32(p, k, a) (::thrifty_emu::mask_store<__m512i, 4>((p), (k), (a)))
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16(k, p) (::thrifty_emu::maskz_load<__m512i, 2>((k), (p)))
#undef _mm512_mask_loadu_epi16
#define _mm512_mask_loadu_epi16(s, k, p) (::thrifty_emu::mask_load<__m512i, 2>((s), (k), (p)))
#undef _mm512_mask_storeu_epi16
#define _mm512_mask_storeu_epi16(p, k, a) (::thrifty_emu::mask_store<__m512i, 2>((p), (k), (a)))
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8(k, p) (::thrifty_emu::maskz_load<__m512i, 1>((k), (p)))
#undef _mm512_mask_storeu_epi8
#define _mm512_mask_storeu_epi8(p, k, a) (::thrifty_emu::mask_store<__m512i, 1>((p), (k), (a)))
#undef _mm256_maskz_loadu_ps
#define _mm256_maskz_loadu_ps(k, p) (::thrifty_emu::maskz_load<__m256, 4>((k), (p)))
#undef _mm256_mask_storeu_ps
#define _mm256_mask_storeu_ps(p, k, a) (::thrifty_emu::mask_store<__m256, 4>((p), (k), (a)))
#undef _mm256_maskz_loadu_epi32
#define _mm256_maskz_loadu_epi32(k, p) (::thrifty_emu::maskz_load<__m256i, 4>((k), (p)))
#undef _mm256_mask_storeu_epi32
#define _mm256_mask_storeu_epi32(p, k, a) (::thrifty_emu::mask_store<__m256i, 4>((p), (k), (a)))
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) (::thrifty_emu::maskz_load<__m256i, 2>((k), (p)))
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16(p, k, a) (::thrifty_emu::mask_store<__m256i, 2>((p), (k), (a)))
#undef _mm256_maskz_loadu_epi8
#define _mm256_maskz_loadu_epi8(k, p) (::thrifty_emu::maskz_load<__m256i, 1>((k), (p)))
#undef _mm256_mask_storeu_epi8
#define _mm256_mask_storeu_epi8(p, k, a) (::thrifty_emu::mask_store<__m256i, 1>((p), (k), (a)))
#undef _mm_maskz_loadu_ps
#define _mm_maskz_loadu_ps(k, p) (::thrifty_emu::maskz_load<__m128, 4>((k), (p)))
#undef _mm_mask_storeu_ps
#define _mm_mask_storeu_ps(p, k, a) (::thrifty_emu::mask_store<__m128, 4>((p), (k), (a)))
#undef _mm_maskz_loadu_epi16
#define _mm_maskz_loadu_epi16(k, p) (::thrifty_emu::maskz_load<__m128i, 2>((k), (p)))
#undef _mm_mask_storeu_epi16
#define _mm_mask_storeu_epi16(p, k, a) (::thrifty_emu::mask_store<__m128i, 2>((p), (k), (a)))

#undef _mm512_stream_ps
#define _mm512_stream_ps(p, a) (::thrifty_emu::stream_ps((p), (a)))
#undef _mm512_stream_si512
#define _mm512_stream_si512(p, a) (::thrifty_emu::stream_si512((p), (a)))
#undef _mm512_load_ps
#define _mm512_load_ps(p) (::thrifty_emu::load_aligned<__m512>("_mm512_load_ps", (p)))
#undef _mm512_store_ps
#define _mm512_store_ps(p, a) (::thrifty_emu::store_aligned<__m512>("_mm512_store_ps", (p), (a)))
#undef _mm512_load_si512
#define _mm512_load_si512(p) (::thrifty_emu::load_aligned<__m512i>("_mm512_load_si512", (p)))
#undef _mm512_store_si512
#define _mm512_store_si512(p, a) (::thrifty_emu::store_aligned<__m512i>("_mm512_store_si512", (p), (a)))

#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh(a) (::thrifty_emu::mm512_cvtneps_pbh(a))
#undef _mm256_cvtneps_pbh
#define _mm256_cvtneps_pbh(a) (::thrifty_emu::mm256_cvtneps_pbh(a))
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh(a, b) (::thrifty_emu::mm512_cvtne2ps_pbh((a), (b)))
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps(s, a, b) (::thrifty_emu::dpbf16<__m512, __m512bh, 16>((s), (a), (b)))
#undef _mm256_dpbf16_ps
#define _mm256_dpbf16_ps(s, a, b) (::thrifty_emu::dpbf16<__m256, __m256bh, 8>((s), (a), (b)))

#undef _mm512_rcp14_ps
#define _mm512_rcp14_ps(a) (::thrifty_emu::rcp14_ps(a))
#undef _mm512_scalef_ps
#define _mm512_scalef_ps(a, b) (::thrifty_emu::scalef_ps((a), (b)))
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(a) (::thrifty_emu::reduce_add_ps(a))
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps(a) (::thrifty_emu::reduce_max_ps(a))
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32(a) (::thrifty_emu::reduce_add_epi32(a))
#undef _mm512_fpclass_ps_mask
#define _mm512_fpclass_ps_mask(a, imm) (::thrifty_emu::fpclass_ps_mask((a), (imm)))
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph(a, imm) (::thrifty_emu::cvtps_ph512<(imm)>(a))
#undef _mm512_permute_ps
#define _mm512_permute_ps(a, imm) (::thrifty_emu::permute_ps512<(imm)>(a))
#undef _mm512_i32gather_epi32
#define _mm512_i32gather_epi32(idx, base, scale) (::thrifty_emu::i32gather_epi32((idx), (base), (scale)))
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(a) (::thrifty_emu::cvtepi8_epi32(a))
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(a) (::thrifty_emu::cvtepu8_epi32(a))
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8(a) (::thrifty_emu::cvtepi32_epi8(a))
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) (::thrifty_emu::cvtepi32_epi16(a))
