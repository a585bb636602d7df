// W8A16 / W4A16 linear on the CPU: y = x @ dequant(W).T (+ bias); compiled once per ISA level.
//
// GEMV path (M <= 8): each thread takes blocks of R output rows and streams their packed
// weights exactly once (one contiguous stream per row), dequantizing in registers:
//   W4: per group g, acc_g = sum_k x[k] * q[k] (nibbles turned to float) in a vector register, then
//       tot += s[g] * acc_g (one broadcast FMA per group, no horizontal sum), and at the end of the row
//       y = hsum(tot) - sum_g s[g] * z[g] * sum_{k in g} x[k]   (zero points applied once per row).
//       x is reordered per block of 2W k (even k first, then odd k) to match the nibbles.
//   W8: y = s * sum_k x[k] * q[k].
// GEMM path (M > 8): tiles of MB rows x NB columns; per KB-deep slice the weight panel is
// dequantized to float32 row by row with vector ops (NB rows of KB, 128 KB: stays in L2; W4 rows
// in the same even/odd order as x) and an MR x NR micro-kernel of vector dot products (MR * NR
// accumulators, reduced once per panel) multiplies it by x. The panel holds exactly dequant(W) =
// (q - z) * s rounded to float32, the values quant_dequantize returns.
// bf16 x at avx512_bf16 where cpu_use_bf16_dot(): the W4 GEMV and the W4/W8 GEMM multiply exact bf16
// images of the weights with VDPBF16PS instead (gemv_w4_dot, gemm_dot).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "cpu/quant/qvec.h"
#include "cpu/quant/quant_kernels.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;
constexpr int64_t kGemvMaxM = 8;
constexpr int NR = 4;       // micro-tile columns (dot products)
constexpr int MR = 2;       // micro-tile rows
constexpr int64_t NB = 64;  // panel columns (a multiple of NR)
constexpr int64_t KB = 512; // panel depth (a multiple of 32)
constexpr int64_t MB = 192; // rows of x per tile (a multiple of MR)

THRIFTY_INLINE float load_any(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return to_float(static_cast<const bf16_t*>(p)[i]);
    default: return to_float(static_cast<const f16_t*>(p)[i]);
  }
}
THRIFTY_INLINE void store_any(void* p, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<bf16_t*>(p)[i] = from_float<bf16_t>(v); break;
    default: static_cast<f16_t*>(p)[i] = from_float<f16_t>(v); break;
  }
}

// bf16 elements between rows of x when xbuf holds bf16 copies (the dot GEMV's even/odd split, K a multiple
// of 64): K + 64, so that rows 4 KiB multiples apart (K = 4096: 8 KiB) do not all map to the same L1 sets.
// Fits: xbuf has xbuf_stride >= K floats per row, room for 2K >= K + 64 bf16.
THRIFTY_INLINE int64_t xbuf_bf16_row(const QuantLinearParams& p) { return p.K + 64; }

// Whether the W4 dot GEMV decodes 64 k at a time (gemv_w4_dot's B64): the one rule for both the GEMV and
// the even/odd copy of x it reads (group_sums_bf16's split64), so the two cannot disagree.
THRIFTY_INLINE bool w4_dot_b64(const QuantLinearParams& p) { return p.group_size % 64 == 0; }

// x (M, K) any float type -> xbuf (M, K) float32; `interleave`: per block of 2W, even k then odd k.
template <typename T>
void prep_x(const QuantLinearParams& p, bool interleave) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const T* xr = x + m * p.x_stride;
      float* d = p.xbuf + m * p.xbuf_stride;
      for (int64_t k = K; k < p.xbuf_stride; ++k) d[k] = 0.0f;
      if (!interleave) {
        int64_t k = 0;
        for (; k + W <= K; k += W) Vec::load(xr + k).store(d + k);
        for (; k < K; ++k) d[k] = to_float(xr[k]);
      } else {
        for (int64_t k = 0; k < K; k += 2 * W)
          for (int j = 0; j < W; ++j) {
            d[k + j] = to_float(xr[k + 2 * j]);
            d[k + W + j] = to_float(xr[k + 2 * j + 1]);
          }
        const int64_t G = p.group_size, ng = K / G;
        for (int64_t g = 0; g < ng; ++g) {
          Vec a = Vec::zero();
          for (int64_t k = g * G; k < (g + 1) * G; k += W) a = a + Vec::load(d + k);
          p.xsum[m * ng + g] = a.reduce_add();
        }
      }
    }
  });
}

