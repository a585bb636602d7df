// Parameters of the fused attention kernels (CPU and CUDA). Strides are in elements; the
// head_dim axis is always contiguous.
//
// Layouts (batched):  q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, kv_heads, head_dim),
//                     out like q, lse (batch, heads, seqlen_q) float32.
// Layouts (varlen):   q (total_q, heads, head_dim), k/v (total_k, kv_heads, head_dim), out like q,
//                     lse (heads, total_q) float32; sequence b spans rows
//                     cu_seqlens_q[b] .. cu_seqlens_q[b+1] (int32, batch+1 entries) and likewise for k.
//                     In varlen mode batch_stride_* are 0 and the row offsets come from cu_seqlens.
// Masking (all positions relative to the bottom-right-aligned diagonal, offset = seqlen_k - seqlen_q
// of each sequence): query i sees key j iff
//     (window_left  < 0 || j >= i + offset - window_left) &&
//     (window_right < 0 || j <= i + offset + window_right)
// causal is window_right = 0 (the glue folds it in; the flag stays for kernel specialisation).
// A query row that sees no key gets out = 0 and lse = -inf.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct AttentionParams {
  DType dtype = DType::f32;
  int batch = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int seqlen_q = 0, seqlen_k = 0;  // batched: the sizes; varlen: max_seqlen_q / max_seqlen_k
  bool varlen = false;
  const int32_t* cu_seqlens_q = nullptr;  // varlen only, (batch + 1)
  const int32_t* cu_seqlens_k = nullptr;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse[b, h, i] (batched) or lse[h, row] (varlen)

  float softmax_scale = 1.0f;
  bool causal = false;
  int window_left = -1, window_right = -1;  // -1: unbounded
  float softcap = 0.0f;                     // 0: off; else scores = softcap * tanh(scores / softcap)
  // CUDA: the batch index of a launch's blockIdx.z = 0 (a grid's z holds at most 65535 batches, so larger
  // batches run as several launches); batch stays the whole batch, for the layouts indexed by it.
  int batch_offset = 0;
};

struct AttentionBwdParams : AttentionParams {
  const void* dout = nullptr;  // like out
  void* dq = nullptr;          // like q (contiguous)
  void* dk = nullptr;          // like k (contiguous)
  void* dv = nullptr;          // like v (contiguous)
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  bool deterministic = false;
  void* workspace = nullptr;   // kernel-specific scratch (e.g. float32 dq accumulator, softmax row sums D = rowsum(dO*O))
};

}  // namespace thrifty
