// W8A8 on the CPU: dynamic per-token int8 quantization and the int8 x int8 -> int32 linear;
// compiled once per ISA level.
//
// Integer products use the int16 multiply-add (vpmaddwd: two int8 products, widened to int16, summed
// exactly into each int32 lane; AVX-512 VNNI fuses the accumulate as vpdpwssd). Unlike the u8 x s8
// vpmaddubsw trick this is exact for every int8 value (-128 included) with no saturation.
// GEMV path (M <= 8): each output row of wq is streamed once. GEMM path: tiles of MB x NB, the
// weight panel re-laid out as int16 k-pairs (k-major, NB wide) in L2 and an MR x 2W register tile
// of int32 accumulators; x is widened to int16 once. Output = acc * x_scale[m] * w_scale[n] + bias.
// With AVX-512 VNNI (the avx512_bf16 level) the GEMM path multiplies u8 x s8 quads instead (gemm_u8).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/parallel.h"
#include "cpu/quant/qvec.h"
#include "cpu/quant/quant_kernels.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int IW = IVec::W;
constexpr int KI = 2 * IW;   // int8 elements per IVec in pair form
constexpr int64_t kGemvMaxM = 8;
constexpr int NR = 2 * IW;   // micro-tile columns
constexpr int MR = 6;
constexpr int64_t NB = 64;
constexpr int64_t KB = 512;  // a multiple of 2
constexpr int64_t MB = 192;

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

THRIFTY_INLINE void finish(const Int8LinearParams& p, int64_t m, int64_t n, int32_t acc) {
  float v = static_cast<float>(acc) * p.x_scales[m] * p.w_scales[n];
  if (p.bias != nullptr) v += load_any(p.bias, n, p.bias_dtype);
  store_any(p.y, m * p.N + n, v, p.out_dtype);
}

template <int MT, int R>
THRIFTY_INLINE void gemv_rows(const Int8LinearParams& p, int64_t n0) {
  const int64_t K = p.K;
  const int8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = p.wq + (n0 + r) * K;
  IVec acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = IVec::zero();
  int64_t k = 0;
  for (; k + KI <= K; k += KI) {
    for (int r = 0; r < R; ++r) {
      const IVec w = IVec::widen_i8(q[r] + k);
      for (int m = 0; m < MT; ++m) acc[m][r] = madd_add(acc[m][r], w, IVec::load_i16(p.xbuf + m * p.Kp + k));
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      int32_t t = acc[m][r].reduce_add();
      const int8_t* xm = p.xq + m * K;
      for (int64_t kk = k; kk < K; ++kk) t += static_cast<int32_t>(xm[kk]) * static_cast<int32_t>(q[r][kk]);
      finish(p, m, n0 + r, t);
    }
}

template <int MT>
void gemv(const Int8LinearParams& p) {
  constexpr int R = MT == 1 ? 4 : (MT == 2 ? 4 : (MT <= 4 ? 2 : 1));
  const int64_t N = p.N, nblk = N / R;
  parallel_for(0, nblk + (N % R), 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < nblk) gemv_rows<MT, R>(p, i * R);
      else gemv_rows<MT, 1>(p, nblk * R + (i - nblk));
    }
  });
}

// bpack[kp][j][0..1] = wq[n0 + j][k0 + 2kp + 0..1] (0 past K or past nw)
void pack_panel(const Int8LinearParams& p, int64_t n0, int64_t nw, int64_t k0, int64_t kw, int16_t* bpack) {
  const int64_t kp_n = (kw + 1) / 2;
  for (int64_t j = 0; j < NB; ++j) {
    if (j >= nw) {
      for (int64_t kp = 0; kp < kp_n; ++kp) bpack[(kp * NB + j) * 2] = bpack[(kp * NB + j) * 2 + 1] = 0;
      continue;
    }
    const int8_t* q = p.wq + (n0 + j) * p.K + k0;
    int64_t kp = 0;
    for (; 2 * kp + 1 < kw; ++kp) {
      bpack[(kp * NB + j) * 2] = q[2 * kp];
      bpack[(kp * NB + j) * 2 + 1] = q[2 * kp + 1];
    }
    if (kp < kp_n) {
      bpack[(kp * NB + j) * 2] = q[2 * kp];
      bpack[(kp * NB + j) * 2 + 1] = 0;
    }
  }
}