// x's per-group sums (xsum) straight from bf16 x, in k order: what the VDPBF16PS W4 paths need besides x.
// split64: also x's rows into xbuf (as bf16, xbuf_bf16_row apart) with each 64-k block's even elements
// first, then its odd ones: the pair order of gemv_w4_dot's 64-k decode (see there).
void group_sums_bf16(const QuantLinearParams& p, bool split64) {
  const bf16_t* x = static_cast<const bf16_t*>(p.x);
  const int64_t K = p.K, G = p.group_size, ng = K / G;  // G: a multiple of 32
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const bf16_t* xr = x + m * p.x_stride;
      for (int64_t g = 0; g < ng; ++g) {
        Vec a = Vec::zero();
        for (int64_t k = g * G; k < (g + 1) * G; k += W) a = a + Vec::load(xr + k);
        p.xsum[m * ng + g] = a.reduce_add();
      }
#if defined(THRIFTY_AVX512_BF16)
      if (split64) {
        alignas(64) static constexpr uint16_t kEven[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                           22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                           44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
        const __m512i even = _mm512_load_si512(kEven), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
        bf16_t* d = reinterpret_cast<bf16_t*>(p.xbuf) + m * xbuf_bf16_row(p);
        for (int64_t k = 0; k < K; k += 64) {  // K: a multiple of G, itself of 64 here
          const __m512i a = _mm512_loadu_si512(xr + k), c = _mm512_loadu_si512(xr + k + 32);
          _mm512_storeu_si512(d + k, _mm512_permutex2var_epi16(a, even, c));
          _mm512_storeu_si512(d + k + 32, _mm512_permutex2var_epi16(a, odd, c));
        }
      }
#else
      (void)split64;
#endif
    }
  });
}

// GEMV prefetch: each pass over a cache line of a weight row also prefetches (into L2) the line at the
// same offset in the next block of R rows, the block this thread reads next (rows are contiguous, so
// this reaches the next rows' pages before the hardware stream prefetcher could; K=4096 int8 rows are
// exactly one 4 KiB page). Single-thread it is worth 1.3-1.5x for both W4 and W8 on weights that do
// not fit the caches. Hints only: addresses past the end of the weights are harmless.
THRIFTY_INLINE void prefetch_l2(const void* a) { __builtin_prefetch(a, 0, 2); }

THRIFTY_INLINE void finish(const QuantLinearParams& p, int64_t m, int64_t n, float v) {
  if (p.bias != nullptr) v += load_any(p.bias, n, p.bias_dtype);
  store_any(p.y, m * p.N + n, v, p.dtype);
}

// ---------------- GEMV ----------------
// The R weight rows n0.. of a W4 GEMV block (packed nibbles, group scales and zeros), and its end:
// y[m][n0 + r] = hsum(tot[m][r]) - sum_g s[g] * (z[g] + zoff) * xsum[m][g] (zoff: the dot path's 128).
template <int R>
struct W4Rows {
  const uint8_t* q[R];
  const float *s[R], *z[R];
  int64_t ng;
  THRIFTY_INLINE W4Rows(const QuantLinearParams& p, int64_t n0) : ng(p.K / p.group_size) {
    for (int r = 0; r < R; ++r) {
      q[r] = static_cast<const uint8_t*>(p.qweight) + (n0 + r) * (p.K / 2);
      s[r] = p.scales + (n0 + r) * ng;
      z[r] = p.zeros + (n0 + r) * ng;
    }
  }
  // Each cache line of group g in these rows: the same line of the next block of R rows (prefetch_l2).
  THRIFTY_INLINE void prefetch_next_block(int64_t g, int64_t G) const {
    for (int64_t b = (g * G / 2 + 63) / 64 * 64; b < (g + 1) * G / 2; b += 64)
      for (int r = 0; r < R; ++r) prefetch_l2(q[r] + b + R * (ng * G) / 2);
  }
  template <int MT>
  THRIFTY_INLINE void write_out(const QuantLinearParams& p, int64_t n0, int64_t m0, const Vec (&tot)[MT][R],
                                float zoff) const {
    // the correction in vector form, W groups at a time, taken off tot before its one horizontal sum
    for (int r = 0; r < R; ++r) {
      Vec c[MT];
      for (int m = 0; m < MT; ++m) c[m] = Vec::zero();
      for (int64_t g = 0; g < ng; g += W) {
        const int n = static_cast<int>(ng - g < W ? ng - g : W);
        const Vec sz = (Vec::load(z[r] + g, n) + Vec::set1(zoff)) * Vec::load(s[r] + g, n);
        for (int m = 0; m < MT; ++m) c[m] = fma(sz, Vec::load(p.xsum + (m0 + m) * ng + g, n), c[m]);
      }
      for (int m = 0; m < MT; ++m) finish(p, m0 + m, n0 + r, (tot[m][r] - c[m]).reduce_add());
    }
  }
};

