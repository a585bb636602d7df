// FlashAttention-2 backward kernels (sm_80+).
//
// Math (per row i, s = scaled and soft-capped scores, P = exp(s - lse)):
//   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Dsum) * ds/ds_raw_scaled,   Dsum_i = rowsum(dO * O)_i,
//   dK = scale * dS^T Q,   dQ = scale * dS K    (softcap: ds/d(scaled) = 1 - tanh^2).
//
// flash_bwd_kv_kernel: one block per (key tile of 64 rows, kv head, batch). Each warp owns 16 keys
//   (head dim 256: two warps per 16 keys, each owning half of the dK/dV columns; they compute the
//   16 x 32 score tile redundantly). dK, dV accumulate in registers over every query tile of every
//   query head of the GQA group (so no reduction over heads is needed), with the 32-row Q / dO tiles
//   double-buffered by cp.async. Non-deterministic mode also computes dQ there: dS goes through
//   shared memory and each warp atomically adds its 16 x (D / ...) slice of dS K into a float32
//   accumulator (workspace), converted by flash_bwd_convert_dq.
// flash_bwd_dq_kernel (the default, and always in deterministic mode): one block per (64 query
//   rows, head, batch), recomputes P and dS tile by tile over the visible keys and accumulates dQ
//   in registers: no atomics, bitwise repeatable, and faster on H100 than the atomic path above
//   (which THRIFTY_ATTN_ATOMIC_DQ=1 selects; see flash_api.cu).
#pragma once
#include "cuda/attention/flash_common.cuh"

namespace thrifty::cuda::flash {

template <int D>
struct BwdCfg {
  static constexpr int kSplit = D > 128 ? 2 : 1;  // warps sharing 16 keys, splitting dK/dV columns
  static constexpr int kWarps = 4 * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int BN = 64;  // keys per block
  static constexpr int BM = 32;  // queries per step
  static constexpr int SD = D + 8;
  static constexpr int SDS = BM + 8;
  static constexpr int DW = D / kSplit;                  // dK/dV columns per warp
  static constexpr int DQW = D / (kWarps / (BM / 16));  // dQ columns per warp
  static constexpr size_t kSmem =
      size_t(2 * BN * SD + 4 * BM * SD + BN * SDS) * 2 + size_t(4 * BM) * sizeof(float);
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdCfg<D>::kThreads)
    flash_bwd_kv_kernel(const AttentionBwdParams p, const ScoreMap sm, const int wl, const int wr) {
  using Cfg = BwdCfg<D>;
  constexpr int BN = Cfg::BN, BM = Cfg::BM, SD = Cfg::SD, SDS = Cfg::SDS, NT = Cfg::kThreads;
  constexpr int DW = Cfg::DW, DQW = Cfg::DQW;
  constexpr int kQT = BM / 8;  // S^T n-tiles (query columns)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * SD;
  T* sQ = sV + BN * SD;       // [2][BM][SD]
  T* sdO = sQ + 2 * BM * SD;  // [2][BM][SD]
  T* sdS = sdO + 2 * BM * SD; // [BN][SDS]  dS^T (keys x queries)
  float* sL = reinterpret_cast<float*>(sdS + BN * SDS);  // [2][BM] lse * log2e (-inf -> +inf)
  float* sDs = sL + 2 * BM;                               // [2][BM] Dsum

  const int nb = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z + p.batch_offset;
  const SeqInfo si = seq_info(p, b);
  const int n0 = nb * BN;
  if (n0 >= si.sk) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kg = warp & 3, dsplit = warp >> 2;
  const int sq = si.sq, sk = si.sk, off = sk - sq;
  const int G = p.heads / p.kv_heads;
  const int64_t Msq = p.seqlen_q;
  const float* dsum = static_cast<const float*>(p.workspace);
  float* dq_acc = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + bwd_dsum_bytes(p));

