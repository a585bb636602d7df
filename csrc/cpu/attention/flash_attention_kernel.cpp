// Fused attention (FlashAttention-2 style) on the CPU; compiled once per ISA level.
//
// Up to kAttnCpuDecodeRows query rows per sequence (decode) take fwd_decode() instead: no tiles.
// Tiles: forward 128 query rows x 64 keys, backward 64 x 64; GEMMs on float32 tiles with a
// 6 x 2-vector register-tiled FMA micro-kernel (12 accumulators on AVX2, B panel kept in L1).
// Forward, per (batch, head, tile of query rows), never materialising seqlen_q x seqlen_k:
//   Qs = softmax_scale * Q_tile (float32)
//   for each tile of BK keys the rows can see (causal / window tiles wholly masked are skipped):
//     S = Qs K^T                       (register-tiled FMA micro-kernel, K packed transposed)
//     S = softcap * tanh(S / softcap)  (if softcap)
//     masked entries -> -inf
//     m' = max(m, rowmax S);  P = exp(S - m');  alpha = exp(m - m')
//     l = alpha l + rowsum P;  O = alpha O + P V
//   out = O / l;  lse = m + log l     (a row with no visible key: out 0, lse -inf)
// All arithmetic is float32 whatever the storage type: bf16/f16 tiles are widened into
// per-thread float buffers. Except bf16 at the avx512_bf16 level where cpu_use_bf16_dot() says so
// (common/cpu_isa.h: CPUs without AMX-BF16, such as AMD Zen 4): fwd_bf16_dot() and bwd_bf16_dot()
// multiply bf16 pairs with VDPBF16PS (float32 accumulation), see there. On an AMX-capable Xeon
// (2 threads, b1 h8 s2048) the forward ran at 0.61-0.75x the FMA path, on a Zen 4 EPYC at 1.6-1.75x;
// the backward on that Zen 4 made forward + backward 1.37-1.52x faster (b1 h8 s2048, d64 / d128).
//
// Backward (recomputing P from lse), with D = rowsum(dO * O):
//   dV = P^T dO;  dP = dO V^T;  dS = P * (dP - D)  (times 1 - tanh^2 under softcap)
//   dQ = scale * dS K;  dK = dS^T Qs
// Parallel over (batch, kv_head, chunk of key tiles): each task owns its key tiles, so dK
// and dV are summed over the query tiles and the heads of the GQA group by one thread in a
// fixed order; dQ goes to a float32 accumulator per chunk, summed in chunk order at the end.
// Extra memory: D (heads x rows floats) and chunks x heads x rows x head_dim float dq
// accumulators (chunks <= 16, see attention_cpu_bwd_chunks), never O(seqlen^2).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/attention_mask.h"
#include "common/parallel.h"
#include "cpu/attention/attention_kernels.h"
#include "cpu/isa_macros.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;
constexpr int MR = 6;  // rows of the micro-kernel's register tile (x 2 vectors of columns)
constexpr int BQ = kAttnCpuBlockQ;  // backward query tile
constexpr int FBQ = 128;            // forward query tile (K/V tile packing amortised over more rows)
constexpr int BK = kAttnCpuBlockK;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kFwdHeadCacheBytes = int64_t{16} << 20;  // per thread, see fwd()
constexpr int64_t kBwdHeadCacheBytes = int64_t{16} << 20;  // per thread, see bwd()

THRIFTY_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------
// GEMM on float tiles: C[M x N] (op)= A[M x K] B[K x N], A row-major (elements broadcast),
// B row-major with N a multiple of W (packed, padded), C row-major.
// MODE 0: C = AB;  MODE 1: C += AB;  MODE 2: C = alpha[row] * C + AB.
// AB is summed in accumulators that start at zero and meets C only at the end: C is a running sum over
// many tiles (O over the key tiles, dK / dV over the query tiles), and a chain of FMAs started from C
// would make it one rounding chain over all of them (float32 output error up to ~2.7x torch's SDPA at
// 1000 keys); this way each tile adds one rounding to C, at the same loads and stores.
template <int R, int NC>
THRIFTY_INLINE void zero_acc(Vec (&acc)[R][NC]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = Vec::zero();
  }
}
template <int R, int NC, int MODE>
THRIFTY_INLINE void store_acc(const Vec (&acc)[R][NC], float* C, int64_t ldc, const float* alpha) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      float* cp = C + r * ldc + c * W;
      if (MODE == 0) {
        acc[r][c].store(cp);
      } else if (MODE == 1) {
        (Vec::load(cp) + acc[r][c]).store(cp);
      } else {
        fma(Vec::load(cp), Vec::set1(alpha[r]), acc[r][c]).store(cp);
      }
    }
  }
}

template <int R, int NC, int MODE>
THRIFTY_INLINE void micro(const float* __restrict A, int64_t lda, int64_t aks, const float* __restrict B, int64_t ldb,
                          float* __restrict C, int64_t ldc, int K, const float* alpha) {
  Vec acc[R][NC];
  zero_acc<R, NC>(acc);
  for (int k = 0; k < K; ++k) {
    Vec b[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) b[c] = Vec::load(B + k * ldb + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec a = Vec::set1(A[r * lda + k * aks]);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = fma(a, b[c], acc[r][c]);
    }
  }
  store_acc<R, NC, MODE>(acc, C, ldc, alpha);
}

// Calls f(std::integral_constant<int, R>, r) for row tiles [r, r + R) covering [0, M): MR rows each,
// then the 1..MR-1 left over (the register-tile height is a template argument of the micro-kernels).
template <typename F>
THRIFTY_INLINE void for_row_tiles(int M, F&& f) {
  int r = 0;
  for (; r + MR <= M; r += MR) f(std::integral_constant<int, MR>{}, r);
  switch (M - r) {
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 4: f(std::integral_constant<int, 4>{}, r); break;
    case 5: f(std::integral_constant<int, 5>{}, r); break;
    default: break;
  }
  static_assert(MR == 6, "the remainder cases above run to MR - 1");
}

template <int NC, int MODE>
THRIFTY_INLINE void rows_block(int M, const float* A, int64_t lda, int64_t aks, const float* B, int64_t ldb, float* C,
                               int64_t ldc, int K, const float* alpha) {
  for_row_tiles(M, [&](auto R, int r) {
    micro<decltype(R)::value, NC, MODE>(A + r * lda, lda, aks, B, ldb, C + r * ldc, ldc, K,
                                        alpha ? alpha + r : nullptr);
  });
}

// C[M x N] (op)= A B with A[r][k] at A[r * lda + k * aks] (aks = 1: row-major; lda = 1:
// A given transposed). N must be a multiple of W (B's padded columns must be readable).
// Column blocks outer (the B panel stays in L1), rows inner.
template <int MODE>
void gemm_s(int M, int N, int K, const float* A, int64_t lda, int64_t aks, const float* B, int64_t ldb, float* C,
            int64_t ldc, const float* alpha = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (MODE == 1) return;
    for (int r = 0; r < M; ++r)
      for (int n = 0; n < N; ++n) C[r * ldc + n] = MODE == 0 ? 0.0f : C[r * ldc + n] * alpha[r];
    return;
  }
  int n = 0;
  for (; n + 2 * W <= N; n += 2 * W) rows_block<2, MODE>(M, A, lda, aks, B + n, ldb, C + n, ldc, K, alpha);
  if (n < N) rows_block<1, MODE>(M, A, lda, aks, B + n, ldb, C + n, ldc, K, alpha);
}

template <int MODE>
THRIFTY_INLINE void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                         int64_t ldc, const float* alpha = nullptr) {
  gemm_s<MODE>(M, N, K, A, lda, 1, B, ldb, C, ldc, alpha);
}

// C = A B (A row-major) over a reduction as long as head_dim (up to 256) in chains of at most kChainK:
// one FMA chain over 256 products made the float32 scores' rounding error, and with it the output's,
// up to 2.5x that of torch's SDPA (whose GEMM sums in blocks); chains of 64 added once each bring it
// under torch's. Costs one extra pass over the C tile per 64 of head_dim.
constexpr int kChainK = 64;
THRIFTY_INLINE void gemm_chained(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                 float* C, int64_t ldc) {
  gemm<0>(M, N, K < kChainK ? K : kChainK, A, lda, B, ldb, C, ldc);
  for (int k0 = kChainK; k0 < K; k0 += kChainK)
    gemm<1>(M, N, K - k0 < kChainK ? K - k0 : kChainK, A + k0, lda, B + static_cast<int64_t>(k0) * ldb, ldb, C, ldc);
}

// ---------------------------------------------------------------------------------------
// Packing: storage rows -> float tiles.

// dst[r][0..D) = scale * src[r * stride + d], zero-padded to Dp columns; rows < n.
template <typename T>
THRIFTY_INLINE void pack_rows(const T* src, int64_t stride, int n, int D, int Dp, float scale, float* dst) {
  const Vec s = Vec::set1(scale);
  for (int r = 0; r < n; ++r) {
    const T* x = src + r * stride;
    float* y = dst + static_cast<int64_t>(r) * Dp;
    int d = 0;
    for (; d + W <= D; d += W) (Vec::load(x + d) * s).store(y + d);
    if (d < D) (Vec::load(x + d, D - d) * s).store(y + d, D - d);
    for (int e = D; e < Dp; ++e) y[e] = 0.0f;
  }
}

// dst[d][j] = src[j * stride + d] for j < n, zero for n <= j < ldd (transposed tile).
template <typename T>
THRIFTY_INLINE void pack_transposed(const T* src, int64_t stride, int n, int D, int ldd, float* dst) {
  for (int j = 0; j < n; ++j) {
    const T* x = src + j * stride;
    for (int d = 0; d < D; ++d) dst[static_cast<int64_t>(d) * ldd + j] = to_float(x[d]);
  }
  if (n < ldd)
    for (int d = 0; d < D; ++d)
      for (int j = n; j < ldd; ++j) dst[static_cast<int64_t>(d) * ldd + j] = 0.0f;
}

template <typename T>
THRIFTY_INLINE void store_row(const float* x, float scale, int D, T* y) {
  const Vec s = Vec::set1(scale);
  int d = 0;
  for (; d + W <= D; d += W) (Vec::load(x + d) * s).store(y + d);
  if (d < D) (Vec::load(x + d, D - d) * s).store(y + d, D - d);
}