template <int MT, int R>
THRIFTY_INLINE void gemv_w4(const QuantLinearParams& p, int64_t n0, int64_t m0, bool pf) {
  constexpr bool TWO = MT * R * 2 <= 8;  // separate accumulators for low and high nibbles
  const int64_t K = p.K, G = p.group_size, ng = K / G;
  const W4Rows<R> w4(p, n0);
  const uint8_t* const* q = w4.q;
  const float* const* s = w4.s;
  // tot = sum_g s[g] * acc_g kept in vector form (one broadcast FMA per group, no per-group reduction);
  // the zero points are applied once at the end: - sum_g s[g] * z[g] * xsum[g].
  Vec tot[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) tot[m][r] = Vec::zero();
  for (int64_t g = 0; g < ng; ++g) {
    Vec alo[MT][R], ahi[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) alo[m][r] = ahi[m][r] = Vec::zero();
    if (pf) w4.prefetch_next_block(g, G);
    for (int64_t k = g * G; k < (g + 1) * G; k += 2 * W) {
      for (int r = 0; r < R; ++r) {
        Vec lo, hi;
        nibbles(q[r] + k / 2, lo, hi);
        for (int m = 0; m < MT; ++m) {
          const float* xm = p.xbuf + (m0 + m) * p.xbuf_stride + k;
          if (TWO) {
            alo[m][r] = fma(Vec::load(xm), lo, alo[m][r]);
            ahi[m][r] = fma(Vec::load(xm + W), hi, ahi[m][r]);
          } else {
            alo[m][r] = fma(Vec::load(xm + W), hi, fma(Vec::load(xm), lo, alo[m][r]));
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const Vec sv = Vec::set1(s[r][g]);
      for (int m = 0; m < MT; ++m) tot[m][r] = fma(TWO ? alo[m][r] + ahi[m][r] : alo[m][r], sv, tot[m][r]);
    }
  }
  w4.write_out(p, n0, m0, tot, 0.0f);
}

template <int MT, int R>
THRIFTY_INLINE void gemv_w8(const QuantLinearParams& p, int64_t n0, int64_t m0, bool pf) {
  constexpr bool TWO = MT * R * 2 <= 8;
  const int64_t K = p.K;
  const int8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = static_cast<const int8_t*>(p.qweight) + (n0 + r) * K;
  Vec a0[MT][R], a1[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) a0[m][r] = a1[m][r] = Vec::zero();
  auto step = [&](int64_t k) {
    for (int r = 0; r < R; ++r) {
      const Vec w0 = load_i8f(q[r] + k), w1 = load_i8f(q[r] + k + W);
      for (int m = 0; m < MT; ++m) {
        const float* xm = p.xbuf + (m0 + m) * p.xbuf_stride + k;
        if (TWO) {
          a0[m][r] = fma(Vec::load(xm), w0, a0[m][r]);
          a1[m][r] = fma(Vec::load(xm + W), w1, a1[m][r]);
        } else {
          a0[m][r] = fma(Vec::load(xm + W), w1, fma(Vec::load(xm), w0, a0[m][r]));
        }
      }
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // one cache line of each row per pass
    if (pf)
      for (int r = 0; r < R; ++r) prefetch_l2(q[r] + k + R * K);
    for (int j = 0; j < 64; j += 2 * W) step(k + j);
  }
  for (; k + 2 * W <= K; k += 2 * W) step(k);
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float t = TWO ? (a0[m][r] + a1[m][r]).reduce_add() : a0[m][r].reduce_add();
      const float* xm = p.xbuf + (m0 + m) * p.xbuf_stride;
      for (int64_t kk = k; kk < K; ++kk) t += xm[kk] * static_cast<float>(q[r][kk]);
      finish(p, m0 + m, n0 + r, t * p.scales[n0 + r]);
    }
}

#if defined(THRIFTY_AVX512_BF16)
// W4 GEMV for bf16 x on VDPBF16PS (avx512_bf16, where cpu_use_bf16_dot()): a byte of the row holds the
// nibbles of k = 2i, 2i+1, the same pair order as x's own bf16 pairs, so x is read as it is and each
// byte becomes a bf16 pair (128 + lo, 128 + hi) by OR-ing the nibbles into the mantissa of 128.0
// (0x4300): 4 integer ops and one VDPBF16PS per 32 weights, where the float path widens two vectors of
// nibbles to float and runs two FMAs. The products are exact in float32; the 128 offset joins the
// zero point in the per-row correction, y = hsum(tot) - sum_g s[g] * (z[g] + 128) * xsum[g].
//
// B64 (groups of a multiple of 64, x split by group_sums_bf16): 64 k at a time from 32 bytes, 4 integer ops
// instead of 8: the bytes widened to 16-bit words (b_i in word i), then (b & 15) | 0x4300 and
// (b >> 4) | 0x4300 in place. 32-bit lane j then holds the pairs (w[4j], w[4j+2]) and (w[4j+1], w[4j+3]),
// whose x pairs are the block's even and odd elements: what the split copy of x holds. On a Zen 4 (best of
// 6 windows, alternating builds, K4096 N14336 and K14336 N4096): M = 1 ~1.05 -> ~0.70 ms (the GEMV was
// bound by vector-op issue, not memory: 33 GB/s from L3 as from DRAM), M = 2 1.4 -> 1.0, M = 4 1.8 -> 1.65,
// M = 8 3.3 -> 3.15.
template <int MT, int R, bool B64>
THRIFTY_INLINE void gemv_w4_dot(const QuantLinearParams& p, int64_t n0, int64_t m0, bool pf) {
  constexpr bool TWO = MT * R <= 4;  // two accumulator chains per (row, column) for VDPBF16PS latency
  const int64_t K = p.K, G = p.group_size, ng = K / G;
  const W4Rows<R> w4(p, n0);
  const uint8_t* const* q = w4.q;
  const float* const* s = w4.s;
  const __m512i nib = _mm512_set1_epi32(0x000F000F), b128 = _mm512_set1_epi32(0x43004300);
  Vec tot[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) tot[m][r] = Vec::zero();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 a0[MT][R], a1[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) a0[m][r] = a1[m][r] = _mm512_setzero_ps();
    if (pf) w4.prefetch_next_block(g, G);
    if constexpr (B64) {
      const __m512i lo15 = _mm512_set1_epi16(0x000F), b128w = _mm512_set1_epi16(0x4300);
      const bf16_t* xs = reinterpret_cast<const bf16_t*>(p.xbuf) + m0 * xbuf_bf16_row(p);
      for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
        __m512i b[R];
        __m512bh w[R];
        for (int r = 0; r < R; ++r)
          b[r] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + k / 2)));
        // the low nibbles against the even x, then the high ones against the odd x: one set of decoded
        // weights live at a time (with both, 8 rows of x ran out of registers and slowed)
        for (int h = 0; h < 2; ++h) {
          for (int r = 0; r < R; ++r) {
            const __m512i v = h == 0 ? _mm512_ternarylogic_epi32(b[r], lo15, b128w, 0xEA)  // (b & 15) | 0x4300
                                     : _mm512_or_si512(_mm512_srli_epi16(b[r], 4), b128w);
            std::memcpy(&w[r], &v, sizeof(v));
          }
          for (int m = 0; m < MT; ++m) {
            const __m512i xv = _mm512_loadu_si512(xs + m * xbuf_bf16_row(p) + k + 32 * h);
            __m512bh xb;
            std::memcpy(&xb, &xv, sizeof(xb));
            for (int r = 0; r < R; ++r) {
              if (TWO && h == 1) a1[m][r] = _mm512_dpbf16_ps(a1[m][r], xb, w[r]);
              else a0[m][r] = _mm512_dpbf16_ps(a0[m][r], xb, w[r]);
            }
          }
        }
      }
    } else {
      for (int64_t k = g * G; k < (g + 1) * G; k += 2 * W) {
        const bool odd = TWO && ((k - g * G) / (2 * W)) % 2 == 1;
        __m512bh wb[R];
        for (int r = 0; r < R; ++r) {
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + k / 2)));
          // (d | d << 12) holds lo in bits 0-3 and hi in bits 16-19; (t & nib) | b128 in one ternary-logic op
          const __m512i t = _mm512_or_si512(d, _mm512_slli_epi32(d, 12));
          const __m512i wv = _mm512_ternarylogic_epi32(t, nib, b128, 0xEA);
          std::memcpy(&wb[r], &wv, sizeof(wb[r]));
        }
        // x row outer: each 64-byte x load (from L2 for long rows: 8 rows of K = 14336 are 224 KiB) serves
        // the R weight rows; with the row loop outer the compiler reloaded x for every weight row.
        for (int m = 0; m < MT; ++m) {
          const bf16_t* xm = static_cast<const bf16_t*>(p.x) + (m0 + m) * p.x_stride + k;
          const __m512i xv = _mm512_loadu_si512(xm);
          __m512bh xb;
          std::memcpy(&xb, &xv, sizeof(xb));
          for (int r = 0; r < R; ++r) {
            if (odd) a1[m][r] = _mm512_dpbf16_ps(a1[m][r], xb, wb[r]);
            else a0[m][r] = _mm512_dpbf16_ps(a0[m][r], xb, wb[r]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const Vec sv = Vec::set1(s[r][g]);
      for (int m = 0; m < MT; ++m)
        tot[m][r] = fma(TWO ? Vec(_mm512_add_ps(a0[m][r], a1[m][r])) : Vec(a0[m][r]), sv, tot[m][r]);
    }
  }
  w4.write_out(p, n0, m0, tot, 128.0f);
}
#endif