template <int MR_>
THRIFTY_INLINE void micro(const int16_t* a, int64_t lda, const int16_t* b, int64_t kp_n, int32_t* c) {
  IVec acc[MR_][2];
  for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = IVec::zero();
  for (int64_t kp = 0; kp < kp_n; ++kp) {
    const IVec b0 = IVec::load_i16(b + kp * NB * 2), b1 = IVec::load_i16(b + kp * NB * 2 + 2 * IW);
    for (int m = 0; m < MR_; ++m) {
      const IVec av = IVec::bcast_pair(a + m * lda + 2 * kp);
      acc[m][0] = madd_add(acc[m][0], av, b0);
      acc[m][1] = madd_add(acc[m][1], av, b1);
    }
  }
  for (int m = 0; m < MR_; ++m) {
    (IVec::load(c + m * NB) + acc[m][0]).store(c + m * NB);
    (IVec::load(c + m * NB + IW) + acc[m][1]).store(c + m * NB + IW);
  }
}

void micro_any(int mr, const int16_t* a, int64_t lda, const int16_t* b, int64_t kp_n, int32_t* c) {
  switch (mr) {
    case 1: return micro<1>(a, lda, b, kp_n, c);
    case 2: return micro<2>(a, lda, b, kp_n, c);
    case 3: return micro<3>(a, lda, b, kp_n, c);
    case 4: return micro<4>(a, lda, b, kp_n, c);
    case 5: return micro<5>(a, lda, b, kp_n, c);
    default: return micro<6>(a, lda, b, kp_n, c);
  }
}

void gemm(const Int8LinearParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t mt = (M + MB - 1) / MB, nt = (N + NB - 1) / NB;
  parallel_for(0, mt * nt, 1, [&](int64_t b, int64_t e) {
    int16_t* bpack = new int16_t[KB * NB];
    int32_t* cbuf = new int32_t[MB * NB];
    for (int64_t t = b; t < e; ++t) {
      const int64_t nb = t / mt, mb = t % mt;
      const int64_t n0 = nb * NB, nw = std::min(NB, N - n0);
      const int64_t m0 = mb * MB, mw = std::min(MB, M - m0);
      for (int64_t i = 0; i < mw * NB; ++i) cbuf[i] = 0;
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kw = std::min(KB, K - k0);
        pack_panel(p, n0, nw, k0, kw, bpack);
        const int64_t kp_n = (kw + 1) / 2;
        for (int64_t i = 0; i < mw; i += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, mw - i));
          for (int64_t j = 0; j < nw; j += NR)
            micro_any(mr, p.xbuf + (m0 + i) * p.Kp + k0, p.Kp, bpack + j * 2, kp_n, cbuf + i * NB + j);
        }
      }
      for (int64_t i = 0; i < mw; ++i)
        for (int64_t j = 0; j < nw; ++j) finish(p, m0 + i, n0 + j, cbuf[i * NB + j]);
    }
    delete[] bpack;
    delete[] cbuf;
  });
}

#if defined(THRIFTY_AVX512_VNNI)
// GEMM on VPDPBUSD (AVX-512 VNNI): four u8 x s8 products summed into each int32 lane, exact (each
// product fits 16 bits, no saturation in the non-"S" form), twice the multiply-adds per instruction
// of the int16 pairs above. x is shifted to unsigned, xu = xq + 128, so
//   sum_k xq[k] w[k] = sum_k xu[k] w[k] - 128 * sum_k w[k],
// with the weight rows' sums taken while packing (the shifted sums can pass 2^31 from K ~ 65k on; both
// wrap modulo 2^32 and their difference is exact wherever the true sum fits int32, as on the int16 path).
// Same tiling as gemm(); the panel holds 4-byte
// k-groups: bpack[kq][j][0..3] = wq[n0 + j][k0 + 4kq + 0..3]. x rows are bytes here (stride Kp,
// zero padded), in the scratch buffer of the int16 rows of the other paths.
constexpr int64_t MB8 = 256;  // rows per block: a weight panel is packed once per block of rows

