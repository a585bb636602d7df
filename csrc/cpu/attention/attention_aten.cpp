// CPU glue for the fused attention ops: shared checks (common/attention_glue.h), then the
// ISA-dispatched kernel cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/attention_glue.h"
#include "cpu/attention/attention_kernels.h"

namespace thrifty {
namespace {

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const c10::optional<at::Tensor>& cu_seqlens_q,
                                                           const c10::optional<at::Tensor>& cu_seqlens_k,
                                                           int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                           double softmax_scale, bool causal, int64_t window_left,
                                                           int64_t window_right, double softcap) {
  AttentionParams p;
  auto o = attention_fwd_prepare("flash_attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                                 kAttnCpuMaxHeadDim, p);
  if (!o.done) THRIFTY_CPU_DISPATCH(flash_attention_fwd_cpu, p);
  return {o.out, o.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool deterministic) {
  AttentionBwdParams p;
  auto o = attention_bwd_prepare("flash_attention_bwd", grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                                 deterministic, kAttnCpuMaxHeadDim, p);
  if (!o.done) {
    // The CPU backward is always deterministic (fixed work split, fixed summation order).
    auto ws = at::empty({attention_cpu_bwd_workspace_floats(p)}, q.options().dtype(at::kFloat));
    p.workspace = ws.data_ptr<float>();
    THRIFTY_CPU_DISPATCH(flash_attention_bwd_cpu, p);
  }
  return {o.dq, o.dk, o.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("flash_attention_fwd", &flash_attention_fwd_cpu);
  m.impl("flash_attention_bwd", &flash_attention_bwd_cpu);
}

}  // namespace thrifty