// Rows m0 .. m0 + MT - 1 of x against weight rows n0 .. n0 + R - 1. More than 4 rows of x are done
// in two passes over the same R weight rows (the second pass reads them from L1/L2): x comes from
// L2 (8 rows of K=4096 floats are 128 KiB), and with MT x rows against 1 weight row it costs 4 * MT
// bytes of L2 traffic per weight, 4 * MT / R with R rows sharing each x load.
// dot: the W4 rows take gemv_w4_dot (bf16 x at avx512_bf16, see there).
template <int MT, int R>
THRIFTY_INLINE void gemv_rows_part(const QuantLinearParams& p, int64_t n0, int64_t m0, bool pf, bool dot) {
#if defined(THRIFTY_AVX512_BF16)
  if (dot) {
    if (w4_dot_b64(p)) return gemv_w4_dot<MT, R, true>(p, n0, m0, pf);
    return gemv_w4_dot<MT, R, false>(p, n0, m0, pf);
  }
#else
  (void)dot;
#endif
  if (p.bits == 4) gemv_w4<MT, R>(p, n0, m0, pf); else gemv_w8<MT, R>(p, n0, m0, pf);
}

template <int MT, int R>
THRIFTY_INLINE void gemv_rows(const QuantLinearParams& p, int64_t n0, bool dot) {
  if (dot) return gemv_rows_part<MT, R>(p, n0, 0, true, dot);
  constexpr int MA = MT <= 4 ? MT : (MT + 1) / 2;
  gemv_rows_part<MA, R>(p, n0, 0, true, dot);
  if constexpr (MA < MT) gemv_rows_part<MT - MA, R>(p, n0, MA, false, dot);
}

