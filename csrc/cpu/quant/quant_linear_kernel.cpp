// W8A16 / W4A16 linear on the CPU: y = x @ dequant(W).T (+ bias); compiled once per ISA level.
//
// GEMV path (M <= 8): each thread takes blocks of R output rows and streams their packed
// weights exactly once (one contiguous stream per row), dequantizing in registers:
//   W4: per group g, acc = sum_k x[k] * q[k] (nibbles turned to float), then
//       y += s[g] * (acc - z[g] * sum_{k in g} x[k])   (zero and scale applied once per group).
//       x is reordered per block of 2W k (even k first, then odd k) to match the nibbles.
//   W8: y = s * sum_k x[k] * q[k].
// GEMM path (M > 8): tiles of MB rows x NB columns; per KB-deep slice the weight panel is
// dequantized to float32 (k-major, NB wide, 64 KB: stays in L2) and an MR x NR register-tiled
// FMA micro-kernel multiplies it by x (float32). The panel holds exactly dequant(W) =
// (q - z) * s rounded to float32, the values quant_dequantize returns.
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "cpu/quant/qvec.h"
#include "cpu/quant/quant_kernels.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;
constexpr int64_t kGemvMaxM = 8;
constexpr int NR = 2 * W;   // micro-tile columns
constexpr int MR = 6;       // micro-tile rows
constexpr int64_t NB = 64;  // panel columns (a multiple of NR on every level)
constexpr int64_t KB = 256; // panel depth
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

// x (M, K) any float type -> xbuf (M, K) float32; `interleave`: per block of 2W, even k then odd k.
template <typename T>
void prep_x(const QuantLinearParams& p, bool interleave) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const T* xr = x + m * p.x_stride;
      float* d = p.xbuf + m * K;
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

THRIFTY_INLINE void finish(const QuantLinearParams& p, int64_t m, int64_t n, float v) {
  if (p.bias != nullptr) v += load_any(p.bias, n, p.bias_dtype);
  store_any(p.y, m * p.N + n, v, p.dtype);
}

// ---------------- GEMV ----------------
template <int MT, int R>
THRIFTY_INLINE void gemv_w4(const QuantLinearParams& p, int64_t n0) {
  constexpr bool TWO = MT * R * 2 <= 8;  // separate accumulators for low and high nibbles
  const int64_t K = p.K, G = p.group_size, ng = K / G;
  const uint8_t* q[R];
  const float *s[R], *z[R];
  for (int r = 0; r < R; ++r) {
    q[r] = static_cast<const uint8_t*>(p.qweight) + (n0 + r) * (K / 2);
    s[r] = p.scales + (n0 + r) * ng;
    z[r] = p.zeros + (n0 + r) * ng;
  }
  float tot[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) tot[m][r] = 0.0f;
  for (int64_t g = 0; g < ng; ++g) {
    Vec alo[MT][R], ahi[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) alo[m][r] = ahi[m][r] = Vec::zero();
    for (int64_t k = g * G; k < (g + 1) * G; k += 2 * W) {
      for (int r = 0; r < R; ++r) {
        Vec lo, hi;
        nibbles(q[r] + k / 2, lo, hi);
        for (int m = 0; m < MT; ++m) {
          const float* xm = p.xbuf + m * K + k;
          if (TWO) {
            alo[m][r] = fma(Vec::load(xm), lo, alo[m][r]);
            ahi[m][r] = fma(Vec::load(xm + W), hi, ahi[m][r]);
          } else {
            alo[m][r] = fma(Vec::load(xm + W), hi, fma(Vec::load(xm), lo, alo[m][r]));
          }
        }
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) {
        const float a = TWO ? (alo[m][r] + ahi[m][r]).reduce_add() : alo[m][r].reduce_add();
        tot[m][r] += s[r][g] * (a - z[r][g] * p.xsum[m * ng + g]);
      }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) finish(p, m, n0 + r, tot[m][r]);
}

template <int MT, int R>
THRIFTY_INLINE void gemv_w8(const QuantLinearParams& p, int64_t n0) {
  constexpr bool TWO = MT * R * 2 <= 8;
  const int64_t K = p.K;
  const int8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = static_cast<const int8_t*>(p.qweight) + (n0 + r) * K;
  Vec a0[MT][R], a1[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) a0[m][r] = a1[m][r] = Vec::zero();
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) {
    for (int r = 0; r < R; ++r) {
      const Vec w0 = load_i8f(q[r] + k), w1 = load_i8f(q[r] + k + W);
      for (int m = 0; m < MT; ++m) {
        const float* xm = p.xbuf + m * K + k;
        if (TWO) {
          a0[m][r] = fma(Vec::load(xm), w0, a0[m][r]);
          a1[m][r] = fma(Vec::load(xm + W), w1, a1[m][r]);
        } else {
          a0[m][r] = fma(Vec::load(xm + W), w1, fma(Vec::load(xm), w0, a0[m][r]));
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float t = TWO ? (a0[m][r] + a1[m][r]).reduce_add() : a0[m][r].reduce_add();
      const float* xm = p.xbuf + m * K;
      for (int64_t kk = k; kk < K; ++kk) t += xm[kk] * static_cast<float>(q[r][kk]);
      finish(p, m, n0 + r, t * p.scales[n0 + r]);
    }
}

template <int MT>
void gemv(const QuantLinearParams& p) {
  constexpr int R = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const int64_t N = p.N, nblk = N / R;
  const bool w4 = p.bits == 4;
  parallel_for(0, nblk + (N % R), 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < nblk) {
        if (w4) gemv_w4<MT, R>(p, i * R); else gemv_w8<MT, R>(p, i * R);
      } else {
        const int64_t n = nblk * R + (i - nblk);
        if (w4) gemv_w4<MT, 1>(p, n); else gemv_w8<MT, 1>(p, n);
      }
    }
  });
}