  const T* kg_ptr = static_cast<const T*>(p.k) + b * p.k_batch_stride + int64_t(si.k_start + n0) * p.k_row_stride +
                    int64_t(kvh) * p.k_head_stride;
  const T* vg_ptr = static_cast<const T*>(p.v) + b * p.v_batch_stride + int64_t(si.k_start + n0) * p.v_row_stride +
                    int64_t(kvh) * p.v_head_stride;
  load_tile<BN, D, SD, NT>(sK, kg_ptr, p.k_row_stride, sk - n0, p.head_dim, tid);
  load_tile<BN, D, SD, NT>(sV, vg_ptr, p.v_row_stride, sk - n0, p.head_dim, tid);
  cp_async_commit();

  // query rows that see some key of [n0, n0 + BN)
  const int j_last = min(n0 + BN, sk) - 1;
  int i_lo = 0, i_hi = si.sq_rows;
  if (wr >= 0) i_lo = max(0, n0 - off - wr);
  if (wl >= 0) i_hi = min(si.sq_rows, j_last - off + wl + 1);
  const int mb_lo = i_lo / BM;
  const int nm = i_hi > i_lo ? (i_hi + BM - 1) / BM - mb_lo : 0;
  const int total = G * nm;

  auto load_step = [&](int it, int buf) {
    const int hq = kvh * G + it / nm;
    const int m0 = (mb_lo + it % nm) * BM;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + int64_t(si.q_start + m0) * p.q_row_stride +
                  int64_t(hq) * p.q_head_stride;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                   int64_t(si.q_start + m0) * p.do_row_stride + int64_t(hq) * p.do_head_stride;
    load_tile<BM, D, SD, NT>(sQ + buf * BM * SD, qg, p.q_row_stride, si.sq_rows - m0, p.head_dim, tid);
    load_tile<BM, D, SD, NT>(sdO + buf * BM * SD, dog, p.do_row_stride, si.sq_rows - m0, p.head_dim, tid);
    cp_async_commit();
    if (tid < BM) {
      const int i = m0 + tid;
      float l = INFINITY, d = 0.0f;
      if (i < si.sq_rows) {
        l = p.lse[b * p.lse_batch_stride + int64_t(hq) * p.lse_head_stride + si.q_start + i];
        l = l == -INFINITY ? INFINITY : l * kLog2e;  // a row that saw nothing has P = 0
        d = dsum[int64_t(hq) * p.batch * Msq + b * Msq + i];
      }
      sL[buf * BM + tid] = l;
      sDs[buf * BM + tid] = d;
    }
  };

