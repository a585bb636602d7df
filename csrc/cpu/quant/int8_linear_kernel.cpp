// W8A8 on the CPU: dynamic per-token int8 quantization and the int8 x int8 -> int32 linear;
// compiled once per ISA level.
//
// Integer products use the int16 multiply-add (vpmaddwd: two int8 products, widened to int16, summed
// exactly into each int32 lane; AVX-512 VNNI fuses the accumulate as vpdpwssd). Unlike the u8 x s8
// vpmaddubsw trick this is exact for every int8 value (-128 included) with no saturation.
// GEMV path (M <= 8): each output row of wq is streamed once. GEMM path: tiles of MB x NB, the
// weight panel re-laid out as int16 k-pairs (k-major, NB wide) in L2 and an MR x 2W register tile
// of int32 accumulators; x is widened to int16 once. Output = acc * x_scale[m] * w_scale[n] + bias.
#include <algorithm>
#include <cmath>

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

}  // namespace

void int8_linear_fwd(const Int8LinearParams& p) {
  // widen x to int16, zero padded to Kp
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(p.Kp, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const int8_t* s = p.xq + m * p.K;
      int16_t* d = p.xbuf + m * p.Kp;
      for (int64_t k = 0; k < p.K; ++k) d[k] = s[k];
      for (int64_t k = p.K; k < p.Kp; ++k) d[k] = 0;
    }
  });
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
