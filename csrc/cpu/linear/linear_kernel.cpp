// thrifty.linear on the CPU for few rows (decode): y = x @ W.T (+ bias), W (N, K) in float32, bfloat16
// or float16; compiled once per ISA level.
//
// Napkin math: one decode row does 2 FLOP per weight element and reads 2 bytes of it (bf16), so the
// GEMV is bound by memory bandwidth as long as each weight byte is read once and widened in registers
// (AVX2: bf16 = u16 << 16 via vpmovzxwd + vpslld, f16 via F16C vcvtph2ps; AVX-512 the same 16 wide) and
// multiplied with FMA. torch 2.14's bf16 GEMV on the AVX2 EPYC is erratic: 0.3 to 13 GB/s for one shape
// across processes, and slow for 4096 x 4096 or the 768 x 32000 LM head.
//
// Layout: x is first widened to a float32 copy (M rows zero padded to a multiple of 32, so the last
// partial vector of a row needs no mask on x). Threads take blocks of NB weight rows; within a block,
// a tile of MT x-rows x R weight rows keeps MT * R (x U) vector accumulators in registers, streams the R
// weight rows once (one contiguous stream each; a single row at a time for one x row and short weight rows)
// and reduces each accumulator once at the end. Rows of x
// past 8 are taken 8 at a time over the same weight block, which then comes from L1/L2, not memory.
//
// No avx512_bf16 (vdpbf16ps) variant: the widen + FMA loop already retires a 16-element weight vector per
// cycle or two, more than one core's share of memory bandwidth, so a dot-product instruction would not
// make decode faster; the avx512_bf16 level shares the AVX-512 code.
#include <algorithm>

#include "common/parallel.h"
#include "cpu/linear/linear_kernels.h"
#include "cpu/vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

constexpr int W = Vec::W;

constexpr int kMaxMT = 8;                    // x rows per tile
constexpr int kAccRegs = W == 16 ? 16 : 8;   // accumulators that leave room for x and weight vectors

template <typename T>
void prep_x(const LinearParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const T* xr = x + m * p.x_stride;
      float* d = p.xbuf + m * p.xbuf_stride;
      int64_t k = 0;
      for (; k + W <= K; k += W) Vec::load(xr + k).store(d + k);
      for (; k < K; ++k) d[k] = to_float(xr[k]);
      for (; k < p.xbuf_stride; ++k) d[k] = 0.0f;
    }
  });
}

template <typename T>
THRIFTY_INLINE void finish(const LinearParams& p, int64_t m, int64_t n, float v) {
  if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.y)[m * p.N + n] = from_float<T>(v);
}

// Weight rows per tile for MT x rows: the accumulators (MT * R) fit the register budget.
template <int MT>
constexpr int rows_per_tile() {
  return MT == 1 ? 4 : (MT == 2 ? 4 : (MT <= 4 ? 2 : 1));
}

