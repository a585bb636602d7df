// Vec helpers the optimizer kernels need beyond csrc/cpu/vec.h (sqrt, abs, sign), one
// definition per ISA level. Candidates for vec.h itself.
#pragma once
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {

#if defined(__AVX512F__)
THRIFTY_INLINE Vec vsqrt(Vec a) { return _mm512_sqrt_ps(a.v); }
THRIFTY_INLINE Vec vabs(Vec a) { return _mm512_abs_ps(a.v); }
// +1 for x > 0, -1 for x < 0, 0 for zeros (and NaN)
THRIFTY_INLINE Vec vsign(Vec a) {
  __mmask16 pos = _mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_GT_OQ);
  __mmask16 neg = _mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 r = _mm512_mask_blend_ps(pos, _mm512_setzero_ps(), _mm512_set1_ps(1.0f));
  return _mm512_mask_blend_ps(neg, r, _mm512_set1_ps(-1.0f));
}
#elif defined(__AVX2__)
THRIFTY_INLINE Vec vsqrt(Vec a) { return _mm256_sqrt_ps(a.v); }
THRIFTY_INLINE Vec vabs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
THRIFTY_INLINE Vec vsign(Vec a) {
  __m256 pos = _mm256_and_ps(_mm256_cmp_ps(a.v, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_set1_ps(1.0f));
  __m256 neg = _mm256_and_ps(_mm256_cmp_ps(a.v, _mm256_setzero_ps(), _CMP_LT_OQ), _mm256_set1_ps(-1.0f));
  return _mm256_or_ps(pos, neg);
}
#else
THRIFTY_INLINE Vec vsqrt(Vec a) { return std::sqrt(a.v); }
THRIFTY_INLINE Vec vabs(Vec a) { return std::fabs(a.v); }
THRIFTY_INLINE Vec vsign(Vec a) { return a.v > 0.0f ? 1.0f : (a.v < 0.0f ? -1.0f : 0.0f); }
#endif

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