// exp for softmax arguments x <= ~0 (s - max, s - lse): exp(x) = 2^n exp(r), n = round(x log2 e)
// by the 1.5 * 2^23 rounding trick, r = x - n ln2 (two-part ln2), degree-5 polynomial
// (relative error ~2e-7, ~3 ulp), 2^n from the integer bits of the rounded value. x is
// clamped below at -88 (n >= -127; n = -127 gives the exponent field 0, so exp(-inf) and
// anything under ~-87.7 is exactly 0); x must stay under 88 (no overflow handling). NaN
// propagates (the clamp returns its second operand on NaN). About 13 vector ops instead of
// ~30 for the general exp of cpu/vec.h.
#if defined(THRIFTY_AVX512)
THRIFTY_INLINE Vec exp_sm(Vec x) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-88.0f), x.v);
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(8.31156857e-3f), r, _mm512_set1_ps(4.18989286e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66671529e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.99991715e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t), 23), _mm512_set1_epi32(127 << 23));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
// 2^x for softmax arguments already in base 2 (x <= ~0; the bf16 forward folds log2(e) into the score
// scale): n = round(x), f = x - n exact, 2^f by the polynomial above composed with f ln2 (coefficients
// c_k ln2^k, relative error ~2e-7), 2^n applied by VSCALEFPS. x is clamped below at -200 (2^-200 is 0;
// exp2(-inf) must not become -inf - -inf = NaN); NaN propagates. 9 vector ops against exp_sm's 12 (no
// exponent-bit assembly, no two-part ln2 reduction).
THRIFTY_INLINE Vec exp2_sm(Vec x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-200.0f), x.v);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.3298733392730355e-3f), f, _mm512_set1_ps(9.671743027865887e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550572648644447e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402225285768509e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
// 2^x for the bf16 forward's probabilities P, which are rounded to bf16 (relative step 2^-8) right
// after: f = x - floor(x) in [0, 1) by one VREDUCEPS, 2^f by a degree-4 minimax polynomial with p(0) = 1
// (relative error 3e-6: l, summed from the same values as P, keeps lse within ~3e-6), and VSCALEFPS,
// which takes floor(x) itself. No clamp: x = -inf gives f = 0 and scalef(1, -inf) = 0; x just below 0
// (f rounding to 1) gives scalef(p(1) ~ 2, -1) ~ 1; NaN propagates. 6 vector ops against exp2_sm's 9.
THRIFTY_INLINE Vec exp2_p(Vec x) {
  const __m512 f = _mm512_reduce_ps(x.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.3428427278995514e-2f), f, _mm512_set1_ps(5.223977565765381e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4128106236457825e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.930449604988098e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, x.v);
}
#elif defined(__AVX2__)
THRIFTY_INLINE Vec exp_sm(Vec x) {
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-88.0f), x.v);
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(8.31156857e-3f), r, _mm256_set1_ps(4.18989286e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66671529e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.99991715e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
THRIFTY_INLINE Vec exp_sm(Vec x) { return std::exp(x.v); }
#endif

// tanh to float32 accuracy at every x (Cephes' tanhf): below |x| = 0.625 an odd polynomial, since
// (e - 1) / (e + 1) cancels there (its absolute error ~1e-7 became softcap * 3e-8 in the capped scores,
// garbage at softcap 1e8); above, 1 - 2 / (e + 1), e = exp(2|x|) with |x| clamped to 9 (tanh(9) rounds
// to 1), its sign restored. NaN takes the polynomial branch and stays NaN.
THRIFTY_INLINE Vec tanh_vec(Vec x) {
#if defined(THRIFTY_AVX512) || defined(__AVX2__)
  const Vec z = x * x;
  Vec p = fma(Vec::set1(-5.70498872745e-3f), z, Vec::set1(2.06390887954e-2f));
  p = fma(p, z, Vec::set1(-5.37397155531e-2f));
  p = fma(p, z, Vec::set1(1.33314422036e-1f));
  p = fma(p, z, Vec::set1(-3.33332819422e-1f));
  const Vec small = fma(p * z, x, x);
#endif
#if defined(THRIFTY_AVX512)
  const __m512 ax = _mm512_abs_ps(x.v);
  const Vec e = exp(Vec(_mm512_min_ps(ax, _mm512_set1_ps(9.0f))) * Vec::set1(2.0f));
  const Vec large = Vec::set1(1.0f) - Vec::set1(2.0f) / (e + Vec::set1(1.0f));
  const __m512 signed_large = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(large.v), _mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(INT32_MIN))));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_GE_OQ), small.v, signed_large);
#elif defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x.v);
  const Vec e = exp(Vec(_mm256_min_ps(ax, _mm256_set1_ps(9.0f))) * Vec::set1(2.0f));
  const Vec large = Vec::set1(1.0f) - Vec::set1(2.0f) / (e + Vec::set1(1.0f));
  const __m256 signed_large = _mm256_or_ps(large.v, _mm256_and_ps(sign, x.v));
  return _mm256_blendv_ps(small.v, signed_large, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_GE_OQ));
#else
  return std::tanh(x.v);
#endif
}

// s[0..n) = cap * tanh(s / cap); if dsc, dsc[j] = 1 - tanh^2 (the derivative).
THRIFTY_INLINE void apply_softcap(float* s, int n, float cap, float* dsc) {
  const Vec vc = Vec::set1(cap), vi = Vec::set1(1.0f / cap), one = Vec::set1(1.0f);
  int j = 0;
  for (; j + W <= n; j += W) {
    const Vec t = tanh_vec(Vec::load(s + j) * vi);
    (t * vc).store(s + j);
    if (dsc) (one - t * t).store(dsc + j);
  }
  if (j < n) {
    const int m = n - j;
    const Vec t = tanh_vec(Vec::load(s + j, m) * vi);
    (t * vc).store(s + j, m);
    if (dsc) (one - t * t).store(dsc + j, m);
  }
}

// Visible columns [a, b) of local row r of a (query tile at i0) x (key tile at j0, kn keys).
struct Cols {
  int a, b;
};
THRIFTY_INLINE Cols visible_cols(bool unmasked, int64_t i, int64_t j0, int kn, int64_t sq, int64_t sk, int wl,
                                 int wr) {
  if (unmasked) return Cols{0, kn};
  const KeyRange kr = attention_key_range(i, sq, sk, wl, wr);
  int64_t a = kr.lo - j0, b = kr.hi - j0;
  if (a < 0) a = 0;
  if (b > kn) b = kn;
  if (a >= b) return Cols{0, 0};
  return Cols{static_cast<int>(a), static_cast<int>(b)};
}

// One sequence's geometry: rows of q/k in the tensors and lengths.
struct Seq {
  int64_t q_row0, k_row0, sq, sk;
};
THRIFTY_INLINE Seq seq_of(const AttentionParams& p, int b) {
  if (p.varlen) {
    const int64_t q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int64_t k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
    return Seq{q0, k0, q1 - q0, k1 - k0};
  }
  return Seq{0, 0, p.seqlen_q, p.seqlen_k};
}

// Transposed scores st[j * ld + r] (key j0 + j, query row i0 + r; r < mq, j < kn) outside each query's
// visible keys -> -inf.
THRIFTY_INLINE void mask_scores_t(float* st, int64_t ld, int mq, int64_t i0, int64_t j0, int kn, const Seq& sq, int wl,
                                  int wr) {
  for (int r = 0; r < mq; ++r) {
    const Cols c = visible_cols(false, i0 + r, j0, kn, sq.sq, sq.sk, wl, wr);
    const int a = c.a < c.b ? c.a : kn;
    for (int j = 0; j < a; ++j) st[j * ld + r] = kNegInf;
    for (int j = c.b > a ? c.b : a; j < kn; ++j) st[j * ld + r] = kNegInf;
  }
}

// max(init, rows 0..n-1 of a transposed score tile t[j * ld]) for one vector of query columns, in four
// independent VMAXPS chains rather than one chain of n dependent maxima (~3 cycles each). Measured no
// faster on a Zen 4, whose out-of-order window already overlapped the chain with other columns' work.
THRIFTY_INLINE Vec col_max(const float* t, int64_t ld, int n, Vec init) {
  Vec a0 = init, a1 = Vec::set1(kNegInf), a2 = a1, a3 = a1;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    a0 = max(a0, Vec::load(t + j * ld));
    a1 = max(a1, Vec::load(t + (j + 1) * ld));
    a2 = max(a2, Vec::load(t + (j + 2) * ld));
    a3 = max(a3, Vec::load(t + (j + 3) * ld));
  }
  for (; j < n; ++j) a0 = max(a0, Vec::load(t + j * ld));
  return max(max(a0, a1), max(a2, a3));
}

struct Buffer {
  float* ptr = nullptr;
  explicit Buffer(int64_t floats) {
    ptr = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(round_up(floats * 4, 64))));
  }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// ---------------------------------------------------------------------------------------
// Forward

// Item `item` of a tiled forward: a tile of up to FBQ query rows of one (batch, head), with the
// pointers to its rows. Tiles of one head alternate between the two ends of the sequence so that
// contiguous ranges of items (the thread pool's static split) carry equal causal work.
template <typename T>
struct FwdTile {
  int b, h, kvh;
  Seq sq;
  int64_t i0;
  int mq;  // rows of the tile; 0 when the tile starts past the sequence's end (nothing to do)
  const T *qb, *kb, *vb;
  T* ob;
  float* lse;
};

template <typename T>
THRIFTY_INLINE FwdTile<T> fwd_tile(const AttentionParams& p, int64_t item, int64_t nqt) {
  FwdTile<T> t;
  const int64_t bh = item / nqt, ti = item % nqt;
  const int64_t qti = (ti % 2 == 0) ? ti / 2 : nqt - 1 - ti / 2;
  t.b = static_cast<int>(bh / p.heads);
  t.h = static_cast<int>(bh % p.heads);
  t.kvh = t.h / (p.heads / p.kv_heads);
  t.sq = seq_of(p, t.b);
  t.i0 = qti * FBQ;
  t.mq = t.i0 >= t.sq.sq ? 0 : static_cast<int>(t.sq.sq - t.i0 < FBQ ? t.sq.sq - t.i0 : FBQ);
  const int64_t qr = t.sq.q_row0 + t.i0;
  t.qb = static_cast<const T*>(p.q) + t.b * p.q_batch_stride + qr * p.q_row_stride + t.h * p.q_head_stride;
  t.kb = static_cast<const T*>(p.k) + t.b * p.k_batch_stride + t.sq.k_row0 * p.k_row_stride + t.kvh * p.k_head_stride;
  t.vb = static_cast<const T*>(p.v) + t.b * p.v_batch_stride + t.sq.k_row0 * p.v_row_stride + t.kvh * p.v_head_stride;
  t.ob = static_cast<T*>(p.out) + t.b * p.o_batch_stride + qr * p.o_row_stride + t.h * p.o_head_stride;
  t.lse = p.lse + t.b * p.lse_batch_stride + t.h * p.lse_head_stride + qr;
  return t;
}

// Output rows r < n: out = acc / l, lse = m + log l; a row with l = 0 (no visible key) gets out 0
// and lse -inf. A NaN l (a NaN score: NaN in q or in a visible key) gives NaN out and lse, as torch's
// SDPA does, never a silent zero row. acc rows are Dp floats apart, output rows o_stride elements.
template <typename T>
THRIFTY_INLINE void store_out_rows(const float* acc, int Dp, const float* m, const float* l, int n, int D, T* ob,
                                   int64_t o_stride, float* lse) {
  for (int r = 0; r < n; ++r) {
    T* orow = ob + r * o_stride;
    if (l[r] != 0.0f) {  // true for NaN
      store_row(acc + static_cast<int64_t>(r) * Dp, 1.0f / l[r], D, orow);
      lse[r] = m[r] + std::log(l[r]);
    } else {
      for (int d = 0; d < D; ++d) orow[d] = from_float<T>(0.0f);
      lse[r] = kNegInf;
    }
  }
}

