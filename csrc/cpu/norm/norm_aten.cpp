// CPU glue for the RMSNorm ops: check, fill params, call the ISA-dispatched core.
#include <torch/library.h>

#include "common/norm_glue.h"
#include "cpu/norm/norm_kernels.h"

namespace thrifty {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RmsNormParams p;
  at::Tensor x2, r2;
  auto out = rms_norm_prepare("rms_norm", x, weight, eps, c10::nullopt, p, x2, r2);
  if (p.rows > 0) THRIFTY_CPU_DISPATCH(rms_norm_fwd, p);
  return {out.y, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, double eps) {
  RmsNormParams p;
  at::Tensor x2, r2;
  auto out = rms_norm_prepare("fused_add_rms_norm", x, weight, eps, residual, p, x2, r2);
  if (p.rows > 0) THRIFTY_CPU_DISPATCH(rms_norm_fwd, p);
  return {out.y, out.h, out.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         const c10::optional<at::Tensor>& grad_h) {
  RmsNormBwdParams p;
  std::vector<at::Tensor> keep;
  auto out = rms_norm_bwd_prepare("rms_norm_backward", grad_y, x, weight, rstd, grad_h, p, keep);
  // Fixed chunking of rows (not per thread) keeps grad_weight bitwise reproducible.
  p.chunks = std::max<int64_t>(1, std::min<int64_t>(p.rows, 64));
  auto partial = at::empty({p.chunks, p.hidden}, x.options().dtype(at::kFloat));
  p.grad_weight_partial = partial.data_ptr<float>();
  if (p.rows > 0) {
    THRIFTY_CPU_DISPATCH(rms_norm_bwd, p);
    THRIFTY_CPU_DISPATCH(rms_norm_reduce_grad_weight, partial.data_ptr<float>(), p.chunks, p.hidden, p.wdtype,
                         out.grad_weight.data_ptr());
  } else {
    out.grad_weight.zero_();
  }
  return {out.grad_x, out.grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace thrifty