// Packs columns [n0, n0 + nw) x k in [k0, k0 + kw) (0 past K or past nw); wsum[j] += those weights.
// Whole panels (64 columns, kw a multiple of 64) go 16 x 16 k-groups at a time through registers.
void pack_panel_u8(const Int8LinearParams& p, int64_t n0, int64_t nw, int64_t k0, int64_t kw, int8_t* bpack,
                   int32_t* wsum) {
  const int64_t kq_n = (kw + 3) / 4;
  if (nw == NB && kw % 64 == 0) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t j0 = 0; j0 < NB; j0 += 16) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t kq0 = 0; kq0 < kq_n; kq0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(p.wq + (n0 + j0 + i) * p.K + k0 + 4 * kq0);
        transpose16(r);
        for (int c = 0; c < 16; ++c) {
          _mm512_storeu_si512(bpack + ((kq0 + c) * NB + j0) * 4, r[c]);
          sum = _mm512_dpbusd_epi32(sum, ones, r[c]);
        }
      }
      _mm512_storeu_si512(wsum + j0, _mm512_add_epi32(_mm512_loadu_si512(wsum + j0), sum));
    }
    return;
  }
  for (int64_t j = 0; j < NB; ++j) {
    int8_t* d = bpack + j * 4;
    if (j >= nw) {
      for (int64_t kq = 0; kq < kq_n; ++kq) std::memset(d + kq * NB * 4, 0, 4);
      continue;
    }
    const int8_t* q = p.wq + (n0 + j) * p.K + k0;
    int32_t sum = 0;
    for (int64_t kq = 0; kq < kq_n; ++kq) {
      int8_t t[4] = {0, 0, 0, 0};
      for (int64_t k = 4 * kq; k < std::min<int64_t>(kw, 4 * kq + 4); ++k) {
        t[k - 4 * kq] = q[k];
        sum += q[k];
      }
      std::memcpy(d + kq * NB * 4, t, 4);
    }
    wsum[j] += sum;
  }
}

template <int MR_>
THRIFTY_INLINE void micro_u8(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kq_n, int32_t* c) {
  __m512i acc[MR_][2];
  for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t kq = 0; kq < kq_n; ++kq) {
    const __m512i b0 = _mm512_loadu_si512(b + kq * NB * 4), b1 = _mm512_loadu_si512(b + kq * NB * 4 + 64);
    for (int m = 0; m < MR_; ++m) {
      int32_t u;
      std::memcpy(&u, a + m * lda + 4 * kq, 4);
      const __m512i av = _mm512_set1_epi32(u);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], av, b0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], av, b1);
    }
  }
  for (int m = 0; m < MR_; ++m) {
    _mm512_storeu_si512(c + m * NB, _mm512_add_epi32(_mm512_loadu_si512(c + m * NB), acc[m][0]));
    _mm512_storeu_si512(c + m * NB + 16, _mm512_add_epi32(_mm512_loadu_si512(c + m * NB + 16), acc[m][1]));
  }
}

void micro_u8_any(int mr, const uint8_t* a, int64_t lda, const int8_t* b, int64_t kq_n, int32_t* c) {
  switch (mr) {
    case 1: return micro_u8<1>(a, lda, b, kq_n, c);
    case 2: return micro_u8<2>(a, lda, b, kq_n, c);
    case 3: return micro_u8<3>(a, lda, b, kq_n, c);
    case 4: return micro_u8<4>(a, lda, b, kq_n, c);
    case 5: return micro_u8<5>(a, lda, b, kq_n, c);
    default: return micro_u8<6>(a, lda, b, kq_n, c);
  }
}

// finish() for columns [n0, n0 + nw) of row m, 16 at a time: (acc - 128 wsum) * x_scale * w_scale + bias.
void finish_row_u8(const Int8LinearParams& p, int64_t m, int64_t n0, int64_t nw, const int32_t* acc,
                   const int32_t* wsum) {
  const Vec xs = Vec::set1(p.x_scales[m]);
  for (int64_t j = 0; j < nw; j += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, nw - j));
    const __mmask16 k = static_cast<__mmask16>((1u << n) - 1u);
    const __m512i a = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, acc + j),
                                       _mm512_slli_epi32(_mm512_maskz_loadu_epi32(k, wsum + j), 7));
    Vec v = Vec(_mm512_cvtepi32_ps(a)) * xs * Vec::load(p.w_scales + n0 + j, n);
    if (p.bias != nullptr) v = v + load_vec_any(p.bias, n0 + j, n, p.bias_dtype);
    const int64_t o = m * p.N + n0 + j;
    switch (p.out_dtype) {
      case DType::f32: v.store(static_cast<float*>(p.y) + o, n); break;
      case DType::bf16: v.store(static_cast<bf16_t*>(p.y) + o, n); break;
      default: v.store(static_cast<f16_t*>(p.y) + o, n); break;
    }
  }
}