// Scores are computed transposed, S^T = K Qs^T ([keys][queries]): K rows are broadcast
// from a contiguous float copy of the tile, Qs^T is packed once per query tile, and the softmax statistics of the queries live in vector lanes (no horizontal
// reductions). O = alpha O + P V then reads P^T as a transposed A operand.
template <typename T>
void fwd(const AttentionParams& p) {
  const int D = p.head_dim;
  const int Dp = static_cast<int>(round_up(D, W));
  const int64_t nqt = (static_cast<int64_t>(p.seqlen_q) + FBQ - 1) / FBQ;
  const int64_t items = static_cast<int64_t>(p.batch) * p.heads * nqt;
  const int wl = p.window_left, wr = p.window_right;
  const float cap = p.softcap;

  // K and V of the (batch, kv_head) at hand are widened into contiguous float rows once per
  // thread and reused by all its query tiles of that head (tile by tile, as they are first
  // needed), when that fits kFwdHeadCacheBytes; else each query tile packs its own K/V tiles.
  // Reading the tensors' K/V rows (far apart: heads x head_dim elements) once per query tile
  // cost ~15% of the forward in TLB and cache misses; bf16/f16 are also widened only once.
  const int64_t sk_cap = round_up(p.seqlen_k, BK);  // seqlen_k is max_seqlen_k under varlen
  const bool head_cache = 2 * sk_cap * Dp * static_cast<int64_t>(sizeof(float)) <= kFwdHeadCacheBytes;

  parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t f_qt = static_cast<int64_t>(D) * FBQ, f_acc = static_cast<int64_t>(FBQ) * Dp,
                  f_kv = static_cast<int64_t>(BK) * Dp, f_s = static_cast<int64_t>(BK) * FBQ;
    Buffer buf(f_qt + f_acc + 2 * f_kv + f_s + 3 * FBQ);
    Buffer hbuf(head_cache ? 2 * sk_cap * Dp : 1);
    std::vector<char> packed(head_cache ? sk_cap / BK : 0);
    int64_t resident = -1;  // b * kv_heads + kv_head whose K/V hbuf holds (the tiles marked in `packed`)
    float* qt = buf.ptr;       // Qs^T [D][FBQ]
    float* acc = qt + f_qt;    // O    [FBQ][Dp]
    float* kbuf = acc + f_acc; // K    [BK][Dp] (widened copy)
    float* vbuf = kbuf + f_kv; // V    [BK][Dp]
    float* st = vbuf + f_kv;   // S^T -> P^T [BK][FBQ]
    float* m = st + f_s;
    float* l = m + FBQ;
    float* alpha = l + FBQ;
    for (int64_t item = begin; item < end; ++item) {
      const FwdTile<T> tile = fwd_tile<T>(p, item, nqt);
      const int mq = tile.mq;
      if (mq == 0) continue;
      const Seq sq = tile.sq;
      const int64_t i0 = tile.i0;
      const int nq = static_cast<int>(round_up(mq, W));
      const T *qb = tile.qb, *kb = tile.kb, *vb = tile.vb;
      if (head_cache && resident != static_cast<int64_t>(tile.b) * p.kv_heads + tile.kvh) {
        resident = static_cast<int64_t>(tile.b) * p.kv_heads + tile.kvh;
        std::fill(packed.begin(), packed.end(), 0);
      }

      for (int r = 0; r < mq; ++r) {
        const T* x = qb + r * p.q_row_stride;
        for (int d = 0; d < D; ++d) qt[d * FBQ + r] = p.softmax_scale * to_float(x[d]);
      }
      for (int d = 0; d < D; ++d)
        for (int r = mq; r < nq; ++r) qt[d * FBQ + r] = 0.0f;
      for (int r = 0; r < nq; ++r) {
        m[r] = -std::numeric_limits<float>::max();
        l[r] = 0.0f;
      }
      std::memset(acc, 0, sizeof(float) * mq * Dp);
      const KeyRange kr = attention_tile_key_range(i0, i0 + mq, sq.sq, sq.sk, wl, wr);
      for (int64_t j0 = kr.lo; j0 < kr.hi; j0 += BK) {
        const int kn = static_cast<int>(kr.hi - j0 < BK ? kr.hi - j0 : BK);
        // K and V tiles as contiguous float rows (widened): free of the L1 set conflicts and
        // TLB misses of the tensors' large row strides.
        const float* kp = kbuf;
        const float* vp = vbuf;
        if (head_cache) {
          float* kh = hbuf.ptr;
          float* vh = kh + sk_cap * Dp;
          for (int64_t t = j0 / BK; t * BK < j0 + kn; ++t) {
            if (packed[t]) continue;
            const int64_t t0 = t * BK;
            const int tn = static_cast<int>(sq.sk - t0 < BK ? sq.sk - t0 : BK);
            pack_rows(kb + t0 * p.k_row_stride, p.k_row_stride, tn, D, Dp, 1.0f, kh + t0 * Dp);
            pack_rows(vb + t0 * p.v_row_stride, p.v_row_stride, tn, D, Dp, 1.0f, vh + t0 * Dp);
            packed[t] = 1;
          }
          kp = kh + j0 * Dp;
          vp = vh + j0 * Dp;
        } else {
          pack_rows(kb + j0 * p.k_row_stride, p.k_row_stride, kn, D, Dp, 1.0f, kbuf);
          pack_rows(vb + j0 * p.v_row_stride, p.v_row_stride, kn, D, Dp, 1.0f, vbuf);
        }
        const int64_t lk = Dp, lv = Dp;
        const int nv = Dp;
        gemm_chained(kn, nq, D, kp, lk, qt, FBQ, st, FBQ);  // S^T = K Qs^T
        if (cap > 0.0f)
          for (int j = 0; j < kn; ++j) apply_softcap(st + j * FBQ, nq, cap, nullptr);
        if (!attention_tile_unmasked(i0, i0 + mq, j0, j0 + kn, sq.sq, sq.sk, wl, wr))
          mask_scores_t(st, FBQ, mq, i0, j0, kn, sq, wl, wr);
        // m starts at -FLT_MAX (not -inf), so m' is finite: a row with nothing visible yet
        // gets P = exp(-inf) = 0 and alpha = 0 (O and l are 0 anyway), with no special case.
        for (int ib = 0; ib < nq; ib += W) {
          const Vec mold = Vec::load(m + ib);
          const Vec vm = col_max(st + ib, FBQ, kn, mold);
          vm.store(m + ib);
          const Vec va = exp_sm(mold - vm);
          va.store(alpha + ib);
          Vec s0 = Vec::zero(), s1 = Vec::zero();
          int j = 0;
          for (; j + 2 <= kn; j += 2) {
            const Vec e0 = exp_sm(Vec::load(st + j * FBQ + ib) - vm);
            const Vec e1 = exp_sm(Vec::load(st + (j + 1) * FBQ + ib) - vm);
            e0.store(st + j * FBQ + ib);
            e1.store(st + (j + 1) * FBQ + ib);
            s0 = s0 + e0;
            s1 = s1 + e1;
          }
          if (j < kn) {
            const Vec e0 = exp_sm(Vec::load(st + j * FBQ + ib) - vm);
            e0.store(st + j * FBQ + ib);
            s0 = s0 + e0;
          }
          fma(Vec::load(l + ib), va, s0 + s1).store(l + ib);
        }
        gemm_s<2>(mq, nv, kn, st, 1, FBQ, vp, lv, acc, Dp, alpha);  // O = alpha O + P V
      }
      store_out_rows(acc, Dp, m, l, mq, D, tile.ob, p.o_row_stride, tile.lse);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward

// Maps a query row index (0..rows) to (batch, row in the tensors).
THRIFTY_INLINE void bwd_row_of(const AttentionBwdParams& p, int64_t r, int& b, int64_t& trow) {
  if (p.varlen) {
    int lo = 0, hi = p.batch;  // find b with cu[b] <= r < cu[b+1] (first such; skips empty ones)
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (p.cu_seqlens_q[mid] <= r) lo = mid; else hi = mid;
    }
    b = lo;
    trow = r;
  } else {
    b = static_cast<int>(r / p.seqlen_q);
    trow = r % p.seqlen_q;
  }
}

// The backward's workspace (attention_kernels.h): D = rowsum(dO * O) [heads][rows], then the nc
// float32 dq accumulators [nc][heads][rows][Dw].
struct BwdWork {
  int nc;
  int64_t rows, Dw;
  float* Dsum;
  float* dq_acc;
  explicit BwdWork(const AttentionBwdParams& p)
      : nc(attention_cpu_bwd_chunks(p)), rows(attention_cpu_q_rows(p)), Dw(attention_cpu_pad_dim(p.head_dim)),
        Dsum(static_cast<float*>(p.workspace)), dq_acc(Dsum + p.heads * rows) {}
};

// Task `task` of the backward's pass 2: chunk c of the key tiles of (batch b, kv_head kvh), and the
// rows of that sequence and head in K, V, dK, dV.
template <typename T>
struct BwdTask {
  int c, b, kvh;
  int64_t bk;          // b * kv_heads + kvh
  Seq sq;
  int64_t q_base_row;  // the sequence's first query row in the `rows` index space
  const T *kb, *vb;
  T *dkb, *dvb;
};
template <typename T>
THRIFTY_INLINE BwdTask<T> bwd_task(const AttentionBwdParams& p, int nc, int64_t task) {
  BwdTask<T> t;
  t.c = static_cast<int>(task % nc);
  t.bk = task / nc;
  const int b = t.b = static_cast<int>(t.bk / p.kv_heads);
  const int kvh = t.kvh = static_cast<int>(t.bk % p.kv_heads);
  const Seq sq = t.sq = seq_of(p, b);
  t.q_base_row = p.varlen ? sq.q_row0 : static_cast<int64_t>(b) * p.seqlen_q;
  t.kb = static_cast<const T*>(p.k) + b * p.k_batch_stride + sq.k_row0 * p.k_row_stride + kvh * p.k_head_stride;
  t.vb = static_cast<const T*>(p.v) + b * p.v_batch_stride + sq.k_row0 * p.v_row_stride + kvh * p.v_head_stride;
  t.dkb = static_cast<T*>(p.dk) + b * p.dk_batch_stride + sq.k_row0 * p.dk_row_stride + kvh * p.dk_head_stride;
  t.dvb = static_cast<T*>(p.dv) + b * p.dv_batch_stride + sq.k_row0 * p.dv_row_stride + kvh * p.dv_head_stride;
  return t;
}
// Query rows [lo, hi) of the sequence that see any of the keys [j0, j0 + kn).
THRIFTY_INLINE QueryRange bwd_tile_rows(const Seq& sq, int64_t j0, int kn, int wl, int wr) {
  if (sq.sq <= 0) return QueryRange{0, 0};
  return QueryRange{attention_query_range(j0, sq.sq, sq.sk, wl, wr).lo,
                    attention_query_range(j0 + kn - 1, sq.sq, sq.sk, wl, wr).hi};
}

// Pass 2 over the tasks [begin, end) of one thread, for both backward kernels: for each key tile [j0, j0 + kn)
// of a task's chunk, zeroes the tile's dK and dV accumulators ([kn][Dp] floats), calls
// tile(tk, j0, kn, seen) when any query row sees the tile (seen: those rows; the callback adds into the
// accumulators), and stores dK (times dk_scale) and dV. new_head() runs first and whenever a task moves to
// another (batch, kv_head): the callers reset their per-head caches there.
template <typename T, typename NewHead, typename Tile>
THRIFTY_INLINE void bwd_key_tiles(const AttentionBwdParams& p, int nc, int64_t begin, int64_t end, int Dp,
                                  float* dk_acc, float* dv_acc, float dk_scale, NewHead&& new_head, Tile&& tile) {
  const int64_t nkt = (static_cast<int64_t>(p.seqlen_k) + BK - 1) / BK;
  int64_t resident = -1;  // b * kv_heads + kv_head of the previous task
  for (int64_t task = begin; task < end; ++task) {
    const BwdTask<T> tk = bwd_task<T>(p, nc, task);
    if (resident != tk.bk) {
      resident = tk.bk;
      new_head();
    }
    for (int64_t kt_i = tk.c; kt_i < nkt; kt_i += nc) {
      const int64_t j0 = kt_i * BK;
      if (j0 >= tk.sq.sk) break;
      const int kn = static_cast<int>(tk.sq.sk - j0 < BK ? tk.sq.sk - j0 : BK);
      std::memset(dk_acc, 0, sizeof(float) * kn * Dp);
      std::memset(dv_acc, 0, sizeof(float) * kn * Dp);
      const QueryRange seen = bwd_tile_rows(tk.sq, j0, kn, p.window_left, p.window_right);
      if (seen.lo < seen.hi) tile(tk, j0, kn, seen);
      for (int j = 0; j < kn; ++j) {
        store_row(dk_acc + static_cast<int64_t>(j) * Dp, dk_scale, p.head_dim, tk.dkb + (j0 + j) * p.dk_row_stride);
        store_row(dv_acc + static_cast<int64_t>(j) * Dp, 1.0f, p.head_dim, tk.dvb + (j0 + j) * p.dv_row_stride);
      }
    }
  }
}

// Pass 1: D = rowsum(dO * O); zero the dq accumulators.
template <typename T>
void bwd_row_sums(const AttentionBwdParams& p, const BwdWork& w) {
  const int D = p.head_dim;
  const int64_t rows = w.rows;
  const T* Ot = static_cast<const T*>(p.out);
  const T* dO = static_cast<const T*>(p.dout);
  parallel_for(0, static_cast<int64_t>(p.heads) * rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int h = static_cast<int>(x / rows);
      const int64_t r = x % rows;
      int b;
      int64_t tr;
      bwd_row_of(p, r, b, tr);
      const T* o = Ot + b * p.o_batch_stride + tr * p.o_row_stride + h * p.o_head_stride;
      const T* g = dO + b * p.do_batch_stride + tr * p.do_row_stride + h * p.do_head_stride;
      Vec a = Vec::zero();
      int d = 0;
      for (; d + W <= D; d += W) a = fma(Vec::load(o + d), Vec::load(g + d), a);
      if (d < D) a = fma(Vec::load(o + d, D - d), Vec::load(g + d, D - d), a);
      w.Dsum[x] = a.reduce_add();
      for (int c = 0; c < w.nc; ++c)
        std::memset(w.dq_acc + ((c * p.heads + h) * rows + r) * w.Dw, 0, sizeof(float) * w.Dw);
    }
  });
}

