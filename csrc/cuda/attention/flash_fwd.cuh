// FlashAttention-2 forward kernel (sm_80+). One block = BM query rows of one (batch, head),
// 4 warps of MT x 16 rows each (MT m16 tiles per warp reuse every K/V fragment MT times).
// Loop over key tiles of BN rows:
//   S = Q K^T (mma m16n8k16, Q and K fragments by ldmatrix from shared memory),
//   scale / softcap / mask in registers, online softmax in the log2 domain (exp2f),
//   O += P V (P re-packed from the S accumulators as the A operand, V by ldmatrix.trans).
// K and V tiles have one buffer each, loaded with cp.async so that V[n] streams in while
// S = Q K[n]^T is computed and K[n+1] while O += P V[n] is (FlashAttention-2's overlap).
// Tiles fully outside the causal/window band are skipped; boundary tiles are masked per element.
// Head dims below the kernel's D are zero-padded by the loads (head_dim % 8 == 0).
#pragma once
#include "cuda/attention/flash_common.cuh"

namespace thrifty::cuda::flash {

template <int D>
struct FwdCfg {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int MT = D > 128 ? 1 : 2;  // m16 tiles per warp
  static constexpr int BM = 16 * MT * kWarps;
  static constexpr int BN = D > 64 ? 32 : 64;
  static constexpr int SD = D + 8;  // padded shared row
  static constexpr size_t kSmem = size_t(BM + 2 * BN) * SD * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::kThreads) flash_fwd_kernel(const AttentionParams p, const ScoreMap sm,
                                                                        const int wl, const int wr) {
  using Cfg = FwdCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, SD = Cfg::SD, NT = Cfg::kThreads, MT = Cfg::MT;
  constexpr int WR = 16 * MT;  // rows per warp
  constexpr int kNT = BN / 8;  // S n-tiles per warp
  constexpr int kDT = D / 8;   // O n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * SD;
  T* sV = sK + BN * SD;

  const int mb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z + p.batch_offset;  // heavy (causal) tiles first
  const SeqInfo si = seq_info(p, b);
  const int m0 = mb * BM;
  if (m0 >= si.sq_rows) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kvh = h / (p.heads / p.kv_heads);
  const int sq = si.sq, sk = si.sk, off = sk - sq;
  const int rows_here = min(BM, si.sq_rows - m0);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + int64_t(si.q_start + m0) * p.q_row_stride +
                int64_t(h) * p.q_head_stride;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_batch_stride + int64_t(si.k_start) * p.k_row_stride +
                int64_t(kvh) * p.k_head_stride;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_batch_stride + int64_t(si.k_start) * p.v_row_stride +
                int64_t(kvh) * p.v_head_stride;
  T* og = static_cast<T*>(p.out) + b * p.o_batch_stride + int64_t(si.q_start + m0) * p.o_row_stride +
          int64_t(h) * p.o_head_stride;

  // key range seen by rows [m0, m0 + rows_here)
  const int i_last = m0 + rows_here - 1;
  int j_lo = 0, j_hi = sk;
  if (wl >= 0) j_lo = max(0, m0 + off - wl);
  if (wr >= 0) j_hi = min(sk, i_last + off + wr + 1);
  const int n_lo = j_lo / BN;
  const int n_hi = j_hi > j_lo ? (j_hi + BN - 1) / BN : n_lo;

  load_tile<BM, D, SD, NT>(sQ, qg, p.q_row_stride, rows_here, p.head_dim, tid);
  cp_async_commit();
  if (n_hi > n_lo) {
    load_tile<BN, D, SD, NT>(sK, kg + int64_t(n_lo) * BN * p.k_row_stride, p.k_row_stride, sk - n_lo * BN,
                             p.head_dim, tid);
    cp_async_commit();
  }

  float acc_o[MT][kDT][4];
  float row_max[MT][2], row_sum[MT][2];  // row_sum: this thread's partial sums (2 of every 8 columns)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < kDT; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc_o[mt][i][c] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  const T* sQw = sQ + (warp * WR) * SD;
  for (int n = n_lo; n < n_hi; ++n) {
    const int n0 = n * BN;
    cp_async_wait<0>();
    __syncthreads();  // K[n] landed; every warp is done with V[n-1]
    load_tile<BN, D, SD, NT>(sV, vg + int64_t(n0) * p.v_row_stride, p.v_row_stride, sk - n0, p.head_dim, tid);
    cp_async_commit();

    float s[MT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[mt][i][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], sQw + (mt * 16 + (lane & 15)) * SD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, sK + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * SD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(s[mt][2 * np], a[mt], bf[0], bf[1]);
          mma16816<T>(s[mt][2 * np + 1], a[mt], bf[2], bf[3]);
        }
      }
    }