// ---------------- GEMM ----------------
// bpack[k][j] = dequant(W)[n0 + j][k0 + k] for j < nw, 0 for nw <= j < NB.
void pack_panel(const QuantLinearParams& p, int64_t n0, int64_t nw, int64_t k0, int64_t kw, float* bpack) {
  const int64_t K = p.K;
  if (nw < NB)
    for (int64_t k = 0; k < kw; ++k)
      for (int64_t j = nw; j < NB; ++j) bpack[k * NB + j] = 0.0f;
  if (p.bits == 8) {
    for (int64_t j = 0; j < nw; ++j) {
      const int8_t* q = static_cast<const int8_t*>(p.qweight) + (n0 + j) * K + k0;
      const float s = p.scales[n0 + j];
      for (int64_t k = 0; k < kw; ++k) bpack[k * NB + j] = static_cast<float>(q[k]) * s;
    }
    return;
  }
  const int64_t G = p.group_size, ng = K / G;
  for (int64_t j = 0; j < nw; ++j) {
    const uint8_t* q = static_cast<const uint8_t*>(p.qweight) + (n0 + j) * (K / 2);
    const float* s = p.scales + (n0 + j) * ng;
    const float* z = p.zeros + (n0 + j) * ng;
    for (int64_t k = k0; k < k0 + kw;) {
      const int64_t g = k / G, kend = std::min(k0 + kw, (g + 1) * G);
      const float sg = s[g], zg = z[g];
      for (; k < kend; k += 2) {
        const uint8_t b = q[k / 2];
        bpack[(k - k0) * NB + j] = (static_cast<float>(b & 15) - zg) * sg;
        bpack[(k - k0 + 1) * NB + j] = (static_cast<float>(b >> 4) - zg) * sg;
      }
    }
  }
}

// c[m][0..NR) += sum_k a[m][k] * b[k][0..NR)
template <int MR_>
THRIFTY_INLINE void micro(const float* a, int64_t lda, const float* b, int64_t kw, float* c) {
  Vec acc[MR_][2];
  for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = Vec::zero();
  for (int64_t k = 0; k < kw; ++k) {
    const Vec b0 = Vec::load(b + k * NB), b1 = Vec::load(b + k * NB + W);
    for (int m = 0; m < MR_; ++m) {
      const Vec av = Vec::set1(a[m * lda + k]);
      acc[m][0] = fma(av, b0, acc[m][0]);
      acc[m][1] = fma(av, b1, acc[m][1]);
    }
  }
  for (int m = 0; m < MR_; ++m) {
    (Vec::load(c + m * NB) + acc[m][0]).store(c + m * NB);
    (Vec::load(c + m * NB + W) + acc[m][1]).store(c + m * NB + W);
  }
}

void micro_any(int mr, const float* a, int64_t lda, const float* b, int64_t kw, float* c) {
  switch (mr) {
    case 1: return micro<1>(a, lda, b, kw, c);
    case 2: return micro<2>(a, lda, b, kw, c);
    case 3: return micro<3>(a, lda, b, kw, c);
    case 4: return micro<4>(a, lda, b, kw, c);
    case 5: return micro<5>(a, lda, b, kw, c);
    default: return micro<6>(a, lda, b, kw, c);
  }
}

void gemm(const QuantLinearParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
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
        const int64_t kw = std::min(KB, K - k0);
        pack_panel(p, n0, nw, k0, kw, bpack);
        for (int64_t i = 0; i < mw; i += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, mw - i));
          for (int64_t j = 0; j < nw; j += NR)
            micro_any(mr, p.xbuf + (m0 + i) * K + k0, K, bpack + j, kw, cbuf + i * NB + j);
        }
      }
      for (int64_t i = 0; i < mw; ++i)
        for (int64_t j = 0; j < nw; ++j) finish(p, m0 + i, n0 + j, cbuf[i * NB + j]);
    }
    delete[] bpack;
    delete[] cbuf;
  });
}

}  // namespace

void quant_linear_fwd(const QuantLinearParams& p) {
  const bool use_gemv = p.M <= kGemvMaxM;
  const bool interleave = use_gemv && p.bits == 4;
  switch (p.dtype) {
    case DType::f32: prep_x<float>(p, interleave); break;
    case DType::bf16: prep_x<bf16_t>(p, interleave); break;
    case DType::f16: prep_x<f16_t>(p, interleave); break;
  }
  if (!use_gemv) return gemm(p);
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