  float acc_dk[DW / 8][4], acc_dv[DW / 8][4];
#pragma unroll
  for (int i = 0; i < DW / 8; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_dk[i][c] = acc_dv[i][c] = 0.0f;

  if (total > 0) load_step(0, 0);
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) {
      load_step(it + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this step's tiles (and K, V) landed
    const int hq = kvh * G + it / nm;
    const int m0 = (mb_lo + it % nm) * BM;
    const T* sQb = sQ + buf * BM * SD;
    const T* sdOb = sdO + buf * BM * SD;
    const float* sLb = sL + buf * BM;
    const float* sDb = sDs + buf * BM;

    float st[kQT][4], dpt[kQT][4];
#pragma unroll
    for (int i = 0; i < kQT; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) st[i][c] = dpt[i][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sK + (kg * 16 + (lane & 15)) * SD + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(av, sV + (kg * 16 + (lane & 15)) * SD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BM / 16; ++np) {
        uint32_t bq[4], bo[4];
        const int off_b = (np * 16 + (lane >> 4) * 8 + (lane & 7)) * SD + kk * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4(bq, sQb + off_b);
        ldsm_x4(bo, sdOb + off_b);
        mma16816<T>(st[2 * np], ak, bq[0], bq[1]);
        mma16816<T>(st[2 * np + 1], ak, bq[2], bq[3]);
        mma16816<T>(dpt[2 * np], av, bo[0], bo[1]);
        mma16816<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    const bool need_mask = (m0 + BM > si.sq_rows) || (n0 + BN > sk) || (wr >= 0 && n0 + BN - 1 > m0 + off + wr) ||
                           (wl >= 0 && n0 < m0 + BM - 1 + off - wl);
#pragma unroll
    for (int nt = 0; nt < kQT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = nt * 8 + 2 * t + (c & 1);
        const float raw = st[nt][c];
        float x, dtanh = 1.0f;
        if (sm.softcap) {
          const float th = tanhf(raw * sm.cap_pre);
          x = sm.cap_post * th;
          dtanh = 1.0f - th * th;
        } else {
          x = raw * sm.scale_log2;
        }
        if (need_mask) {
          const int j = n0 + kg * 16 + g + (c >> 1) * 8;
          if (!visible(m0 + col, j, sq, sk, off, wl, wr)) x = -INFINITY;
        }
        const float pr = exp2f(x - sLb[col]);
        st[nt][c] = pr;
        dpt[nt][c] = pr * (dpt[nt][c] - sDb[col]) * dtanh;
      }

    // dV += P^T dO, dK += dS^T Q over this warp's DW columns
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], ad[4];
      ap[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      ad[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      ad[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      ad[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      ad[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DW / 16; ++dp) {
        const int off_b = (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * SD + dsplit * DW + dp * 16 + (lane >> 4) * 8;
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, sdOb + off_b);
        ldsm_x4_t(bq, sQb + off_b);
        mma16816<T>(acc_dv[2 * dp], ap, bo[0], bo[1]);
        mma16816<T>(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
        mma16816<T>(acc_dk[2 * dp], ad, bq[0], bq[1]);
        mma16816<T>(acc_dk[2 * dp + 1], ad, bq[2], bq[3]);
      }
    }

    if (!p.deterministic) {
      if (dsplit == 0) {
#pragma unroll
        for (int nt = 0; nt < kQT; ++nt) {
          *reinterpret_cast<uint32_t*>(sdS + (kg * 16 + g) * SDS + nt * 8 + 2 * t) = pack2<T>(dpt[nt][0], dpt[nt][1]);
          *reinterpret_cast<uint32_t*>(sdS + (kg * 16 + g + 8) * SDS + nt * 8 + 2 * t) =
              pack2<T>(dpt[nt][2], dpt[nt][3]);
        }
      }
      __syncthreads();
      const int qg = warp % (BM / 16), dc = warp / (BM / 16);
      float acc[DQW / 8][4];
#pragma unroll
      for (int i = 0; i < DQW / 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, sdS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * SDS + qg * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int dp = 0; dp < DQW / 16; ++dp) {
          uint32_t bk[4];
          ldsm_x4_t(bk, sK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * SD + dc * DQW + dp * 16 + (lane >> 4) * 8);
          mma16816<T>(acc[2 * dp], a, bk[0], bk[1]);
          mma16816<T>(acc[2 * dp + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int dt = 0; dt < DQW / 8; ++dt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int i = m0 + qg * 16 + g + (c >> 1) * 8;
          const int col = dc * DQW + dt * 8 + 2 * t + (c & 1);
          if (i < si.sq_rows && col < p.head_dim)
            atomicAdd(dq_acc + ((b * Msq + i) * p.heads + hq) * D + col, acc[dt][c]);
        }
    }
    __syncthreads();  // everyone is done with this step's buffers (and sdS)
  }
  cp_async_wait<0>();

  // dK (scaled) and dV straight from the accumulators
  T* dkg = static_cast<T*>(p.dk) + b * p.dk_batch_stride + int64_t(si.k_start + n0) * p.dk_row_stride +
           int64_t(kvh) * p.dk_head_stride;
  T* dvg = static_cast<T*>(p.dv) + b * p.dv_batch_stride + int64_t(si.k_start + n0) * p.dv_row_stride +
           int64_t(kvh) * p.dv_head_stride;
  const float scale = p.softmax_scale;
#pragma unroll
  for (int dt = 0; dt < DW / 8; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = kg * 16 + g + r * 8;
      const int col = dsplit * DW + dt * 8 + 2 * t;
      if (n0 + row < sk && col < p.head_dim) {
        *reinterpret_cast<uint32_t*>(dkg + int64_t(row) * p.dk_row_stride + col) =
            pack2<T>(acc_dk[dt][2 * r] * scale, acc_dk[dt][2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(dvg + int64_t(row) * p.dv_row_stride + col) =
            pack2<T>(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
      }
    }
}

template <int D>
struct BwdDqCfg {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int BM = 16 * kWarps;
  static constexpr int BN = D > 128 ? 32 : 64;
  static constexpr int SD = D + 8;
  static constexpr size_t kSmem = size_t(2 * BM + 4 * BN) * SD * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdDqCfg<D>::kThreads)
    flash_bwd_dq_kernel(const AttentionBwdParams p, const ScoreMap sm, const int wl, const int wr) {
  using Cfg = BwdDqCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, SD = Cfg::SD, NT = Cfg::kThreads;
  constexpr int kNT = BN / 8, kDT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * SD;
  T* sK = sdO + BM * SD;  // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;

  const int mb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z + p.batch_offset;  // heavy (causal) tiles first
  const SeqInfo si = seq_info(p, b);
  const int m0 = mb * BM;
  if (m0 >= si.sq_rows) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kvh = h / (p.heads / p.kv_heads);
  const int sq = si.sq, sk = si.sk, off = sk - sq;
  const int rows_here = min(BM, si.sq_rows - m0);
  const int64_t Msq = p.seqlen_q;
  const float* dsum = static_cast<const float*>(p.workspace);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + int64_t(si.q_start + m0) * p.q_row_stride +
                int64_t(h) * p.q_head_stride;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_batch_stride + int64_t(si.q_start + m0) * p.do_row_stride +
                 int64_t(h) * p.do_head_stride;
  const T* kgp = static_cast<const T*>(p.k) + b * p.k_batch_stride + int64_t(si.k_start) * p.k_row_stride +
                 int64_t(kvh) * p.k_head_stride;
  const T* vgp = static_cast<const T*>(p.v) + b * p.v_batch_stride + int64_t(si.k_start) * p.v_row_stride +
                 int64_t(kvh) * p.v_head_stride;

  const int i_last = m0 + rows_here - 1;
  int j_lo = 0, j_hi = sk;
  if (wl >= 0) j_lo = max(0, m0 + off - wl);
  if (wr >= 0) j_hi = min(sk, i_last + off + wr + 1);
  const int n_lo = j_lo / BN;
  const int n_hi = j_hi > j_lo ? (j_hi + BN - 1) / BN : n_lo;

  // per-row lse (log2 domain, -inf -> +inf) and Dsum for rows g and g + 8 of this warp
  float lrow[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp * 16 + g + r * 8;
    lrow[r] = INFINITY;
    drow[r] = 0.0f;
    if (i < si.sq_rows) {
      const float l = p.lse[b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + si.q_start + i];
      lrow[r] = l == -INFINITY ? INFINITY : l * kLog2e;
      drow[r] = dsum[int64_t(h) * p.batch * Msq + b * Msq + i];
    }
  }

  load_tile<BM, D, SD, NT>(sQ, qg, p.q_row_stride, rows_here, p.head_dim, tid);
  load_tile<BM, D, SD, NT>(sdO, dog, p.do_row_stride, rows_here, p.head_dim, tid);
  auto load_kv = [&](int n, int buf) {
    const int n0 = n * BN;
    load_tile<BN, D, SD, NT>(sK + buf * BN * SD, kgp + int64_t(n0) * p.k_row_stride, p.k_row_stride, sk - n0,
                             p.head_dim, tid);
    load_tile<BN, D, SD, NT>(sV + buf * BN * SD, vgp + int64_t(n0) * p.v_row_stride, p.v_row_stride, sk - n0,
                             p.head_dim, tid);
  };
  if (n_hi > n_lo) load_kv(n_lo, 0);
  cp_async_commit();

  float acc[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;

  const T* sQw = sQ + warp * 16 * SD;
  const T* sdOw = sdO + warp * 16 * SD;
  for (int n = n_lo; n < n_hi; ++n) {
    const int buf = (n - n_lo) & 1;
    const int n0 = n * BN;
    if (n + 1 < n_hi) {
      load_kv(n + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKb = sK + buf * BN * SD;
    const T* sVb = sV + buf * BN * SD;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] = dp[i][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ao[4];
      ldsm_x4(aq, sQw + (lane & 15) * SD + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(ao, sdOw + (lane & 15) * SD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        const int off_b = (np * 16 + (lane >> 4) * 8 + (lane & 7)) * SD + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bk[4], bv[4];
        ldsm_x4(bk, sKb + off_b);
        ldsm_x4(bv, sVb + off_b);
        mma16816<T>(s[2 * np], aq, bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        mma16816<T>(dp[2 * np], ao, bv[0], bv[1]);
        mma16816<T>(dp[2 * np + 1], ao, bv[2], bv[3]);
      }
    }
    const bool need_mask = (n0 + BN > sk) || (wr >= 0 && n0 + BN - 1 > m0 + off + wr) ||
                           (wl >= 0 && n0 < i_last + off - wl);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = c >> 1;
        const float raw = s[nt][c];
        float x, dtanh = 1.0f;
        if (sm.softcap) {
          const float th = tanhf(raw * sm.cap_pre);
          x = sm.cap_post * th;
          dtanh = 1.0f - th * th;
        } else {
          x = raw * sm.scale_log2;
        }
        if (need_mask) {
          const int i = m0 + warp * 16 + g + r * 8, j = n0 + nt * 8 + 2 * t + (c & 1);
          if (!visible(i, j, sq, sk, off, wl, wr)) x = -INFINITY;
        }
        const float pr = exp2f(x - lrow[r]);
        dp[nt][c] = pr * (dp[nt][c] - drow[r]) * dtanh;
      }
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
      a[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
      a[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      a[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bk[4];
        ldsm_x4_t(bk, sKb + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * SD + dd * 16 + (lane >> 4) * 8);
        mma16816<T>(acc[2 * dd], a, bk[0], bk[1]);
        mma16816<T>(acc[2 * dd + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();  // done with buffer buf before it is refilled
  }
  cp_async_wait<0>();

  T* dqg = static_cast<T*>(p.dq) + b * p.dq_batch_stride + int64_t(si.q_start + m0) * p.dq_row_stride +
           int64_t(h) * p.dq_head_stride;
  const float scale = p.softmax_scale;
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + r * 8;
      const int col = dt * 8 + 2 * t;
      if (row < rows_here && col < p.head_dim)
        *reinterpret_cast<uint32_t*>(dqg + int64_t(row) * p.dq_row_stride + col) =
            pack2<T>(acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale);
    }
}

// Launches the main kernels of the backward for one (dtype, head dim) instantiation; the
// Dsum pre-kernel and the dQ conversion run in flash_api.cu around it.
template <typename T, int D>
void run_flash_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  int wl, wr;
  effective_window(p, wl, wr);
  const ScoreMap sm = make_score_map(p);
  {
    using Cfg = BwdCfg<D>;
    const int nblocks = (p.seqlen_k + Cfg::BN - 1) / Cfg::BN;
    for (int b0 = 0; nblocks > 0 && b0 < p.batch; b0 += kMaxGridZ) {  // grid z <= 65535: batches in slices
      AttentionBwdParams ps = p;
      ps.batch_offset = b0;
      launch_with_smem<flash_bwd_kv_kernel<T, D>>(dim3(nblocks, p.kv_heads, std::min(kMaxGridZ, p.batch - b0)),
                                                  Cfg::kThreads, int(Cfg::kSmem), stream, "flash_attention_bwd (dk, dv)",
                                                  ps, sm, wl, wr);
      check_launch("flash_attention_bwd (dk, dv)");
    }
  }
  if (p.deterministic) {
    using Cfg = BwdDqCfg<D>;
    const int mblocks = (p.seqlen_q + Cfg::BM - 1) / Cfg::BM;
    for (int b0 = 0; mblocks > 0 && b0 < p.batch; b0 += kMaxGridZ) {
      AttentionBwdParams ps = p;
      ps.batch_offset = b0;
      launch_with_smem<flash_bwd_dq_kernel<T, D>>(dim3(mblocks, p.heads, std::min(kMaxGridZ, p.batch - b0)),
                                                  Cfg::kThreads, int(Cfg::kSmem), stream, "flash_attention_bwd (dq)",
                                                  ps, sm, wl, wr);
      check_launch("flash_attention_bwd (dq)");
    }
  }
}

}  // namespace thrifty::cuda::flash
