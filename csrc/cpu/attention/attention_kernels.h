// Torch-free fused attention kernel cores for the CPU, one copy per ISA level (see
// common/cpu_isa.h), and the layout of the backward's workspace (shared with the glue).
#pragma once
#include <cstdint>

#include "common/attention_params.h"
#include "common/cpu_isa.h"

// out, lse from q, k, v (see common/attention_params.h).
THRIFTY_DECLARE_CPU_KERNEL(void, flash_attention_fwd_cpu, (const ::thrifty::AttentionParams& p))
// dq, dk, dv; p.workspace must hold attention_cpu_bwd_workspace_floats(p) floats
// (contents need not be initialised).
THRIFTY_DECLARE_CPU_KERNEL(void, flash_attention_bwd_cpu, (const ::thrifty::AttentionBwdParams& p))

namespace thrifty {

constexpr int kAttnCpuBlockQ = 64;    // query rows per tile
constexpr int kAttnCpuBlockK = 64;    // keys per tile
constexpr int kAttnCpuDecodeRows = 4;  // up to this many query rows per sequence: the untiled forward
constexpr int kAttnCpuDimPad = 16;    // float rows of the workspace are padded to a multiple of this
constexpr int kAttnCpuMaxHeadDim = 256;

inline int64_t attention_cpu_pad_dim(int64_t d) { return (d + kAttnCpuDimPad - 1) / kAttnCpuDimPad * kAttnCpuDimPad; }

// Rows of the query index space: batch * seqlen_q (batched) or cu_seqlens_q[batch] (varlen).
inline int64_t attention_cpu_q_rows(const AttentionParams& p) {
  return p.varlen ? static_cast<int64_t>(p.cu_seqlens_q[p.batch]) : static_cast<int64_t>(p.batch) * p.seqlen_q;
}

// The backward splits the key tiles of each (batch, kv_head) into this many interleaved
// chunks, each with its own float32 dq accumulator, summed in chunk order at the end. The
// count depends only on the problem (never on the thread count), so results are bitwise
// reproducible whatever the number of threads.
inline int attention_cpu_bwd_chunks(const AttentionParams& p) {
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t k_tiles = (static_cast<int64_t>(p.seqlen_k) + kAttnCpuBlockK - 1) / kAttnCpuBlockK;
  int64_t nc = (32 + tasks - 1) / tasks;  // aim at >= 32 tasks for load balance
  if (nc > k_tiles) nc = k_tiles;
  if (nc > 16) nc = 16;
  if (nc < 1) nc = 1;
  return static_cast<int>(nc);
}

// Workspace: D = rowsum(dO * O) as [heads][rows] floats, then the dq accumulators as
// [chunks][heads][rows][pad_dim(head_dim)] floats.
inline int64_t attention_cpu_bwd_workspace_floats(const AttentionParams& p) {
  const int64_t rows = attention_cpu_q_rows(p);
  return p.heads * rows * (1 + attention_cpu_bwd_chunks(p) * attention_cpu_pad_dim(p.head_dim));
}

}  // namespace thrifty
