// Device building blocks of the FlashAttention-2 kernels (sm_80+): cp.async tile loads with
// zero fill, ldmatrix, mma.sync m16n8k16 (bf16/f16 in, f32 accumulate), the mask test.
//
// Fragment layouts of mma.m16n8k16: cuda/mma.cuh.
// Shared-memory tiles are row major with rows padded by 8 elements (16 bytes), which makes the
// 8 row addresses of every ldmatrix hit 8 distinct 16-byte bank groups for all head dims used.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/attention_params.h"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/mma.cuh"

namespace thrifty::cuda::flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxGridZ = 65535;  // gridDim.y and .z limit: batches beyond it run in slices (batch_offset)

// 16 bytes global -> shared, asynchronously; zero-fills the destination when !pred (commit / wait and
// smem_addr: cuda/cp_async.cuh).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// Loads rows [0, ROWS) x cols [0, D) of a tile into shared memory (row stride SD elements) with
// cp.async; rows >= valid_rows and 8-column chunks at or past head_dim are zero-filled.
// Needs head_dim % 8 == 0, row_stride % 8 == 0 and a 16-byte aligned base (the glue checks).
template <int ROWS, int D, int SD, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int head_dim,
                                          int tid) {
  constexpr int kChunks = D / 8, kTotal = ROWS * kChunks, kIters = (kTotal + NTHREADS - 1) / NTHREADS;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = tid + it * NTHREADS;
    if (kTotal % NTHREADS != 0 && c >= kTotal) break;
    const int r = c / kChunks, ch = c % kChunks;
    const bool pred = r < valid_rows && ch * 8 < head_dim;
    const T* src = pred ? gmem + r * row_stride + ch * 8 : gmem;
    cp_async16(smem + r * SD + ch * 8, src, pred);
  }
}

// Scratch layout (workspace), Msq = max_seqlen_q (batched: seqlen_q), rows indexed b * Msq + i:
//   dsum   float [heads][batch * Msq]
//   dq_acc float [batch * Msq][heads][Dk]        (non-deterministic mode only)
inline __host__ __device__ size_t bwd_dsum_bytes(const AttentionParams& p) {
  const size_t n = size_t(p.heads) * size_t(p.batch) * size_t(p.seqlen_q) * sizeof(float);
  return (n + 255) & ~size_t(255);
}

// Whether query i (row in its sequence) sees key j; off = seqlen_k - seqlen_q.
__device__ __forceinline__ bool visible(int i, int j, int sq, int sk, int off, int wl, int wr) {
  return i < sq && j < sk && (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr);
}

// Scaled score in the log2 domain: scale * s (optionally soft-capped) times log2(e).
struct ScoreMap {
  float scale_log2;  // no softcap: scale * log2e
  float cap_pre;     // softcap: scale / softcap
  float cap_post;    // softcap: softcap * log2e
  bool softcap;
  __device__ __forceinline__ float operator()(float s) const {
    return softcap ? cap_post * tanhf(s * cap_pre) : s * scale_log2;
  }
};

inline ScoreMap make_score_map(const AttentionParams& p) {
  ScoreMap m;
  m.softcap = p.softcap > 0.0f;
  m.scale_log2 = p.softmax_scale * kLog2e;
  m.cap_pre = m.softcap ? p.softmax_scale / p.softcap : 0.0f;
  m.cap_post = p.softcap * kLog2e;
  return m;
}

// Effective window bounds with causal folded in (window_right <= 0).
inline void effective_window(const AttentionParams& p, int& wl, int& wr) {
  wl = p.window_left;
  wr = p.window_right;
  if (p.causal) wr = 0;  // j <= i + offset (and wr >= 0 can only narrow it further to 0)
}

// Sequence bounds of batch entry b.
struct SeqInfo {
  int q_start, k_start, sq, sk;
  int sq_rows;  // query rows processed: min(sq, max_seqlen_q) (rows past the declared maximum are skipped)
};
__device__ __forceinline__ SeqInfo seq_info(const AttentionParams& p, int b) {
  SeqInfo s;
  if (p.varlen) {
    s.q_start = p.cu_seqlens_q[b];
    s.sq = p.cu_seqlens_q[b + 1] - s.q_start;
    s.k_start = p.cu_seqlens_k[b];
    s.sk = p.cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
  }
  s.sq_rows = s.sq < p.seqlen_q ? s.sq : p.seqlen_q;
  return s;
}

}  // namespace thrifty::cuda::flash