void gemm_u8(const Int8LinearParams& p) {
  static_assert(NR == 32 && NB == 64 && KB % 64 == 0, "micro_u8 covers 32 columns; pack_panel_u8 16 x 16 groups");
  const int64_t M = p.M, N = p.N, K = p.K;
  const uint8_t* xu = reinterpret_cast<const uint8_t*>(p.xbuf);
  const int64_t mt = (M + MB8 - 1) / MB8, nt = (N + NB - 1) / NB;
  parallel_for(0, mt * nt, 1, [&](int64_t b, int64_t e) {
    std::vector<int8_t> bpack(KB * NB);
    std::vector<int32_t> cbuf(MB8 * NB);
    alignas(64) int32_t wsum[NB];
    for (int64_t t = b; t < e; ++t) {
      const int64_t nb = t / mt, mb = t % mt;
      const int64_t n0 = nb * NB, nw = std::min(NB, N - n0);
      const int64_t m0 = mb * MB8, mw = std::min(MB8, M - m0);
      std::fill(cbuf.begin(), cbuf.begin() + mw * NB, 0);
      std::fill(wsum, wsum + NB, 0);
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kw = std::min(KB, K - k0);
        pack_panel_u8(p, n0, nw, k0, kw, bpack.data(), wsum);
        const int64_t kq_n = (kw + 3) / 4;
        for (int64_t i = 0; i < mw; i += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, mw - i));
          for (int64_t j = 0; j < nw; j += NR)
            micro_u8_any(mr, xu + (m0 + i) * p.Kp + k0, p.Kp, bpack.data() + j * 4, kq_n, cbuf.data() + i * NB + j);
        }
      }
      for (int64_t i = 0; i < mw; ++i) finish_row_u8(p, m0 + i, n0, nw, cbuf.data() + i * NB, wsum);
    }
  });
}
#endif  // THRIFTY_AVX512_VNNI

// x's rows into dst (M rows of Kp elements, zero padded past K), each value through f.
template <typename D, typename F>
void prep_x_rows(const Int8LinearParams& p, D* dst, F f) {
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(p.Kp, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const int8_t* s = p.xq + m * p.K;
      D* d = dst + m * p.Kp;
      for (int64_t k = 0; k < p.K; ++k) d[k] = f(s[k]);
      for (int64_t k = p.K; k < p.Kp; ++k) d[k] = 0;
    }
  });
}

}  // namespace

void int8_linear_fwd(const Int8LinearParams& p) {
#if defined(THRIFTY_AVX512_VNNI)
  if (p.M > kGemvMaxM) {  // x + 128 as bytes (the int16 scratch buffer holds 2 * M * Kp bytes)
    prep_x_rows(p, reinterpret_cast<uint8_t*>(p.xbuf), [](int8_t v) { return static_cast<uint8_t>(v + 128); });
    return gemm_u8(p);
  }
#endif
  prep_x_rows(p, p.xbuf, [](int8_t v) { return static_cast<int16_t>(v); });  // widened to int16
  if (p.M > kGemvMaxM) return gemm(p);
  switch (p.M) {
    case 1: return gemv<1>(p);
    case 2: return gemv<2>(p);
    case 3: return gemv<3>(p);
    case 4: return gemv<4>(p);
    case 5: return gemv<5>(p);
    case 6: return gemv<6>(p);
    case 7: return gemv<7>(p);
    default: return gemv<8>(p);
  }
}

namespace {
template <typename T>
void quantize_rows(const QuantizePerTokenParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  parallel_for(0, p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * p.x_stride;
      float amax = 0.0f;
      bool nan = false;
      for (int64_t k = 0; k < K; ++k) {
        const float v = to_float(xr[k]);
        nan |= v != v;
        amax = std::max(amax, std::fabs(v));
      }
      // amax / 127 is the scale; inf or NaN inputs give a non-finite scale (the output then says so).
      p.scales[r] = nan ? NAN : amax / 127.0f;
      const float inv = amax > 0.0f && std::isfinite(amax) ? 127.0f / amax : 0.0f;
      int8_t* q = p.xq + r * K;
      for (int64_t k = 0; k < K; ++k) {
        float v = to_float(xr[k]) * inv;
        v = v != v ? 0.0f : std::min(127.0f, std::max(-127.0f, v));
        q[k] = static_cast<int8_t>(std::nearbyint(v));
      }
    }
  });
}
}  // namespace

void quantize_per_token_fwd(const QuantizePerTokenParams& p) {
  switch (p.dtype) {
    case DType::f32: return quantize_rows<float>(p);
    case DType::bf16: return quantize_rows<bf16_t>(p);
    case DType::f16: return quantize_rows<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