template <int MT, int R>
void gemv_blocks(const QuantLinearParams& p, bool dot) {
  const int64_t N = p.N, nblk = N / R;
  parallel_for(0, nblk + (N % R), 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < nblk) gemv_rows<MT, R>(p, i * R, dot);
      else gemv_rows<MT, 1>(p, nblk * R + (i - nblk), dot);
    }
  });
}

// Weight rows per block: 4 for one row of x; else 2, or 3 for W8 at AVX-512 (its x loads then serve 3
// rows; measured 1.25-1.5x at M = 4..8 on a Zen 4, where the W4 paths ran no faster with 3).
template <int MT>
void gemv(const QuantLinearParams& p, bool dot) {
  if constexpr (MT == 1) return gemv_blocks<1, 4>(p, dot);
  if (W == 16 && p.bits == 8) return gemv_blocks<MT, 3>(p, dot);
  gemv_blocks<MT, 2>(p, dot);
}

// ---------------- GEMM ----------------
// bpack[j][0..kwp) = dequant(W)[n0 + j][k0 .. k0 + kw) (W4: per block of 2W, even k then odd k, as x),
// zero past kw (up to kwp = round_up(kw, W)) and for nw <= j < NB.
void pack_panel(const QuantLinearParams& p, int64_t n0, int64_t nw, int64_t k0, int64_t kw, int64_t kwp,
                float* bpack) {
  const int64_t K = p.K;
  for (int64_t j = nw; j < NB; ++j)
    for (int64_t k = 0; k < kwp; ++k) bpack[j * KB + k] = 0.0f;
  if (p.bits == 8) {
    for (int64_t j = 0; j < nw; ++j) {
      const int8_t* q = static_cast<const int8_t*>(p.qweight) + (n0 + j) * K + k0;
      float* d = bpack + j * KB;
      const Vec s = Vec::set1(p.scales[n0 + j]);
      int64_t k = 0;
      for (; k + W <= kw; k += W) (load_i8f(q + k) * s).store(d + k);
      for (; k < kw; ++k) d[k] = static_cast<float>(q[k]) * p.scales[n0 + j];
      for (; k < kwp; ++k) d[k] = 0.0f;
    }
    return;
  }
  const int64_t G = p.group_size, ng = K / G;
  for (int64_t j = 0; j < nw; ++j) {
    const uint8_t* q = static_cast<const uint8_t*>(p.qweight) + (n0 + j) * (K / 2);
    const float* s = p.scales + (n0 + j) * ng;
    const float* z = p.zeros + (n0 + j) * ng;
    float* d = bpack + j * KB;
    for (int64_t k = 0; k < kw; k += 2 * W) {  // kw is a multiple of 32 >= 2W
      const int64_t g = (k0 + k) / G;
      const Vec sv = Vec::set1(s[g]), zv = Vec::set1(z[g]);
      Vec lo, hi;
      nibbles(q + (k0 + k) / 2, lo, hi);
      ((lo - zv) * sv).store(d + k);
      ((hi - zv) * sv).store(d + k + W);
    }
  }
}