// y[m0 .. m0+MT, n0 .. n0+R] from x rows m0.. (float32 copy) and weight rows n0..
template <typename T, int MT, int R>
THRIFTY_INLINE void tile(const LinearParams& p, int64_t m0, int64_t n0) {
  constexpr int U = MT * R * 4 <= kAccRegs ? 4 : (MT * R * 2 <= kAccRegs ? 2 : 1);  // k-steps in flight
  const int64_t K = p.K;
  const T* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const T*>(p.w) + (n0 + r) * p.w_stride;
  const float* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = p.xbuf + (m0 + m) * p.xbuf_stride;
  // Rows of a few hundred elements are too short for the hardware prefetcher to ramp up on: fetch the
  // rows of the next tile at the same offset while this one runs (+20-35% bandwidth measured on the AVX2
  // EPYC at K = 768..4096; a distance of 2, 4 or 8 tiles made no difference).
  const char* pf[R];
  for (int r = 0; r < R; ++r)
    pf[r] = reinterpret_cast<const char*>(n0 + R + r < p.N ? w[r] + R * p.w_stride : w[r]);
  constexpr int64_t kStep = int64_t(U) * W * sizeof(T);  // weight bytes per row per step
  // Two-level sums (32 steps per chunk into acc, chunks into tot) keep float32 rounding error near that of
  // a blocked GEMM even at the scalar level, where a single chain would run K long.
  constexpr int64_t KC = 32 * U * W;
  Vec acc[U][MT][R], tot[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) tot[m][r] = Vec::zero();
  const int64_t kv = K / (U * W) * (U * W);  // k covered by whole U-vector steps
  int64_t k = 0;
  for (; k < kv; k += KC) {
    const int64_t kend = std::min(kv, k + KC);
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r) acc[u][m][r] = Vec::zero();
    for (int64_t kk = k; kk < kend; kk += U * W) {
      if (kStep >= 64 || ((kk * int64_t(sizeof(T))) & 63) == 0)
        for (int r = 0; r < R; ++r)
          for (int64_t off = 0; off < kStep || off == 0; off += 64) __builtin_prefetch(pf[r] + kk * sizeof(T) + off);
      for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r) {
          const Vec wv = Vec::load(w[r] + kk + u * W);
          for (int m = 0; m < MT; ++m) acc[u][m][r] = fma(Vec::load(x[m] + kk + u * W), wv, acc[u][m][r]);
        }
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) {
        Vec a = acc[0][m][r];
        for (int u = 1; u < U; ++u) a = a + acc[u][m][r];
        tot[m][r] = tot[m][r] + a;
      }
  }
  k = kv;
  for (; k < K; k += W) {  // whole vectors left, then one partial (weight lanes past K load as 0, x is 0 there)
    const int n = static_cast<int>(std::min<int64_t>(W, K - k));
    for (int r = 0; r < R; ++r) {
      const Vec wv = n == W ? Vec::load(w[r] + k) : Vec::load(w[r] + k, n);
      for (int m = 0; m < MT; ++m) tot[m][r] = fma(Vec::load(x[m] + k), wv, tot[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) finish<T>(p, m0 + m, n0 + r, tot[m][r].reduce_add());
}

// x rows m0 .. m0+MT against weight rows n0 .. n0+nw.
template <typename T, int MT>
void block(const LinearParams& p, int64_t m0, int64_t n0, int64_t nw) {
  constexpr int R = rows_per_tile<MT>();
  int64_t j = 0;
  // One x row and short weight rows (<= 4 KB): one weight row at a time, 4 k-steps in flight, so each
  // thread reads one sequential stream (+25% bandwidth at K 768 bf16 over 4 interleaved rows; from K 2560
  // on, 4 rows at a time are 10-30% faster).
  if (MT == 1 && p.K * int64_t(sizeof(T)) <= 4096) {
    for (; j < nw; ++j) tile<T, MT, 1>(p, m0, n0 + j);
    return;
  }
  for (; j + R <= nw; j += R) tile<T, MT, R>(p, m0, n0 + j);
  for (; j < nw; ++j) tile<T, MT, 1>(p, m0, n0 + j);
}

template <typename T>
void block_any(int mt, const LinearParams& p, int64_t m0, int64_t n0, int64_t nw) {
  switch (mt) {
    case 1: return block<T, 1>(p, m0, n0, nw);
    case 2: return block<T, 2>(p, m0, n0, nw);
    case 3: return block<T, 3>(p, m0, n0, nw);
    case 4: return block<T, 4>(p, m0, n0, nw);
    case 5: return block<T, 5>(p, m0, n0, nw);
    case 6: return block<T, 6>(p, m0, n0, nw);
    case 7: return block<T, 7>(p, m0, n0, nw);
    default: return block<T, 8>(p, m0, n0, nw);
  }
}

template <typename T>
void gemv(const LinearParams& p) {
  prep_x<T>(p);

  const int64_t M = p.M, N = p.N, K = p.K;
  // Up to 8 rows every weight row is read once whatever the block; past 8 the block is re-read per 8 rows
  // of x, so it is sized to stay in L2 (~128 KB).
  int64_t NB = 4;
  if (M > kMaxMT) NB = std::min<int64_t>(64, std::max<int64_t>(4, (131072 / (K * int64_t(sizeof(T)))) / 4 * 4));
  const int64_t nblk = (N + NB - 1) / NB;
  // at least ~64K weight elements per task, so small layers do not pay for waking threads
  const int64_t grain = std::max<int64_t>(1, 65536 / (NB * K));
  parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n0 = i * NB, nw = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMT)
        block_any<T>(static_cast<int>(std::min<int64_t>(kMaxMT, M - m0)), p, m0, n0, nw);
    }
  });
}

}  // namespace

void linear_gemv_fwd(const LinearParams& p) {
  switch (p.dtype) {
    case DType::f32: return gemv<float>(p);
    case DType::bf16: return gemv<bf16_t>(p);
    case DType::f16: return gemv<f16_t>(p);
  }
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