// Pass 3: dQ = scale * sum over chunks (in chunk order) of the partials.
template <typename T>
void bwd_dq_out(const AttentionBwdParams& p, const BwdWork& w) {
  const int D = p.head_dim;
  const int64_t rows = w.rows;
  T* dQ = static_cast<T*>(p.dq);
  parallel_for(0, static_cast<int64_t>(p.heads) * rows, 64, [&](int64_t begin, int64_t end) {
    const Vec sc = Vec::set1(p.softmax_scale);
    for (int64_t x = begin; x < end; ++x) {
      const int h = static_cast<int>(x / rows);
      const int64_t r = x % rows;
      int b;
      int64_t trow;
      bwd_row_of(p, r, b, trow);
      T* out = dQ + b * p.dq_batch_stride + trow * p.dq_row_stride + h * p.dq_head_stride;
      const float* src = w.dq_acc + (static_cast<int64_t>(h) * rows + r) * w.Dw;
      const int64_t cstride = static_cast<int64_t>(p.heads) * rows * w.Dw;
      int d = 0;
      for (; d + W <= D; d += W) {
        Vec a = Vec::load(src + d);
        for (int c = 1; c < w.nc; ++c) a = a + Vec::load(src + c * cstride + d);
        (a * sc).store(out + d);
      }
      if (d < D) {
        Vec a = Vec::load(src + d, D - d);
        for (int c = 1; c < w.nc; ++c) a = a + Vec::load(src + c * cstride + d, D - d);
        (a * sc).store(out + d, D - d);
      }
    }
  });
}

template <typename T>
void bwd(const AttentionBwdParams& p) {
  const int D = p.head_dim;
  const int Dp = static_cast<int>(round_up(D, W));
  const int group = p.heads / p.kv_heads;
  const BwdWork w(p);
  const int nc = w.nc;
  const int64_t rows = w.rows, Dw = w.Dw;
  const T* Q = static_cast<const T*>(p.q);
  const T* dO = static_cast<const T*>(p.dout);
  const int wl = p.window_left, wr = p.window_right;
  const float cap = p.softcap;
  const float* Dsum = w.Dsum;
  float* dq_acc = w.dq_acc;
  bwd_row_sums<T>(p, w);

  // Pass 2: per (batch, kv_head, chunk of key tiles): dK, dV final; dQ partial sums.
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.kv_heads * nc;
  // Like the forward's K/V: scale * Q and dO of the heads of the (batch, kv_head) at hand are
  // widened into contiguous float rows once per thread (tile by tile, as first needed) and
  // reused by all its key tiles, when that fits kBwdHeadCacheBytes; else packed per tile pair.
  const int64_t sq_cap = round_up(p.seqlen_q, BQ);  // seqlen_q is max_seqlen_q under varlen
  const bool head_cache = 2 * group * sq_cap * Dp * static_cast<int64_t>(sizeof(float)) <= kBwdHeadCacheBytes;
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t f_kt = static_cast<int64_t>(D) * BK, f_k = static_cast<int64_t>(BK) * Dp,
                  f_q = static_cast<int64_t>(BQ) * Dp, f_s = static_cast<int64_t>(BQ) * BK;
    Buffer buf(f_kt * 2 + f_k + 2 * f_q + 3 * f_s + 2 * f_k + 2 * BQ);
    Buffer hbuf(head_cache ? 2 * group * sq_cap * Dp : 1);  // [group][sq_cap][Dp] scale * Q, then dO
    std::vector<char> packed(head_cache ? group * sq_cap / BQ : 0);
    float* kt = buf.ptr;         // K^T  [D][BK]
    float* vt = kt + f_kt;       // V^T  [D][BK]
    float* kp = vt + f_kt;       // K    [BK][Dp]
    float* qs = kp + f_k;        // scale * Q [BQ][Dp]
    float* gp = qs + f_q;        // dO   [BQ][Dp]
    float* s = gp + f_q;         // S -> P [BQ][BK]
    float* dp = s + f_s;         // dP -> dS [BQ][BK]
    float* dsc = dp + f_s;       // 1 - tanh^2 [BQ][BK] (softcap)
    float* dk_acc = dsc + f_s;   // [BK][Dp]
    float* dv_acc = dk_acc + f_k;
    float* lse_r = dv_acc + f_k;
    float* d_r = lse_r + BQ;
    bwd_key_tiles<T>(p, nc, begin, end, Dp, dk_acc, dv_acc, 1.0f, [&] {
      if (head_cache) std::fill(packed.begin(), packed.end(), 0);
    }, [&](const BwdTask<T>& tk, int64_t j0, int kn, QueryRange seen) {
      const Seq& sq = tk.sq;
      const int b = tk.b;
      const int nk = static_cast<int>(round_up(kn, W));
      const int64_t qlo = seen.lo, qhi = seen.hi;
      pack_transposed(tk.kb + j0 * p.k_row_stride, p.k_row_stride, kn, D, BK, kt);
      pack_transposed(tk.vb + j0 * p.v_row_stride, p.v_row_stride, kn, D, BK, vt);
      pack_rows(tk.kb + j0 * p.k_row_stride, p.k_row_stride, kn, D, Dp, 1.0f, kp);
      for (int hh = 0; hh < group; ++hh) {
        const int h = tk.kvh * group + hh;
        const T* qb = Q + b * p.q_batch_stride + sq.q_row0 * p.q_row_stride + h * p.q_head_stride;
        const T* gb = dO + b * p.do_batch_stride + sq.q_row0 * p.do_row_stride + h * p.do_head_stride;
        const float* lseb = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + sq.q_row0;
        const float* db = Dsum + h * rows + tk.q_base_row;
        float* dqa = dq_acc + ((static_cast<int64_t>(tk.c) * p.heads + h) * rows + tk.q_base_row) * Dw;
        for (int64_t i0 = qlo; i0 < qhi; i0 += BQ) {
          const int mq = static_cast<int>(qhi - i0 < BQ ? qhi - i0 : BQ);
          const float* qsp = qs;
          const float* gpp = gp;
          if (head_cache) {
            float* qh = hbuf.ptr + static_cast<int64_t>(hh) * sq_cap * Dp;
            float* gh = hbuf.ptr + static_cast<int64_t>(group + hh) * sq_cap * Dp;
            char* pk = packed.data() + static_cast<int64_t>(hh) * (sq_cap / BQ);
            for (int64_t t = i0 / BQ; t * BQ < i0 + mq; ++t) {
              if (pk[t]) continue;
              const int64_t t0 = t * BQ;
              const int tn = static_cast<int>(sq.sq - t0 < BQ ? sq.sq - t0 : BQ);
              pack_rows(qb + t0 * p.q_row_stride, p.q_row_stride, tn, D, Dp, p.softmax_scale, qh + t0 * Dp);
              pack_rows(gb + t0 * p.do_row_stride, p.do_row_stride, tn, D, Dp, 1.0f, gh + t0 * Dp);
              pk[t] = 1;
            }
            qsp = qh + i0 * Dp;
            gpp = gh + i0 * Dp;
          } else {
            pack_rows(qb + i0 * p.q_row_stride, p.q_row_stride, mq, D, Dp, p.softmax_scale, qs);
            pack_rows(gb + i0 * p.do_row_stride, p.do_row_stride, mq, D, Dp, 1.0f, gp);
          }
          for (int r = 0; r < mq; ++r) {
            lse_r[r] = lseb[i0 + r];
            d_r[r] = db[i0 + r];
          }
          gemm_chained(mq, nk, D, qsp, Dp, kt, BK, s, BK);   // S = Qs K^T
          gemm_chained(mq, nk, D, gpp, Dp, vt, BK, dp, BK);  // dP = dO V^T
          const bool unmasked = attention_tile_unmasked(i0, i0 + mq, j0, j0 + kn, sq.sq, sq.sk, wl, wr);
          for (int r = 0; r < mq; ++r) {
            float* sr = s + r * BK;
            float* dpr = dp + r * BK;
            float* dcr = dsc + r * BK;
            if (cap > 0.0f) apply_softcap(sr, kn, cap, dcr);
            const Cols cc = visible_cols(unmasked, i0 + r, j0, kn, sq.sq, sq.sk, wl, wr);
            const float lz = lse_r[r];
            if (lz == kNegInf || cc.a >= cc.b) {
              for (int j = 0; j < kn; ++j) sr[j] = dpr[j] = 0.0f;
              continue;
            }
            for (int j = 0; j < cc.a; ++j) sr[j] = dpr[j] = 0.0f;
            for (int j = cc.b; j < kn; ++j) sr[j] = dpr[j] = 0.0f;
            const Vec vl = Vec::set1(lz), vd = Vec::set1(d_r[r]);
            int j = cc.a;
            for (; j + W <= cc.b; j += W) {
              const Vec pv = exp_sm(Vec::load(sr + j) - vl);
              pv.store(sr + j);
              Vec ds = pv * (Vec::load(dpr + j) - vd);
              if (cap > 0.0f) ds = ds * Vec::load(dcr + j);
              ds.store(dpr + j);
            }
            if (j < cc.b) {
              const int n = cc.b - j;
              const Vec pv = exp_sm(Vec::load(sr + j, n) - vl);
              pv.store(sr + j, n);
              Vec ds = pv * (Vec::load(dpr + j, n) - vd);
              if (cap > 0.0f) ds = ds * Vec::load(dcr + j, n);
              ds.store(dpr + j, n);
            }
          }
          // dV += P^T dO  (P read transposed through the A strides)
          gemm_s<1>(kn, Dp, mq, s, 1, BK, gpp, Dp, dv_acc, Dp);
          // dQ (partial, unscaled) += dS K
          gemm<1>(mq, Dp, kn, dp, BK, kp, Dp, dqa + i0 * Dw, Dw);
          // dK += dS^T Qs
          gemm_s<1>(kn, Dp, mq, dp, 1, BK, qsp, Dp, dk_acc, Dp);
        }
      }
    });
  });

  bwd_dq_out<T>(p, w);
}