// c[m][j] += sum_k a[m][k] * b[j][k] for m < MR_, j < NR (kwp a multiple of W)
template <int MR_>
THRIFTY_INLINE void micro(const float* a, int64_t lda, const float* b, int64_t kwp, float* c) {
  Vec acc[MR_][NR];
  for (int m = 0; m < MR_; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = Vec::zero();
  for (int64_t k = 0; k < kwp; k += W) {
    Vec bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = Vec::load(b + j * KB + k);
    for (int m = 0; m < MR_; ++m) {
      const Vec av = Vec::load(a + m * lda + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = fma(av, bv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR_; ++m)
    for (int j = 0; j < NR; ++j) c[m * NB + j] += acc[m][j].reduce_add();
}

void gemm(const QuantLinearParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K, xs = p.xbuf_stride;
  const int64_t mt = (M + MB - 1) / MB, nt = (N + NB - 1) / NB;
  parallel_for(0, mt * nt, 1, [&](int64_t b, int64_t e) {
    float* bpack = new float[KB * NB];
    float* cbuf = new float[MB * NB];
    for (int64_t t = b; t < e; ++t) {
      const int64_t nb = t / mt, mb = t % mt;
      const int64_t n0 = nb * NB, nw = std::min(NB, N - n0);
      const int64_t m0 = mb * MB, mw = std::min(MB, M - m0);
      for (int64_t i = 0; i < mw * NB; ++i) cbuf[i] = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kw = std::min(KB, K - k0), kwp = (kw + W - 1) / W * W;
        pack_panel(p, n0, nw, k0, kw, kwp, bpack);
        const float* a0 = p.xbuf + m0 * xs + k0;
        int64_t i = 0;
        for (; i + MR <= mw; i += MR)
          for (int64_t j = 0; j < nw; j += NR) micro<MR>(a0 + i * xs, xs, bpack + j * KB, kwp, cbuf + i * NB + j);
        for (; i < mw; ++i)
          for (int64_t j = 0; j < nw; j += NR) micro<1>(a0 + i * xs, xs, bpack + j * KB, kwp, cbuf + i * NB + j);
      }
      for (int64_t i = 0; i < mw; ++i)
        for (int64_t j = 0; j < nw; ++j) finish(p, m0 + i, n0 + j, cbuf[i * NB + j]);
    }
    delete[] bpack;
    delete[] cbuf;
  });
}

#if defined(THRIFTY_AVX512_BF16)
// W4 and W8 GEMM for bf16 x on VDPBF16PS (avx512_bf16 where cpu_use_bf16_dot). Weight panels of 64
// columns x 256 k hold exact bf16 pairs, k-pair-major in two 32-column slices (bpack[slice][kp][32], packed
// through transpose16): W4 the pairs (128 + lo, 128 + hi) of gemv_w4_dot, W8 the int8 values themselves
// (exact in bf16). x is packed once into tiles of 6 rows, pair-interleaved (apack[tile][kp][6]): one
// sequential stream per tile instead of 6 rows whose K-strides (multiples of 4 KB for the usual K) map to
// the same L1 sets as each other and as the weight slice (W4/W8 M=64..256 on a Zen 4: 0.79-0.94x -> 0.84-1.00x
// torch bf16 matmul with the slice-major panel and the loop order below). The
// micro-kernel broadcasts a pair of x and runs 6 rows x 32 columns of VDPBF16PS. Each group's partial
// sums are scaled into a second register set as the group completes (tot += acc * s[g][columns]; W8: one
// group of K, per-column scales), added to cbuf once per panel; W4's zero points and 128 offset come off
// once at the end: y = cbuf - sum_g s (z + 128) xsum[g].
constexpr int64_t KB4 = 256;  // k per panel (128 pairs: a 32-column slice of it is 16 KB, L1)
constexpr int MR6 = 6;        // rows per micro-tile and per x tile
constexpr int64_t MB4 = 264;  // rows of x per block (44 tiles; a weight panel is packed once per block)

// apack[t][kp][r] = the bf16 pair (2kp, 2kp + 1) of x row 6t + r as one uint32; rows past M are zero.
void pack_x_tiles(const QuantLinearParams& p, uint32_t* apack) {
  const int64_t kp_n = p.K / 2, tiles = (p.M + MR6 - 1) / MR6;
  const bf16_t* x = static_cast<const bf16_t*>(p.x);  // rows may start at any bf16 (odd strides, offsets)
  parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      uint32_t* dst = apack + t * kp_n * MR6;
      for (int r = 0; r < MR6; ++r) {
        const int64_t m = t * MR6 + r;
        if (m < p.M) {
          const bf16_t* src = x + m * p.x_stride;
          for (int64_t kp = 0; kp < kp_n; ++kp) std::memcpy(dst + kp * MR6 + r, src + 2 * kp, 4);
        } else {
          for (int64_t kp = 0; kp < kp_n; ++kp) dst[kp * MR6 + r] = 0;
        }
      }
    }
  });
}

// Pairs kp < kw / 2 of the panel (kw a multiple of 32: whole 16 x 16 blocks); columns past nw are 0.
void pack_panel_dot(const QuantLinearParams& p, int64_t n0, int64_t nw, int64_t k0, int64_t kw, uint32_t* bpack) {
  const uint8_t* qw = static_cast<const uint8_t*>(p.qweight);
  const int64_t rowb = p.K / 2;
  const bool w8 = p.bits == 8;
  const __m512i nib = _mm512_set1_epi32(0x000F000F), b128 = _mm512_set1_epi32(0x43004300);
  for (int64_t j0 = 0; j0 < NB; j0 += 16)
    for (int64_t kp0 = 0; kp0 < kw / 2; kp0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        if (j0 + i >= nw) {
          r[i] = _mm512_setzero_si512();
        } else if (w8) {  // 32 int8 -> 32 bf16 (exact: |q| <= 128), in k order: pairs (2kp, 2kp + 1)
          const int8_t* q8 = static_cast<const int8_t*>(p.qweight) + (n0 + j0 + i) * p.K + k0 + 2 * kp0;
          const __m128i* q16 = reinterpret_cast<const __m128i*>(q8);
          const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q16)));
          const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q16 + 1)));
          const __m512bh bh = _mm512_cvtne2ps_pbh(f1, f0);
          std::memcpy(&r[i], &bh, sizeof(bh));
        } else {
          const __m512i d = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(qw + (n0 + j0 + i) * rowb + k0 / 2 + kp0)));
          r[i] = _mm512_ternarylogic_epi32(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), nib, b128, 0xEA);
        }
      }
      transpose16(r);
      uint32_t* dst = bpack + (j0 / 32) * (KB4 / 2 * 32) + j0 % 32;  // slice j0 / 32, columns j0 % 32 ..
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (kp0 + c) * 32, r[c]);
    }
}

