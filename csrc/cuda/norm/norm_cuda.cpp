// CUDA glue for the RMSNorm ops: check, fill params, launch on the current stream.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/norm_glue.h"
#include "cuda/norm/norm_launch.h"

namespace thrifty {
namespace {

constexpr int64_t kMaxHiddenBwd = 49152;  // grad_weight partials live in shared memory (192 KB)

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  RmsNormParams p;
  at::Tensor x2, r2;
  auto out = rms_norm_prepare("rms_norm", x, weight, eps, c10::nullopt, p, x2, r2);
  if (p.rows > 0) cuda::launch_rms_norm_fwd(p, c10::cuda::getCurrentCUDAStream());
  return {out.y, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                       const at::Tensor& weight, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  RmsNormParams p;
  at::Tensor x2, r2;
  auto out = rms_norm_prepare("fused_add_rms_norm", x, weight, eps, residual, p, x2, r2);
  if (p.rows > 0) cuda::launch_rms_norm_fwd(p, c10::cuda::getCurrentCUDAStream());
  return {out.y, out.h, out.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          const c10::optional<at::Tensor>& grad_h) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  RmsNormBwdParams p;
  std::vector<at::Tensor> keep;
  auto out = rms_norm_bwd_prepare("rms_norm_backward", grad_y, x, weight, rstd, grad_h, p, keep);
  TORCH_CHECK_VALUE(p.hidden <= kMaxHiddenBwd, "thrifty.rms_norm_backward: CUDA supports hidden sizes up to ",
                    kMaxHiddenBwd, " (got ", p.hidden, ")");
  if (p.rows == 0) {
    out.grad_weight.zero_();
    return {out.grad_x, out.grad_weight};
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  p.chunks = cuda::rms_norm_bwd_blocks(p.rows, sms);
  auto partial = at::empty({p.chunks, p.hidden}, x.options().dtype(at::kFloat));
  p.grad_weight_partial = partial.data_ptr<float>();
  cuda::launch_rms_norm_bwd(p, out.grad_weight.data_ptr(), c10::cuda::getCurrentCUDAStream());
  return {out.grad_x, out.grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace thrifty