// ---------------------------------------------------------------------------------------
// Forward for a few query rows per sequence (decode, seqlen_q <= kAttnCpuDecodeRows): no tiles.
// Each item is (batch, kv_head, up to kDecodeHeads query heads of its GQA group); its query rows
// go one at a time straight against the tensors' key rows, every K/V row widened once for all the
// item's heads: scores by dot products (into per-thread float rows of seqlen_k), exact softmax
// (max first), then out = sum_j p_j v_j with register-held chunks of the output rows. The tiled
// path widens and packs all of a head's K and V for a single query row (~8x slower at 512 cached
// keys). Extra memory: kDecodeHeads x seqlen_k + 2 kDecodeHeads x head_dim floats per thread.
constexpr int kDecodeHeads = 4;
constexpr int kDecodePrefetchRows = 8;  // K/V rows are heads x head_dim apart: prefetch this far ahead

// Prefetches the cache lines at row, row + 64, ... below row + bytes (all of a 64-byte-aligned row;
// rows of one head sit kv_heads x head_dim elements apart, too far for the hardware prefetchers).
THRIFTY_INLINE void prefetch_row(const void* row, int bytes) {
  for (int off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(row) + off);
}

// Scores of GN heads for keys [0, n) (rows of kb, stride ks): s[g * lds + j] = qf[g] . k_j.
template <int GN, typename T>
THRIFTY_INLINE void decode_scores(const T* kb, int64_t ks, int n, int D, int Dp, const float* qf, float* s,
                                  int64_t lds) {
  for (int j = 0; j < n; ++j) {
    const T* krow = kb + j * ks;
    if (j + kDecodePrefetchRows < n) prefetch_row(krow + kDecodePrefetchRows * ks, D * static_cast<int>(sizeof(T)));
    Vec acc[GN];
#pragma GCC unroll 4
    for (int g = 0; g < GN; ++g) acc[g] = Vec::zero();
    int d = 0;
    for (; d + W <= D; d += W) {
      const Vec kv = Vec::load(krow + d);
#pragma GCC unroll 4
      for (int g = 0; g < GN; ++g) acc[g] = fma(kv, Vec::load(qf + g * Dp + d), acc[g]);
    }
    if (d < D) {
      const Vec kv = Vec::load(krow + d, D - d);
#pragma GCC unroll 4
      for (int g = 0; g < GN; ++g) acc[g] = fma(kv, Vec::load(qf + g * Dp + d), acc[g]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < GN; ++g) s[g * lds + j] = acc[g].reduce_add();
  }
}

// of[g][0..Dp) = sum_j P[g][j] v_j for GN heads, keys [0, n) (rows of vb, stride vs). Blocks of
// kDecodeKeyBlock keys outer, so that the V rows of a block stay in cache while every chunk of
// the output rows passes over them.
constexpr int kDecodeKeyBlock = 128;
template <int GN, typename T>
THRIFTY_INLINE void decode_pv(const T* vb, int64_t vs, int n, int D, int Dp, const float* s, int64_t lds, float* of) {
  constexpr int OC = (W >= 16 ? 16 : 8) / GN;  // output vectors per head held in registers (8 or 16 in all)
  for (int j0 = 0; j0 < n; j0 += kDecodeKeyBlock) {
    const int j1 = n - j0 < kDecodeKeyBlock ? n : j0 + kDecodeKeyBlock;
    for (int d0 = 0; d0 < Dp; d0 += OC * W) {
      const int nv = (Dp - d0) / W < OC ? (Dp - d0) / W : OC;
      Vec o[GN][OC];
#pragma GCC unroll 4
      for (int g = 0; g < GN; ++g)
#pragma GCC unroll 16
        for (int c = 0; c < OC; ++c) o[g][c] = Vec::zero();  // each key block's sum meets of once (see store_acc)
      for (int j = j0; j < j1; ++j) {
        const T* vrow = vb + j * vs + d0;
        if (d0 == 0 && j + kDecodePrefetchRows < n)  // the first chunk's pass brings the block's rows in
          prefetch_row(vrow + kDecodePrefetchRows * vs, D * static_cast<int>(sizeof(T)));
        Vec pj[GN];
#pragma GCC unroll 4
        for (int g = 0; g < GN; ++g) pj[g] = Vec::set1(s[g * lds + j]);
#pragma GCC unroll 16
        for (int c = 0; c < OC; ++c) {
          if (c >= nv) break;
          const int left = D - d0 - c * W;  // valid elements from this vector on (>= 1: Dp = round_up(D, W))
          const Vec v = left >= W ? Vec::load(vrow + c * W) : Vec::load(vrow + c * W, left);
#pragma GCC unroll 4
          for (int g = 0; g < GN; ++g) o[g][c] = fma(pj[g], v, o[g][c]);
        }
      }
      for (int g = 0; g < GN; ++g)
        for (int c = 0; c < nv; ++c) {
          float* op = of + g * Dp + d0 + c * W;
          (j0 == 0 ? o[g][c] : Vec::load(op) + o[g][c]).store(op);
        }
    }
  }
}

template <typename T>
void fwd_decode(const AttentionParams& p) {
  const int D = p.head_dim;
  const int Dp = static_cast<int>(round_up(D, W));
  const int group = p.heads / p.kv_heads;
  const int chunks = (group + kDecodeHeads - 1) / kDecodeHeads;  // head chunks per kv head
  const int64_t items = static_cast<int64_t>(p.batch) * p.kv_heads * chunks;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.out);
  const int wl = p.window_left, wr = p.window_right;
  const float cap = p.softcap;
  const int64_t lds = round_up(p.seqlen_k, W);

  parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Buffer buf(kDecodeHeads * (lds + 2 * Dp));
    float* s = buf.ptr;                        // [kDecodeHeads][lds] scores, then P, of the visible keys
    float* qf = s + kDecodeHeads * lds;        // [kDecodeHeads][Dp] scale * q rows (float, zero-padded)
    float* of = qf + kDecodeHeads * Dp;        // [kDecodeHeads][Dp] output rows (float)
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / (static_cast<int64_t>(p.kv_heads) * chunks));
      const int rest = static_cast<int>(item % (static_cast<int64_t>(p.kv_heads) * chunks));
      const int kvh = rest / chunks, h0 = kvh * group + rest % chunks * kDecodeHeads;
      const int gn = std::min(kDecodeHeads, kvh * group + group - h0);  // query heads h0 .. h0 + gn
      const Seq sq = seq_of(p, b);
      const T* kb = K + b * p.k_batch_stride + sq.k_row0 * p.k_row_stride + kvh * p.k_head_stride;
      const T* vb = V + b * p.v_batch_stride + sq.k_row0 * p.v_row_stride + kvh * p.v_head_stride;
      for (int64_t i = 0; i < sq.sq; ++i) {
        const int64_t qrow = sq.q_row0 + i;
        const KeyRange kr = attention_key_range(i, sq.sq, sq.sk, wl, wr);
        const int n = static_cast<int>(kr.hi > kr.lo ? kr.hi - kr.lo : 0);
        float mx[kDecodeHeads], l[kDecodeHeads] = {};  // l = 0: no visible key, out 0 and lse -inf
        if (n > 0) {
          for (int g = 0; g < gn; ++g)
            pack_rows(Q + b * p.q_batch_stride + qrow * p.q_row_stride + (h0 + g) * p.q_head_stride, 0, 1, D, Dp,
                      p.softmax_scale, qf + g * Dp);
          const T* kr0 = kb + kr.lo * p.k_row_stride;
          const T* vr0 = vb + kr.lo * p.v_row_stride;
          switch (gn) {
            case 1: decode_scores<1>(kr0, p.k_row_stride, n, D, Dp, qf, s, lds); break;
            case 2: decode_scores<2>(kr0, p.k_row_stride, n, D, Dp, qf, s, lds); break;
            case 3: decode_scores<3>(kr0, p.k_row_stride, n, D, Dp, qf, s, lds); break;
            default: decode_scores<4>(kr0, p.k_row_stride, n, D, Dp, qf, s, lds); break;
          }
          for (int g = 0; g < gn; ++g) {
            float* sg = s + g * lds;
            if (cap > 0.0f) apply_softcap(sg, n, cap, nullptr);
            float m = kNegInf;
            for (int j = 0; j < n; ++j) m = sg[j] > m ? sg[j] : m;
            // P = exp(S - max) in place, l = sum P.
            const Vec vm = Vec::set1(m);
            Vec sum = Vec::zero();
            int j = 0;
            for (; j + W <= n; j += W) {
              const Vec e = exp_sm(Vec::load(sg + j) - vm);
              e.store(sg + j);
              sum = sum + e;
            }
            if (j < n) {
              exp_sm(Vec::load(sg + j, n - j) - vm).store(sg + j, n - j);
              sum = sum + Vec::load(sg + j, n - j);  // lanes past n load as 0
            }
            mx[g] = m;
            l[g] = sum.reduce_add();
          }
          switch (gn) {
            case 1: decode_pv<1>(vr0, p.v_row_stride, n, D, Dp, s, lds, of); break;
            case 2: decode_pv<2>(vr0, p.v_row_stride, n, D, Dp, s, lds, of); break;
            case 3: decode_pv<3>(vr0, p.v_row_stride, n, D, Dp, s, lds, of); break;
            default: decode_pv<4>(vr0, p.v_row_stride, n, D, Dp, s, lds, of); break;
          }
        }
        for (int g = 0; g < gn; ++g)
          store_out_rows(of + g * Dp, Dp, mx + g, l + g, 1, D,
                         O + b * p.o_batch_stride + qrow * p.o_row_stride + (h0 + g) * p.o_head_stride, 0,
                         p.lse + b * p.lse_batch_stride + (h0 + g) * p.lse_head_stride + qrow);
      }
    }
  });
}