// c[m][0..32) += sum over the groups g of the panel's pairs [0, kp_n) of s_g[0..32) * (apack pairs of row m .
// bpack slice [kp][0..32)), m < MR_. The first group ends at pair first_end, the others span g2 pairs;
// group g's scales are s + g * NB. Each group's sums are scaled into a second set of registers as they
// complete, so c is read and written once per panel, not once per group.
template <int MR_>
THRIFTY_INLINE void micro_dot(const uint32_t* a, const uint32_t* b, int64_t kp_n, int64_t first_end, int64_t g2,
                              const float* s, float* c) {
  __m512 tot[MR_][2];
  for (int m = 0; m < MR_; ++m) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kp_n; s += NB) {
    const int64_t e = std::min(kp_n, kp == 0 ? first_end : kp + g2);
    __m512 acc[MR_][2];
    for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (; kp < e; ++kp) {
      __m512bh b0, b1;
      const __m512i v0 = _mm512_loadu_si512(b + kp * 32), v1 = _mm512_loadu_si512(b + kp * 32 + 16);
      std::memcpy(&b0, &v0, sizeof(b0));
      std::memcpy(&b1, &v1, sizeof(b1));
      for (int m = 0; m < MR_; ++m) {
        const __m512i av = _mm512_set1_epi32(static_cast<int>(a[kp * MR6 + m]));
        __m512bh ab;
        std::memcpy(&ab, &av, sizeof(ab));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], ab, b0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], ab, b1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    for (int m = 0; m < MR_; ++m) {
      tot[m][0] = _mm512_fmadd_ps(acc[m][0], s0, tot[m][0]);
      tot[m][1] = _mm512_fmadd_ps(acc[m][1], s1, tot[m][1]);
    }
  }
  for (int m = 0; m < MR_; ++m) {
    _mm512_storeu_ps(c + m * NB, _mm512_add_ps(tot[m][0], _mm512_loadu_ps(c + m * NB)));
    _mm512_storeu_ps(c + m * NB + 16, _mm512_add_ps(tot[m][1], _mm512_loadu_ps(c + m * NB + 16)));
  }
}

void micro_dot_any(int mr, const uint32_t* a, const uint32_t* b, int64_t kp_n, int64_t first_end, int64_t g2,
                   const float* s, float* c) {
  switch (mr) {
    case 1: return micro_dot<1>(a, b, kp_n, first_end, g2, s, c);
    case 2: return micro_dot<2>(a, b, kp_n, first_end, g2, s, c);
    case 3: return micro_dot<3>(a, b, kp_n, first_end, g2, s, c);
    case 4: return micro_dot<4>(a, b, kp_n, first_end, g2, s, c);
    case 5: return micro_dot<5>(a, b, kp_n, first_end, g2, s, c);
    default: return micro_dot<6>(a, b, kp_n, first_end, g2, s, c);
  }
}