    // scale (+ softcap), mask, online softmax
    const bool need_mask = (n0 + BN > sk) || (wr >= 0 && n0 + BN - 1 > m0 + off + wr) ||
                           (wl >= 0 && n0 < i_last + off - wl);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int i0 = m0 + warp * WR + mt * 16 + g;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float x = sm(s[mt][nt][c]);
          if (need_mask) {
            const int i = i0 + (c >> 1) * 8, j = n0 + nt * 8 + 2 * t + (c & 1);
            if (!visible(i, j, sq, sk, off, wl, wr)) x = -INFINITY;
          }
          s[mt][nt][c] = x;
        }
      float scale_o[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -INFINITY ? 0.0f : mx;  // a row with nothing visible yet
        scale_o[r] = exp2f(row_max[mt][r] - m_use);        // row_max = -inf gives 0
        row_max[mt][r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          s[mt][nt][2 * r] = exp2f(s[mt][nt][2 * r] - m_use);
          s[mt][nt][2 * r + 1] = exp2f(s[mt][nt][2 * r + 1] - m_use);
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * scale_o[r] + sum;
      }
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc_o[mt][dt][0] *= scale_o[0];
        acc_o[mt][dt][1] *= scale_o[0];
        acc_o[mt][dt][2] *= scale_o[1];
        acc_o[mt][dt][3] *= scale_o[1];
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (n + 1 < n_hi) {
      load_tile<BN, D, SD, NT>(sK, kg + int64_t(n0 + BN) * p.k_row_stride, p.k_row_stride, sk - n0 - BN,
                               p.head_dim, tid);
      cp_async_commit();
    }

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        ldsm_x4_t(bf, sV + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * SD + dp * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(acc_o[mt][2 * dp], a[mt], bf[0], bf[1]);
          mma16816<T>(acc_o[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
        }
      }
    }
  }

  // epilogue: normalise, stage the warp's 16 rows in its own part of sQ, store 16-byte chunks
  cp_async_wait<0>();
  __syncthreads();
  T* sO = sQ + (warp * WR) * SD;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv[r] = l != 0.0f ? 1.0f / l : 0.0f;  // l = 0: no visible key (out 0, lse -inf); NaN l stays NaN
      const int i = m0 + warp * WR + mt * 16 + g + r * 8;
      if (t == 0 && i < si.sq_rows) {
        const float lse = l != 0.0f ? (row_max[mt][r] + __log2f(l)) * kLn2 : -INFINITY;
        p.lse[b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + si.q_start + i] = lse;
      }
    }
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      *reinterpret_cast<uint32_t*>(sO + (mt * 16 + g) * SD + dt * 8 + 2 * t) =
          pack2<T>(acc_o[mt][dt][0] * inv[0], acc_o[mt][dt][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(sO + (mt * 16 + g + 8) * SD + dt * 8 + 2 * t) =
          pack2<T>(acc_o[mt][dt][2] * inv[1], acc_o[mt][dt][3] * inv[1]);
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int c = lane; c < WR * kChunks; c += 32) {
    const int r = c / kChunks, ch = c % kChunks;
    if (warp * WR + r < rows_here && ch * 8 < p.head_dim)
      *reinterpret_cast<uint4*>(og + int64_t(warp * WR + r) * p.o_row_stride + ch * 8) =
          *reinterpret_cast<const uint4*>(sO + r * SD + ch * 8);
  }
}

template <typename T, int D>
void run_flash_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<D>;
  const int mblocks = (p.seqlen_q + Cfg::BM - 1) / Cfg::BM;
  if (mblocks == 0 || p.batch == 0 || p.heads == 0) return;
  int wl, wr;
  effective_window(p, wl, wr);
  for (int b0 = 0; b0 < p.batch; b0 += kMaxGridZ) {  // grid z <= 65535: larger batches in slices
    AttentionParams ps = p;
    ps.batch_offset = b0;
    launch_with_smem<flash_fwd_kernel<T, D>>(dim3(mblocks, p.heads, std::min(kMaxGridZ, p.batch - b0)), Cfg::kThreads,
                                             int(Cfg::kSmem), stream, "flash_attention_fwd", ps, make_score_map(p), wl, wr);
    check_launch("flash_attention_fwd");
  }
}

}  // namespace thrifty::cuda::flash
