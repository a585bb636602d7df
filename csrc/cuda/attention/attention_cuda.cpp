// CUDA glue of flash_attention_fwd / flash_attention_bwd: the shared checks of
// common/attention_glue.h, then the CUDA-only rules (bf16/f16 only; head_dim a multiple of 8
// up to 256, run by the kernel sizes 64/96/128/256; 16-byte aligned rows, copied when not),
// the backward's workspace, the current stream and a device guard.
#include <ATen/ATen.h>
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/attention_glue.h"
#include "cuda/attention/attention_launch.h"

namespace thrifty {
namespace {

constexpr int64_t kMaxHeadDim = 256;

// The kernels read rows with 16-byte cp.async: every non-innermost stride must be a multiple of
// 8 elements and the base 16-byte aligned. Returns t or an aligned contiguous copy (kept alive).
at::Tensor aligned16(const at::Tensor& t, std::vector<at::Tensor>& keep) {
  bool ok = (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0 && (t.dim() == 0 || t.stride(-1) == 1);
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  if (ok) return t;
  at::Tensor c = t.contiguous();
  if ((reinterpret_cast<uintptr_t>(c.data_ptr()) & 15u) != 0) c = t.clone(at::MemoryFormat::Contiguous);
  keep.push_back(c);
  return c;
}

void check_cuda_inputs(const char* op, const at::Tensor& q) {
  // the heads are the launch grid's y (at most 65535); batches beyond 65535 run in slices
  TORCH_CHECK_VALUE(q.dim() < 2 || q.size(-2) <= 65535, "thrifty.", op, ": on CUDA at most 65535 heads are supported (got ",
                    q.size(-2), " in 'q' of shape ", q.sizes(), ")");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "thrifty.", op,
                   ": on CUDA argument 'q' must have dtype BFloat16 or Half (got ", q.scalar_type(),
                   "); float32 attention runs on CPU only");
  const int64_t d = q.size(-1);
  TORCH_CHECK_VALUE(d >= 8 && d <= kMaxHeadDim && d % 8 == 0, "thrifty.", op,
                    ": on CUDA head_dim must be a multiple of 8 in [8, 256] (kernels for 64, 96, 128 and 256; "
                    "smaller multiples of 8 are padded), got ",
                    d);
  const DType dt = q.scalar_type() == at::kBFloat16 ? DType::bf16 : DType::f16;
  TORCH_CHECK_VALUE(cuda::flash_attention_compiled(dt, static_cast<int>(d)), "thrifty.", op,
                    ": this build (THRIFTY_FAST_BUILD) has CUDA attention kernels only for bfloat16 with head_dim "
                    "<= 128 (got ",
                    q.scalar_type(), ", head_dim ", d, "); rebuild without THRIFTY_FAST_BUILD");
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const c10::optional<at::Tensor>& cu_seqlens_q,
                                                            const c10::optional<at::Tensor>& cu_seqlens_k,
                                                            int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                            double softmax_scale, bool causal, int64_t window_left,
                                                            int64_t window_right, double softcap) {
  const char* op = "flash_attention_fwd";
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(q));
  check_floating(op, "q", q);
  TORCH_CHECK_VALUE(q.dim() >= 1, "thrifty.", op, ": argument 'q' must have a head_dim axis (got shape ", q.sizes(),
                    ")");
  check_cuda_inputs(op, q);
  std::vector<at::Tensor> keep;
  const at::Tensor q2 = aligned16(q, keep), k2 = aligned16(k, keep), v2 = aligned16(v, keep);
  AttentionParams p;
  AttentionOut r = attention_fwd_prepare(op, q2, k2, v2, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale, causal, window_left, window_right, softcap, kMaxHeadDim, p);
  if (!r.done) cuda::launch_flash_attention_fwd(p, c10::cuda::getCurrentCUDAStream());
  return {r.out, r.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool deterministic) {
  const char* op = "flash_attention_bwd";
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(q));
  check_floating(op, "q", q);
  TORCH_CHECK_VALUE(q.dim() >= 1, "thrifty.", op, ": argument 'q' must have a head_dim axis (got shape ", q.sizes(),
                    ")");
  check_cuda_inputs(op, q);
  std::vector<at::Tensor> keep;
  const at::Tensor q2 = aligned16(q, keep), k2 = aligned16(k, keep), v2 = aligned16(v, keep);
  const at::Tensor do2 = aligned16(grad_out, keep), o2 = aligned16(out, keep);
  AttentionBwdParams p;
  AttentionBwdOut r = attention_bwd_prepare(op, do2, q2, k2, v2, o2, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                                            deterministic, kMaxHeadDim, p);
  if (!r.done) {
    const size_t bytes = cuda::flash_attention_bwd_workspace_bytes(p);
    at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    p.workspace = ws.data_ptr();
    cuda::launch_flash_attention_bwd(p, c10::cuda::getCurrentCUDAStream());
  }
  return {r.dq, r.dk, r.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("flash_attention_fwd", &flash_attention_fwd_cuda);
  m.impl("flash_attention_bwd", &flash_attention_bwd_cuda);
}

}  // namespace thrifty