void gemm_dot(const QuantLinearParams& p) {
  static_assert(NB == 64 && MB4 % MR6 == 0, "two 32-column slices per panel; blocks of whole x tiles");
  const bool w8 = p.bits == 8;  // one scale per column, no zero point: one "group" of K
  const int64_t M = p.M, N = p.N, K = p.K, G = w8 ? K : p.group_size, ng = K / G;
  const int64_t mt = (M + MB4 - 1) / MB4, nt = (N + NB - 1) / NB;
  // uninitialised (pack_x_tiles writes every element): a vector's zero fill would be one more pass
  const std::unique_ptr<uint32_t[]> apack(new uint32_t[static_cast<size_t>((M + MR6 - 1) / MR6 * MR6 * (K / 2))]);
  pack_x_tiles(p, apack.get());
  parallel_for(0, mt * nt, 1, [&](int64_t b, int64_t e) {
    std::vector<uint32_t> bpack(KB4 / 2 * NB);
    std::vector<float> cbuf(MB4 * NB), sT(ng * NB), zT(ng * NB);
    for (int64_t t = b; t < e; ++t) {
      const int64_t nb = t / mt, mb = t % mt;
      const int64_t n0 = nb * NB, nw = std::min(NB, N - n0);
      const int64_t m0 = mb * MB4, mw = std::min(MB4, M - m0);
      for (int64_t g = 0; g < ng; ++g)  // per group, the panel's scales and s (z + 128) by column
        for (int64_t j = 0; j < NB; ++j) {
          const bool in = j < nw;
          const float sv = in ? p.scales[(n0 + j) * ng + g] : 0.0f;
          sT[g * NB + j] = sv;
          zT[g * NB + j] = in && !w8 ? sv * (p.zeros[(n0 + j) * ng + g] + 128.0f) : 0.0f;
        }
      std::fill(cbuf.begin(), cbuf.begin() + mw * NB, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += KB4) {
        const int64_t kw = std::min(KB4, K - k0);  // K is a multiple of 32: kw too
        pack_panel_dot(p, n0, nw, k0, kw, bpack.data());
        const int64_t g0 = k0 / G, first_end = ((g0 + 1) * G - k0) / 2;  // the panel's first group, its end
        for (int64_t j = 0; j < nw; j += 32)  // a 16 KB slice stays in L1 while the x rows pass
          for (int64_t i = 0; i < mw; i += MR6) {
            const int mr = static_cast<int>(std::min<int64_t>(MR6, mw - i));
            const uint32_t* a = apack.get() + ((m0 + i) * (K / 2) + k0 / 2 * MR6);  // tile (m0 + i) / 6 at k0
            micro_dot_any(mr, a, bpack.data() + j / 32 * (KB4 / 2 * 32), kw / 2, first_end, G / 2,
                          sT.data() + g0 * NB + j, cbuf.data() + i * NB + j);
          }
      }
      for (int64_t i = 0; i < mw; ++i) {
        const float* xs = w8 ? nullptr : p.xsum + (m0 + i) * ng;
        for (int64_t j = 0; j < nw; j += 16) {
          const int n = static_cast<int>(std::min<int64_t>(16, nw - j));
          Vec v = Vec::load(cbuf.data() + i * NB + j);
          if (!w8)
            for (int64_t g = 0; g < ng; ++g) v = v - Vec::set1(xs[g]) * Vec::load(zT.data() + g * NB + j);
          if (p.bias != nullptr) v = v + load_vec_any(p.bias, n0 + j, n, p.bias_dtype);
          v.store(static_cast<bf16_t*>(p.y) + (m0 + i) * p.N + n0 + j, n);
        }
      }
    }
  });
}
#endif

}  // namespace

void quant_linear_fwd(const QuantLinearParams& p) {
  const bool use_gemv = p.M <= kGemvMaxM;
  // The VDPBF16PS paths read bf16 x as it is: W4 needs only x's group sums (for the zero points), W8 nothing.
#if defined(THRIFTY_AVX512_BF16)
  const bool bf16_dot = p.dtype == DType::bf16 && cpu_use_bf16_dot();
  const bool dot_gemm = !use_gemv && bf16_dot && p.K % 32 == 0;  // W4: always; W8: whole 32-k blocks
  const bool dot = dot_gemm || (use_gemv && bf16_dot && p.bits == 4);
#else
  const bool dot_gemm = false, dot = false;
#endif
  if (dot) {
    if (p.bits == 4) group_sums_bf16(p, use_gemv && w4_dot_b64(p));
  } else {
    const bool interleave = p.bits == 4;  // GEMV and GEMM both read W4 rows in even/odd order
    switch (p.dtype) {
      case DType::f32: prep_x<float>(p, interleave); break;
      case DType::bf16: prep_x<bf16_t>(p, interleave); break;
      case DType::f16: prep_x<f16_t>(p, interleave); break;
    }
  }
#if defined(THRIFTY_AVX512_BF16)
  if (dot_gemm) return gemm_dot(p);
#endif
  if (!use_gemv) return gemm(p);
  switch (p.M) {
    case 1: return gemv<1>(p, dot);
    case 2: return gemv<2>(p, dot);
    case 3: return gemv<3>(p, dot);
    case 4: return gemv<4>(p, dot);
    case 5: return gemv<5>(p, dot);
    case 6: return gemv<6>(p, dot);
    case 7: return gemv<7>(p, dot);
    default: return gemv<8>(p, dot);
  }
}

void quant_dequantize(const DequantParams& p) {
  const int64_t K = p.K;
  parallel_for(0, p.N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* w = p.w + n * K;
      if (p.bits == 8) {
        const int8_t* q = static_cast<const int8_t*>(p.qweight) + n * K;
        const float s = p.scales[n];
        for (int64_t k = 0; k < K; ++k) w[k] = static_cast<float>(q[k]) * s;
      } else {
        const int64_t G = p.group_size, ng = K / G;
        const uint8_t* q = static_cast<const uint8_t*>(p.qweight) + n * (K / 2);
        for (int64_t k = 0; k < K; k += 2) {
          const int64_t g = k / G;
          const float s = p.scales[n * ng + g], z = p.zeros[n * ng + g];
          w[k] = (static_cast<float>(q[k / 2] & 15) - z) * s;
          w[k + 1] = (static_cast<float>(q[k / 2] >> 4) - z) * s;
        }
      }
    }
  });
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