#if defined(THRIFTY_AVX512_BF16)
// ---------------------------------------------------------------------------------------
// bfloat16 forward on the bf16 dot-product instruction (avx512_bf16). VDPBF16PS multiplies
// 16 pairs of bf16 and adds both products of a pair to a float32 lane: twice the multiply-adds
// per instruction of the float32 FMA path above, and no widening of Q, K, V. Operands are kept
// in pairs along the reduction dimension (one uint32 = two consecutive bf16 of it, even one in
// the low half):
//   S^T = K Q^T  A = K tile rows (pairs along head_dim), B = Q2t[d/2][query] (S^T lanes: queries)
//   O += P V     A = P^T pairs of keys read transposed,  B = V2[key/2][d]    (O lanes: head_dim)
// S, the softmax statistics and O stay float32; the softmax scale applies to the float32 S
// (Q is used as given, never rounded after scaling); P is rounded to bf16 for P V, as torch's
// own bf16 CPU flash attention does. Key tiles are aligned to BK, so a tile is also a tile of
// the per-head K/V2 cache; its columns outside the rows' visible ranges are masked.
// The VDPBF16PS rounding differs from the FMA path's (each pair's products are added to the
// lane one after the other, denormals flushed): results match it to float32 accumulation error.

THRIFTY_INLINE __m512bh as_bh(__m512i x) {
  __m512bh r;
  std::memcpy(&r, &x, sizeof(r));
  return r;
}

// C[R rows x NC vectors] (op)= A B over K2 pairs, A[r][k] at A[r * lda + k * aks]; MODE as micro().
template <int R, int NC, int MODE>
THRIFTY_INLINE void micro_dp(const uint32_t* __restrict A, int64_t lda, int64_t aks, const uint32_t* __restrict B,
                             int64_t ldb, float* __restrict C, int64_t ldc, int K2, const float* alpha) {
  Vec acc[R][NC];
  zero_acc<R, NC>(acc);
  for (int k = 0; k < K2; ++k) {
    __m512bh b[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) b[c] = as_bh(_mm512_loadu_si512(B + k * ldb + c * 16));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(A[r * lda + k * aks])));
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c].v, a, b[c]);
    }
  }
  store_acc<R, NC, MODE>(acc, C, ldc, alpha);
}

template <int NC, int MODE>
THRIFTY_INLINE void rows_block_dp(int M, const uint32_t* A, int64_t lda, int64_t aks, const uint32_t* B, int64_t ldb,
                                  float* C, int64_t ldc, int K2, const float* alpha) {
  for_row_tiles(M, [&](auto R, int r) {
    micro_dp<decltype(R)::value, NC, MODE>(A + r * lda, lda, aks, B, ldb, C + r * ldc, ldc, K2,
                                           alpha ? alpha + r : nullptr);
  });
}

// C[M x 16 NV] (op)= A[M x K2 pairs] B[K2 pairs x 16 NV], A[r][k] at A[r * lda + k * aks] (aks = 1: pairs
// along A's rows; lda = 1: A stored transposed); column blocks of 4 vectors outer.
template <int MODE>
void gemm_dp(int M, int NV, int K2, const uint32_t* A, int64_t lda, int64_t aks, const uint32_t* B, int64_t ldb,
             float* C, int64_t ldc, const float* alpha = nullptr) {
  int v = 0;
  for (; v + 4 <= NV; v += 4) rows_block_dp<4, MODE>(M, A, lda, aks, B + v * 16, ldb, C + v * 16, ldc, K2, alpha);
  switch (NV - v) {
    case 1: rows_block_dp<1, MODE>(M, A, lda, aks, B + v * 16, ldb, C + v * 16, ldc, K2, alpha); break;
    case 2: rows_block_dp<2, MODE>(M, A, lda, aks, B + v * 16, ldb, C + v * 16, ldc, K2, alpha); break;
    case 3: rows_block_dp<3, MODE>(M, A, lda, aks, B + v * 16, ldb, C + v * 16, ldc, K2, alpha); break;
    default: break;
  }
}

