// Checks that tools/avx512_emu/shim.h gives the intrinsics the kernels use Intel's semantics
// (the cases where SIMDe alone differs). Built and run by tools/test_avx512_emulated.sh with the
// same flags as the emulated kernel objects; prints what fails and exits non-zero.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

static int failures = 0;
#define CHECK(cond)                                              \
  do {                                                           \
    if (!(cond)) {                                               \
      std::printf("selftest FAILED: %s (line %d)\n", #cond, __LINE__); \
      ++failures;                                                \
    }                                                            \
  } while (0)

// shim.h is force-included (the emulation flags): its bit casts serve here too
using thrifty_emu::bits;
using thrifty_emu::from_bits;

int main() {
  // Masked stores write only the selected lanes; masked loads read only them.
  {
    alignas(64) float buf[32];
    for (int i = 0; i < 32; ++i) buf[i] = -1.0f;
    _mm512_mask_storeu_ps(buf + 1, static_cast<__mmask16>(0x0005), _mm512_set1_ps(7.0f));
    CHECK(buf[0] == -1.0f && buf[1] == 7.0f && buf[2] == -1.0f && buf[3] == 7.0f);
    for (int i = 4; i < 32; ++i) CHECK(buf[i] == -1.0f);
    uint16_t h[20];
    for (auto& x : h) x = 0xdead;
    _mm256_mask_storeu_epi16(h, static_cast<__mmask16>(0x0003), _mm256_set1_epi16(0x1234));
    CHECK(h[0] == 0x1234 && h[1] == 0x1234 && h[2] == 0xdead && h[15] == 0xdead);
    float src[16];
    for (int i = 0; i < 16; ++i) src[i] = static_cast<float>(i + 1);
    float out[16];
    _mm512_storeu_ps(out, _mm512_maskz_loadu_ps(static_cast<__mmask16>(0x0007), src));
    CHECK(out[0] == 1.0f && out[2] == 3.0f && out[3] == 0.0f && out[15] == 0.0f);
  }
  // VCVTNEPS2BF16: round to nearest even, NaN quiet, denormals to signed zero.
  {
    const float in[16] = {1.0f, from_bits(0x3f808000u), from_bits(0x3f818000u), from_bits(0x7f800001u),
                          from_bits(0x00400000u), from_bits(0x80000001u), -INFINITY, 3.0e38f,
                          from_bits(0x7f7fffffu), 0.0f, -0.0f, 1.5f, from_bits(0x3f808001u), 2.0f, 3.0f, 4.0f};
    uint16_t h[16];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in)));
    CHECK(h[0] == 0x3f80);
    CHECK(h[1] == 0x3f80);  // tie, even stays
    CHECK(h[2] == 0x3f82);  // tie, odd rounds up
    CHECK(h[3] == 0x7fc0);  // sNaN -> qNaN
    CHECK(h[4] == 0x0000);  // denormal -> +0
    CHECK(h[5] == 0x8000);  // -denormal -> -0
    CHECK(h[6] == 0xff80);
    CHECK(h[8] == 0x7f80);  // rounds up to inf
    CHECK(h[12] == 0x3f81);
  }
  // VFPCLASSPS
  {
    const float in[16] = {1.0f, from_bits(0x00000001u), -0.0f, 0.0f, INFINITY, -INFINITY, from_bits(0x7fc00000u),
                          from_bits(0x7f800001u), -2.0f, from_bits(0x807fffffu), 3.0f, 3.0f, 3.0f, 3.0f, 3.0f, 3.0f};
    const __m512 v = _mm512_loadu_ps(in);
    CHECK(_mm512_fpclass_ps_mask(v, 0x20) == 0x0202);  // denormals: lanes 1 and 9
    CHECK(_mm512_fpclass_ps_mask(v, 0x06) == 0x000c);  // zeros
    CHECK(_mm512_fpclass_ps_mask(v, 0x81) == 0x00c0);  // NaNs
    CHECK(_mm512_fpclass_ps_mask(v, 0x40) == 0x0300);  // finite negative: -2 and -denormal, not -0 or -inf
  }
  // VDPBF16PS: odd pair then even, each rounded; denormals in as zero.
  {
    // lane 0: acc 1.0; odd product 2^-24 (lost alone), even product 2^-24 (lost again) -> 1.0.
    // Summing the products first (SIMDe) would give 1 + 2^-23.
    uint16_t a[32] = {}, b[32] = {};
    a[0] = 0x3380;  // 2^-24
    b[0] = 0x3f80;  // 1
    a[1] = 0x3380;
    b[1] = 0x3f80;
    __m512bh va, vb;
    std::memcpy(&va, a, 64);
    std::memcpy(&vb, b, 64);
    float r[16];
    _mm512_storeu_ps(r, _mm512_dpbf16_ps(_mm512_set1_ps(1.0f), va, vb));
    CHECK(r[0] == 1.0f);
  }
  // rcp14: within 2^-14 of 1/x, exact specials.
  {
    const float in[16] = {3.0f, 0.0f, -0.0f, INFINITY, 7.0f, 1e-3f, 1e30f, -5.0f, 1.0f, 2.0f, 0.1f, 0.3f, 9.0f, 11.0f, 13.0f, 17.0f};
    float r[16];
    _mm512_storeu_ps(r, _mm512_rcp14_ps(_mm512_loadu_ps(in)));
    for (int i = 0; i < 16; ++i)
      if (std::isfinite(in[i]) && in[i] != 0.0f) CHECK(std::fabs(r[i] * in[i] - 1.0f) < 1.0f / 16384);
    CHECK(std::isinf(r[1]) && r[1] > 0 && std::isinf(r[2]) && r[2] < 0 && r[3] == 0.0f);
  }
  // scalef: one rounding, n = 128 stays finite when the product is.
  {
    float r[16];
    _mm512_storeu_ps(r, _mm512_scalef_ps(_mm512_set1_ps(0.75f), _mm512_set1_ps(128.0f)));
    CHECK(r[0] == std::ldexp(0.75f, 128));
    _mm512_storeu_ps(r, _mm512_scalef_ps(_mm512_set1_ps(1.5f), _mm512_set1_ps(-2.5f)));
    CHECK(r[0] == 1.5f / 8);
  }
  // Reductions in GCC's order, NaN propagating.
  {
    float in[16];
    for (int i = 0; i < 16; ++i) in[i] = static_cast<float>(i);
    CHECK(_mm512_reduce_add_ps(_mm512_loadu_ps(in)) == 120.0f);
    CHECK(_mm512_reduce_max_ps(_mm512_loadu_ps(in)) == 15.0f);
    in[3] = NAN;
    CHECK(std::isnan(_mm512_reduce_max_ps(_mm512_loadu_ps(in))));
    int32_t iv[16];
    for (int i = 0; i < 16; ++i) iv[i] = i - 3;
    CHECK(_mm512_reduce_add_epi32(_mm512_loadu_si512(iv)) == 72);
  }
  // Missing-in-SIMDe intrinsics.
  {
    float in[16];
    for (int i = 0; i < 16; ++i) in[i] = static_cast<float>(i);
    float r[16];
    _mm512_storeu_ps(r, _mm512_permute_ps(_mm512_loadu_ps(in), 0xB1));
    CHECK(r[0] == 1.0f && r[1] == 0.0f && r[2] == 3.0f && r[3] == 2.0f && r[14] == 15.0f && r[15] == 14.0f);
    uint16_t h[16];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h),
                        _mm512_cvtps_ph(_mm512_loadu_ps(in), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    CHECK(h[0] == 0x0000 && h[1] == 0x3c00 && h[15] == 0x4b80);
    int32_t idx[16], table[64];
    for (int i = 0; i < 64; ++i) table[i] = 100 + i;
    for (int i = 0; i < 16; ++i) idx[i] = (i * 5) % 64;
    int32_t g[16];
    _mm512_storeu_si512(g, _mm512_i32gather_epi32(_mm512_loadu_si512(idx), table, 4));
    for (int i = 0; i < 16; ++i) CHECK(g[i] == 100 + (i * 5) % 64);
    int8_t b8[16];
    for (int i = 0; i < 16; ++i) b8[i] = static_cast<int8_t>(i * 17 - 128);
    int32_t w[16];
    _mm512_storeu_si512(w, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b8))));
    for (int i = 0; i < 16; ++i) CHECK(w[i] == i * 17 - 128);
    _mm512_storeu_si512(w, _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b8))));
    for (int i = 0; i < 16; ++i) CHECK(w[i] == static_cast<uint8_t>(i * 17 - 128));
    uint8_t n8[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(n8), _mm512_cvtepi32_epi8(_mm512_set1_epi32(0x1234)));
    CHECK(n8[0] == 0x34 && n8[15] == 0x34);
    uint16_t n16[16];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(n16), _mm512_cvtepi32_epi16(_mm512_set1_epi32(0x12345)));
    CHECK(n16[0] == 0x2345 && n16[15] == 0x2345);
    alignas(64) float st[16];
    _mm512_stream_ps(st, _mm512_loadu_ps(in));
    _mm_sfence();
    CHECK(st[7] == 7.0f);
  }
  // VNNI and the FMA path stay fused.
  {
    int16_t a[32], b[32];
    for (int i = 0; i < 32; ++i) {
      a[i] = static_cast<int16_t>(i - 16);
      b[i] = static_cast<int16_t>(3 * i);
    }
    int32_t r[16];
    _mm512_storeu_si512(r, _mm512_dpwssd_epi32(_mm512_set1_epi32(5), _mm512_loadu_si512(a), _mm512_loadu_si512(b)));
    for (int i = 0; i < 16; ++i) CHECK(r[i] == 5 + a[2 * i] * b[2 * i] + a[2 * i + 1] * b[2 * i + 1]);
    float f[16];
    const float x = 1.0f + 1.0f / 4096;  // x * x - (x * x rounded) needs the fused product
    const float xx = x * x;
    _mm512_storeu_ps(f, _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_set1_ps(x), _mm512_set1_ps(-xx)));
    CHECK(f[0] == std::fma(x, x, -xx) && f[0] != 0.0f);
  }
  if (failures == 0) std::printf("avx512 emulation selftest: ok\n");
  return failures == 0 ? 0 : 1;
}