// Lanes [lo, hi) of a 16-lane vector (bounds clamped to [0, 16]) as a mask.
THRIFTY_INLINE __mmask16 lane_range_mask(int lo, int hi) {
  lo = lo < 0 ? 0 : (lo > W ? W : lo);
  hi = hi < 0 ? 0 : (hi > W ? W : hi);
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

THRIFTY_INLINE uint32_t bf16_pair(const bf16_t* x) {  // x[0] low half, x[1] high half
  uint32_t w;
  std::memcpy(&w, x, sizeof(w));
  return w;
}

// 16 pairs (lo[i], hi[i]) of bf16 bit patterns as uint32 words, lo in the low half: rows (r, r + 1) of 16 columns.
THRIFTY_INLINE __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

// Lane i of the result = the pair (a[i], b[i]) rounded to bf16 (RNE), a in the low half: pair_words of two
// rows of 16 floats in two instructions (VCVTNE2PS2BF16 puts a's 16 values in words 0-15 and b's in 16-31,
// VPERMW interleaves them) instead of six (two conversions, two widenings, a shift, an or).
THRIFTY_INLINE __m512i interleave_bf16(__m512 a, __m512 b) {
  alignas(64) static constexpr uint16_t kIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  __m512bh ab = _mm512_cvtne2ps_pbh(b, a);
  __m512i w;
  std::memcpy(&w, &ab, sizeof(w));
  return _mm512_permutexvar_epi16(_mm512_load_si512(kIdx), w);
}

// Rows r < n of a tile as pairs along head_dim: pair i of row r, (x_r[2i], x_r[2i+1]), the odd head_dim's
// last pair completed with 0, goes to dst[r * rs + i * is]; rows n <= r < n_pad are zero.
//   rows of pairs (A operands):         rs = D2, is = 1  (pack_q_pairs)
//   pairs transposed (B operands, ld):  rs = 1,  is = ld
THRIFTY_INLINE void pack_pairs(const bf16_t* src, int64_t stride, int n, int n_pad, int D, uint32_t* dst, int64_t rs,
                               int64_t is) {
  const int D2 = (D + 1) / 2;
  for (int r = 0; r < n; ++r) {
    const bf16_t* x = src + r * stride;
    uint32_t* y = dst + r * rs;
    for (int i = 0; i < D / 2; ++i) y[i * is] = bf16_pair(x + 2 * i);
    if (D & 1) y[(D2 - 1) * is] = x[D - 1].bits;
  }
  for (int r = n; r < n_pad; ++r)
    for (int i = 0; i < D2; ++i) dst[r * rs + i * is] = 0;
}
THRIFTY_INLINE void pack_q_pairs(const bf16_t* src, int64_t stride, int n, int n_pad, int D, uint32_t* dst) {
  pack_pairs(src, stride, n, n_pad, D, dst, (D + 1) / 2, 1);
}

// V2 of one key tile (n <= BK keys): dst[jp * Dp + d] = (V[2jp][d], V[2jp+1][d]), zero for keys
// past n and for D <= d < Dp.
THRIFTY_INLINE void pack_v_pairs(const bf16_t* src, int64_t stride, int n, int D, int Dp, uint32_t* dst) {
  for (int jp = 0; jp < BK / 2; ++jp) {
    uint32_t* y = dst + static_cast<int64_t>(jp) * Dp;
    const int j = 2 * jp;
    if (j >= n) {
      std::memset(y, 0, sizeof(uint32_t) * Dp);
      continue;
    }
    const bf16_t* x0 = src + j * stride;
    const bf16_t* x1 = src + (j + 1) * stride;
    const bool has1 = j + 1 < n;
    for (int d = 0; d < Dp; d += 16) {
      const int m = D - d >= 16 ? 16 : (D - d > 0 ? D - d : 0);
      const __mmask16 k = static_cast<__mmask16>((1u << m) - 1u);
      const __m256i lo = _mm256_maskz_loadu_epi16(k, x0 + d);
      const __m256i hi = has1 ? _mm256_maskz_loadu_epi16(k, x1 + d) : _mm256_setzero_si256();
      _mm512_storeu_si512(y + d, pair_words(lo, hi));
    }
  }
}

// The bf16 forward on VDPBF16PS, transposed as fwd() is in float32: S^T = K Q^T ([keys][queries]) with
// A = K rows (pairs along head_dim, [key][d pair]) and B = Q^T pairs ([d pair][query]), so the softmax
// statistics of the queries live in vector lanes (no horizontal reductions, no per-row loops; 3-6%
// faster than the row form S = Q K^T on a Zen 4), and P^T is rounded to bf16 straight into pairs of keys
// ([key pair][query]), read by O = alpha O + P V as a transposed A operand.
void fwd_bf16_dot(const AttentionParams& p) {
  static_assert(W == 16 && BK == 64, "the bf16 dot-product forward is written for 16 lanes and 64-key tiles");
  const int D = p.head_dim;
  const int D2 = (D + 1) / 2;
  const int Dp = static_cast<int>(round_up(D, W));
  const int NV = Dp / W;
  const int64_t nqt = (static_cast<int64_t>(p.seqlen_q) + FBQ - 1) / FBQ;
  const int64_t items = static_cast<int64_t>(p.batch) * p.heads * nqt;
  const int wl = p.window_left, wr = p.window_right;
  const float cap = p.softcap;
  // Scores are scaled inside the exponent (exp(scale S - m), one FMA) unless a softcap or a scale that is
  // not positive needs the scaled scores first.
  const bool prescale = cap > 0.0f || !(p.softmax_scale > 0.0f);
  const Vec vpre = Vec::set1(p.softmax_scale);
  constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
  const Vec vsc2 = Vec::set1((prescale ? 1.0f : p.softmax_scale) * kLog2e);  // the score scale in base-2 units

  // K rows and V2 of the (batch, kv_head) at hand, kept per thread as in fwd() when they fit.
  const int64_t sk_cap = round_up(p.seqlen_k, BK);
  const int64_t k2_words = sk_cap * D2, v2_words = sk_cap / 2 * Dp;
  const bool head_cache = (k2_words + v2_words) * static_cast<int64_t>(sizeof(uint32_t)) <= kFwdHeadCacheBytes;

  // s vsc2 rounded on its own: an explicitly rounded multiply, which the compiler cannot contract with the
  // add after it into an FMA (GCC contracts a plain _mm512_mul_ps + _mm512_add_ps: -ffp-contract=fast)
  const auto scaled = [vsc2](Vec s) {
    return Vec(_mm512_mul_round_ps(s.v, vsc2.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  };

  parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t f_q = static_cast<int64_t>(D2) * FBQ, f_acc = static_cast<int64_t>(FBQ) * Dp,
                  f_s = static_cast<int64_t>(BK) * FBQ, f_p = static_cast<int64_t>(BK / 2) * FBQ,
                  f_k = static_cast<int64_t>(BK) * D2, f_v = static_cast<int64_t>(BK / 2) * Dp;
    Buffer buf(f_q + f_acc + f_s + f_p + f_k + f_v + 3 * FBQ);  // 4-byte words
    Buffer hbuf(head_cache ? k2_words + v2_words : 1);
    std::vector<char> packed(head_cache ? sk_cap / BK : 0);
    int64_t resident = -1;
    uint32_t* q2t = reinterpret_cast<uint32_t*>(buf.ptr);   // Q^T [D2][FBQ] pairs along head_dim
    float* acc = buf.ptr + f_q;                             // O   [FBQ][Dp]
    float* st = acc + f_acc;                                // S^T [BK][FBQ]
    uint32_t* p2t = reinterpret_cast<uint32_t*>(st + f_s);  // P^T [BK/2][FBQ] pairs of keys
    uint32_t* kt = p2t + f_p;                               // K   [BK][D2] (no head cache)
    uint32_t* vt = kt + f_k;                                // V2  [BK/2][Dp] (no head cache)
    float* m = reinterpret_cast<float*>(vt + f_v);
    float* l = m + FBQ;
    float* alpha = l + FBQ;
    uint32_t* k2 = reinterpret_cast<uint32_t*>(hbuf.ptr);  // [sk_cap][D2]
    uint32_t* v2 = k2 + k2_words;                           // [sk_cap / 2][Dp]
    for (int64_t item = begin; item < end; ++item) {
      const FwdTile<bf16_t> tile = fwd_tile<bf16_t>(p, item, nqt);
      const int mq = tile.mq;
      if (mq == 0) continue;
      const Seq sq = tile.sq;
      const int64_t i0 = tile.i0;
      const int nq = static_cast<int>(round_up(mq, W));
      const bf16_t *qb = tile.qb, *kb = tile.kb, *vb = tile.vb;
      if (head_cache && resident != static_cast<int64_t>(tile.b) * p.kv_heads + tile.kvh) {
        resident = static_cast<int64_t>(tile.b) * p.kv_heads + tile.kvh;
        std::fill(packed.begin(), packed.end(), 0);
      }
      pack_pairs(qb, p.q_row_stride, mq, nq, D, q2t, 1, FBQ);
      for (int r = 0; r < nq; ++r) {
        m[r] = -std::numeric_limits<float>::max();
        l[r] = 0.0f;
      }
      std::memset(acc, 0, sizeof(float) * mq * Dp);
      const KeyRange kr = attention_tile_key_range(i0, i0 + mq, sq.sq, sq.sk, wl, wr);
      for (int64_t j0 = kr.lo / BK * BK; j0 < kr.hi; j0 += BK) {
        const int kn = static_cast<int>(sq.sk - j0 < BK ? sq.sk - j0 : BK);  // keys of the tile
        const uint32_t* kp = kt;
        const uint32_t* vp = vt;
        if (head_cache) {
          const int64_t t = j0 / BK;
          if (!packed[t]) {
            pack_q_pairs(kb + j0 * p.k_row_stride, p.k_row_stride, kn, BK, D, k2 + j0 * D2);
            pack_v_pairs(vb + j0 * p.v_row_stride, p.v_row_stride, kn, D, Dp, v2 + j0 / 2 * Dp);
            packed[t] = 1;
          }
          kp = k2 + j0 * D2;
          vp = v2 + j0 / 2 * Dp;
        } else {
          pack_q_pairs(kb + j0 * p.k_row_stride, p.k_row_stride, kn, BK, D, kt);
          pack_v_pairs(vb + j0 * p.v_row_stride, p.v_row_stride, kn, D, Dp, vt);
        }
        gemm_dp<0>(kn, nq / W, D2, kp, D2, 1, q2t, FBQ, st, FBQ);  // S^T = K Q^T (unscaled)
        if (prescale)
          for (int j = 0; j < kn; ++j) {
            float* sj = st + static_cast<int64_t>(j) * FBQ;
            for (int ib = 0; ib < nq; ib += W) (Vec::load(sj + ib) * vpre).store(sj + ib);
            if (cap > 0.0f) apply_softcap(sj, nq, cap, nullptr);
          }
        const bool unmasked = kr.lo <= j0 && j0 + kn <= kr.hi &&
                              attention_tile_unmasked(i0, i0 + mq, j0, j0 + kn, sq.sq, sq.sk, wl, wr);
        if (!unmasked) mask_scores_t(st, FBQ, mq, i0, j0, kn, sq, wl, wr);
        // As fwd(): m starts at -FLT_MAX, so a row with nothing visible yet gets P = 0 and alpha = 0.
        // The exponents are taken in base 2 with log2(e) folded into the score scale, and m is kept in those
        // units (m2 = max s vsc2; natural units for lse after the last key tile): P = 2^(s vsc2 - m2), one FMA
        // per score. The FMA leaves the product's rounding error (half an ulp of m2) in the row max's own
        // exponent: nothing below |m2| = 1024 (P = 1 + 4e-5 at most), but P ~ 1.003-1.01 on the top key at
        // |scaled scores| ~ 1e4-1e5, a bf16 ulp off once P V rounds P. Columns past 1024 take the product
        // rounded as m2's was (a multiply and an add), so the row max's exponent is exactly 0 there.
        for (int ib = 0; ib < nq; ib += W) {
          const Vec mold = Vec::load(m + ib);
          const Vec raw = col_max(st + ib, FBQ, kn, Vec::set1(kNegInf));
          const Vec vm = max(mold, scaled(raw));  // vsc2 > 0: max(s) vsc2 = max(s vsc2), one product per column
          vm.store(m + ib);
          exp2_sm(mold - vm).store(alpha + ib);
          // -m2, capped at FLT_MAX: m = -FLT_MAX (nothing visible yet) would give +inf and -inf + inf = NaN
          // for the masked scores, which must give 2^-inf = 0.
          // (min returns its second operand on NaN: a NaN m stays NaN, as before.)
          const Vec nvm2 = min(Vec::set1(std::numeric_limits<float>::max()), Vec::zero() - vm);
          Vec s0 = Vec::zero(), s1 = Vec::zero();
          const auto softmax_pairs = [&](auto exponent) {
            for (int j = 0; j < kn; j += 2) {  // keys 2jp, 2jp + 1 -> one bf16 pair per query
              const Vec e0 = exp2_p(exponent(Vec::load(st + j * FBQ + ib)));
              const Vec e1 = j + 1 < kn ? exp2_p(exponent(Vec::load(st + (j + 1) * FBQ + ib))) : Vec::zero();
              s0 = s0 + e0;
              s1 = s1 + e1;
              _mm512_storeu_si512(p2t + (j / 2) * FBQ + ib, interleave_bf16(e0.v, e1.v));
            }
          };
          // |m2| > 1024 in any column with a visible key (false for NaN, which the FMA path carries as before,
          // and for m2 = -FLT_MAX: nothing visible, every P is 0 either way)
          if (_mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(vm.v, _mm512_set1_ps(-std::numeric_limits<float>::max()),
                                                         _CMP_NEQ_OQ),
                                      _mm512_abs_ps(vm.v), _mm512_set1_ps(1024.0f), _CMP_GT_OQ))
            softmax_pairs([&](Vec s) { return scaled(s) + nvm2; });
          else
            softmax_pairs([&](Vec s) { return fma(s, vsc2, nvm2); });
          fma(Vec::load(l + ib), Vec::load(alpha + ib), s0 + s1).store(l + ib);
        }
        gemm_dp<2>(mq, NV, (kn + 1) / 2, p2t, 1, FBQ, vp, Dp, acc, Dp, alpha);  // O = alpha O + P V
      }
      for (int r = 0; r < mq; ++r) m[r] *= kLn2;  // base-2 units -> natural, for lse = m + log l
      store_out_rows(acc, Dp, m, l, mq, D, tile.ob, p.o_row_stride, tile.lse);
    }
  });
}

// ---------------------------------------------------------------------------------------
// bfloat16 backward on VDPBF16PS (avx512_bf16 where cpu_use_bf16_dot(), as the forward above). The
// five products of a (query tile, key tile) pair take bf16 pairs along their reduction dimension:
//   S  = Q K^T     A = Q [row][d pairs],        B = K2 [d pair][key]   (pack_q_pairs / pack_pairs)
//   dP = dO V^T    A = dO [row][d pairs],       B = V2 [d pair][key]
//   dV += P^T dO   A = P2 [row pair][key] read transposed, B = dO [row pair][d] (pack_v_pairs on dO rows)
//   dK += dS^T Q   A = dS2 [row pair][key] read transposed, B = Q [row pair][d]
//   dQ += dS K     A = dS [row][key pairs],     B = K [key pair][d]     (pack_v_pairs on K rows)
// S, dP, the softmax and dS = P (dP - D) stay float32; P and dS are rounded to bf16 for the last three
// products, as torch's own bf16 CPU flash attention backward rounds them. Q is used unscaled: S is
// scaled in float32 (as in the forward) and dK takes the softmax scale when stored. The passes, tasks and dq accumulators are bwd()'s.
void bwd_bf16_dot(const AttentionBwdParams& p) {
  static_assert(W == 16 && BK == 64 && BQ == 64, "the bf16 dot-product backward is written for 16 lanes, 64 x 64 tiles");
  const int D = p.head_dim;
  const int D2 = (D + 1) / 2;
  const int Dp = static_cast<int>(round_up(D, W));
  const int NV = Dp / W;
  const int group = p.heads / p.kv_heads;
  const BwdWork w(p);
  const int nc = w.nc;
  const int64_t rows = w.rows, Dw = w.Dw;
  const bf16_t* Q = static_cast<const bf16_t*>(p.q);
  const bf16_t* dO = static_cast<const bf16_t*>(p.dout);
  const int wl = p.window_left, wr = p.window_right;
  const float cap = p.softcap;
  const __m512 vscale = _mm512_set1_ps(p.softmax_scale);
  bwd_row_sums<bf16_t>(p, w);

  const int64_t tasks = static_cast<int64_t>(p.batch) * p.kv_heads * nc;
  // Q and dO of the heads of the (batch, kv_head) at hand in both pair layouts, per thread, packed
  // tile by tile as first needed (as bwd() caches their float rows), when that fits.
  const int64_t sq_cap = round_up(p.seqlen_q, BQ);
  const int64_t f_hd = sq_cap * D2, f_hr = sq_cap / 2 * Dp;  // words per head: along d, along rows
  const int64_t head_words = 2 * (f_hd + f_hr);                // Q and dO
  const bool head_cache = group * head_words * static_cast<int64_t>(sizeof(uint32_t)) <= kBwdHeadCacheBytes;
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t f_k2 = static_cast<int64_t>(D2) * BK, f_kk = static_cast<int64_t>(BK / 2) * Dp,
                  f_td = static_cast<int64_t>(BQ) * D2, f_tr = static_cast<int64_t>(BQ / 2) * Dp,
                  f_s = static_cast<int64_t>(BQ) * BK, f_acc = static_cast<int64_t>(BK) * Dp;
    // 4-byte words: float tiles and uint32 pair tiles alike
    Buffer buf(2 * f_k2 + f_kk + 2 * (f_td + f_tr) + 3 * f_s + 3 * f_s / 2 + 2 * f_acc + 2 * BQ);
    Buffer hbuf(head_cache ? group * head_words : 1);
    std::vector<char> packed(head_cache ? group * sq_cap / BQ : 0);
    uint32_t* k2 = reinterpret_cast<uint32_t*>(buf.ptr);  // K  [d pair][BK]
    uint32_t* v2 = k2 + f_k2;                              // V  [d pair][BK]
    uint32_t* kk = v2 + f_k2;                              // K  [key pair][Dp]
    uint32_t* tqd = kk + f_kk;                             // Q  [BQ][D2] (no head cache)
    uint32_t* tgd = tqd + f_td;                            // dO [BQ][D2]
    uint32_t* tqr = tgd + f_td;                            // Q  [row pair][Dp]
    uint32_t* tgr = tqr + f_tr;                            // dO [row pair][Dp]
    float* s = reinterpret_cast<float*>(tgr + f_tr);       // S -> P [BQ][BK]
    float* dp = s + f_s;                                   // dP -> dS [BQ][BK]
    float* dsc = dp + f_s;                                 // 1 - tanh^2 [BQ][BK] (softcap)
    uint32_t* p2 = reinterpret_cast<uint32_t*>(dsc + f_s);  // P  [row pair][BK]
    uint32_t* ds2 = p2 + f_s / 2;                           // dS [row pair][BK]
    uint32_t* dsk = ds2 + f_s / 2;                          // dS [BQ][key pair]
    float* dk_acc = reinterpret_cast<float*>(dsk + f_s / 2);  // [BK][Dp]
    float* dv_acc = dk_acc + f_acc;
    float* lse_r = dv_acc + f_acc;
    float* d_r = lse_r + BQ;
    bwd_key_tiles<bf16_t>(p, nc, begin, end, Dp, dk_acc, dv_acc, p.softmax_scale, [&] {
      if (head_cache) std::fill(packed.begin(), packed.end(), 0);
    }, [&](const BwdTask<bf16_t>& tk, int64_t j0, int kn, QueryRange seen) {
      const Seq& sq = tk.sq;
      const int b = tk.b;
      const int64_t qlo = seen.lo, qhi = seen.hi;
      pack_pairs(tk.kb + j0 * p.k_row_stride, p.k_row_stride, kn, BK, D, k2, 1, BK);
      pack_pairs(tk.vb + j0 * p.v_row_stride, p.v_row_stride, kn, BK, D, v2, 1, BK);
      pack_v_pairs(tk.kb + j0 * p.k_row_stride, p.k_row_stride, kn, D, Dp, kk);
      for (int hh = 0; hh < group; ++hh) {
        const int h = tk.kvh * group + hh;
        const bf16_t* qb = Q + b * p.q_batch_stride + sq.q_row0 * p.q_row_stride + h * p.q_head_stride;
        const bf16_t* gb = dO + b * p.do_batch_stride + sq.q_row0 * p.do_row_stride + h * p.do_head_stride;
        const float* lseb = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + sq.q_row0;
        const float* db = w.Dsum + h * rows + tk.q_base_row;
        float* dqa = w.dq_acc + ((static_cast<int64_t>(tk.c) * p.heads + h) * rows + tk.q_base_row) * Dw;
        // the query tiles start at multiples of BQ (qlo rounded down): cached tiles line up, and
        // rows before qlo see none of this key tile (masked below like any invisible entry)
        for (int64_t i0 = qlo / BQ * BQ; i0 < qhi; i0 += BQ) {
          const int tn = static_cast<int>(std::min<int64_t>(BQ, sq.sq - i0));  // rows of the tile
          const int mq = static_cast<int>(std::min<int64_t>(tn, qhi - i0));     // rows it needs here
          // the tile's Q and dO in both layouts: in the head cache (packed on first use) or per tile
          uint32_t *qd = tqd, *gd = tgd, *qr = tqr, *gr = tgr;
          bool pack = true;
          if (head_cache) {
            uint32_t* hq = reinterpret_cast<uint32_t*>(hbuf.ptr) + hh * head_words;  // [sq_cap][D2] Q, dO,
            qd = hq + i0 * D2;                                                          // then [sq_cap / 2][Dp]
            gd = hq + f_hd + i0 * D2;                                                   // Q, dO
            qr = hq + 2 * f_hd + i0 / 2 * Dp;
            gr = hq + 2 * f_hd + f_hr + i0 / 2 * Dp;
            char& pk = packed[hh * (sq_cap / BQ) + i0 / BQ];
            pack = !pk;
            pk = 1;
          }
          if (pack) {
            const int n = head_cache ? tn : mq;  // the cache holds whole tiles for later key tiles
            pack_q_pairs(qb + i0 * p.q_row_stride, p.q_row_stride, n, n, D, qd);
            pack_q_pairs(gb + i0 * p.do_row_stride, p.do_row_stride, n, n, D, gd);
            pack_v_pairs(qb + i0 * p.q_row_stride, p.q_row_stride, n, D, Dp, qr);
            pack_v_pairs(gb + i0 * p.do_row_stride, p.do_row_stride, n, D, Dp, gr);
          }
          for (int r = 0; r < mq; ++r) {
            lse_r[r] = lseb[i0 + r];
            d_r[r] = db[i0 + r];
          }
          gemm_dp<0>(mq, BK / W, D2, qd, D2, 1, k2, BK, s, BK);  // S = Q K^T (unscaled)
          gemm_dp<0>(mq, BK / W, D2, gd, D2, 1, v2, BK, dp, BK);  // dP = dO V^T
          const bool unmasked = attention_tile_unmasked(i0, i0 + mq, j0, j0 + kn, sq.sq, sq.sk, wl, wr);
          // P = exp(scale S - lse), dS = P (dP - D) (times 1 - tanh^2 under softcap); zero outside
          // each row's visible columns, which include the key columns kn .. BK of a last tile.
          for (int r = 0; r < mq; ++r) {
            float* sr = s + static_cast<int64_t>(r) * BK;
            float* dpr = dp + static_cast<int64_t>(r) * BK;
            const float* dcr = dsc + static_cast<int64_t>(r) * BK;
            const Cols cc = visible_cols(unmasked, i0 + r, j0, kn, sq.sq, sq.sk, wl, wr);
            const float lz = lse_r[r];
            const bool none = lz == kNegInf || cc.a >= cc.b;
            if (!none && cap > 0.0f) {
              for (int v = 0; v < BK / W; ++v) _mm512_storeu_ps(sr + v * W, _mm512_mul_ps(_mm512_loadu_ps(sr + v * W), vscale));
              apply_softcap(sr, kn, cap, dsc + static_cast<int64_t>(r) * BK);
            }
            const __m512 vl = _mm512_set1_ps(lz), vd = _mm512_set1_ps(d_r[r]);
#pragma GCC unroll 4
            for (int v = 0; v < BK / W; ++v) {
              const __mmask16 vis = none ? 0 : lane_range_mask(cc.a - v * W, cc.b - v * W);
              __m512 pv = _mm512_setzero_ps(), ds = _mm512_setzero_ps();
              if (vis) {
                __m512 y = _mm512_loadu_ps(sr + v * W);
                if (cap <= 0.0f) y = _mm512_mul_ps(y, vscale);
                pv = _mm512_maskz_mov_ps(vis, exp_sm(Vec(_mm512_sub_ps(y, vl))).v);
                ds = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpr + v * W), vd));
                // dsc holds 1 - tanh^2 for the columns below kn only: the others are masked after the
                // product (0 times an unset lane could be NaN)
                if (cap > 0.0f) ds = _mm512_maskz_mul_ps(vis, ds, _mm512_loadu_ps(dcr + v * W));
              }
              _mm512_storeu_ps(sr + v * W, pv);
              _mm512_storeu_ps(dpr + v * W, ds);
            }
            // dS rounded to bf16 pairs of keys, in key order
            uint32_t* dkr = dsk + static_cast<int64_t>(r) * (BK / 2);
#pragma GCC unroll 2
            for (int v = 0; v < BK / W; v += 2) {
              const __m512bh bh = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(dpr + (v + 1) * W), _mm512_loadu_ps(dpr + v * W));
              __m512i wv;
              std::memcpy(&wv, &bh, sizeof(wv));
              _mm512_storeu_si512(dkr + v / 2 * W, wv);
            }
          }
          // P and dS rounded to bf16 pairs of rows (2rp, 2rp + 1; an odd tile's last pair completed with 0)
          const int mp = (mq + 1) / 2;
          for (int rp = 0; rp < mp; ++rp) {
            const int r0 = 2 * rp;
            const bool has1 = r0 + 1 < mq;
            for (int v = 0; v < BK / W; ++v) {
              const int64_t o0 = static_cast<int64_t>(r0) * BK + v * W, o1 = o0 + BK;
              const __m512 p0 = _mm512_loadu_ps(s + o0), p1 = has1 ? _mm512_loadu_ps(s + o1) : _mm512_setzero_ps();
              const __m512 d0 = _mm512_loadu_ps(dp + o0), d1 = has1 ? _mm512_loadu_ps(dp + o1) : _mm512_setzero_ps();
              _mm512_storeu_si512(p2 + static_cast<int64_t>(rp) * BK + v * W, interleave_bf16(p0, p1));
              _mm512_storeu_si512(ds2 + static_cast<int64_t>(rp) * BK + v * W, interleave_bf16(d0, d1));
            }
          }
          gemm_dp<1>(kn, NV, mp, p2, 1, BK, gr, Dp, dv_acc, Dp);                  // dV += P^T dO
          gemm_dp<1>(mq, NV, (kn + 1) / 2, dsk, BK / 2, 1, kk, Dp, dqa + i0 * Dw, Dw);  // dQ += dS K (unscaled)
          gemm_dp<1>(kn, NV, mp, ds2, 1, BK, qr, Dp, dk_acc, Dp);                 // dK += dS^T Q (unscaled)
        }
      }
    });
  });

  bwd_dq_out<bf16_t>(p, w);
}
#endif  // THRIFTY_AVX512_BF16

}  // namespace

void flash_attention_fwd_cpu(const AttentionParams& p) {
  if (p.seqlen_q <= kAttnCpuDecodeRows) {  // seqlen_q: the longest sequence's under varlen
    switch (p.dtype) {
      case DType::f32: return fwd_decode<float>(p);
      case DType::bf16: return fwd_decode<bf16_t>(p);
      case DType::f16: return fwd_decode<f16_t>(p);
    }
  }
  switch (p.dtype) {
    case DType::f32: return fwd<float>(p);
    case DType::bf16:
#if defined(THRIFTY_AVX512_BF16)
      if (cpu_use_bf16_dot()) return fwd_bf16_dot(p);
#endif
      return fwd<bf16_t>(p);
    case DType::f16: return fwd<f16_t>(p);
  }
}

void flash_attention_bwd_cpu(const AttentionBwdParams& p) {
  switch (p.dtype) {
    case DType::f32: return bwd<float>(p);
    case DType::bf16:
#if defined(THRIFTY_AVX512_BF16)
      if (cpu_use_bf16_dot()) return bwd_bf16_dot(p);
#endif
      return bwd<bf16_t>(p);
    case DType::f16: return bwd<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
