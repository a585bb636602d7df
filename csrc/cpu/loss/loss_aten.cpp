// CPU glue for linear_cross_entropy: the shared loops (common/loss_glue.h) with the
// ISA-dispatched fused softmax / loss / gradient kernels.
#include <torch/library.h>

#include "common/loss_glue.h"
#include "cpu/loss/loss_kernels.h"

namespace thrifty {
namespace {

void ce_fwd_cpu(const CeFwdParams& p) { THRIFTY_CPU_DISPATCH(ce_fwd, p); }
void ce_grad_cpu(const CeGradParams& p) { THRIFTY_CPU_DISPATCH(ce_grad, p); }

std::tuple<at::Tensor, at::Tensor> lce_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                           int64_t ignore_index, int64_t reduction, double label_smoothing,
                                           double softcap, int64_t chunk_size) {
  auto r = lce_forward(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, chunk_size,
                       &ce_fwd_cpu);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_keep_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                         const at::Tensor& labels, int64_t ignore_index,
                                                         int64_t reduction, double label_smoothing, double softcap) {
  return lce_forward(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, 0, &ce_fwd_cpu,
                     /*keep=*/true);
}

std::tuple<at::Tensor, at::Tensor> lce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                    const at::Tensor& weight, const at::Tensor& labels,
                                                    const at::Tensor& lse, int64_t ignore_index, int64_t reduction,
                                                    double label_smoothing, double softcap, int64_t chunk_size,
                                                    const c10::optional<at::Tensor>& logits) {
  return lce_backward(grad_loss, hidden, weight, labels, lse, ignore_index, reduction, label_smoothing, softcap,
                      chunk_size, &ce_grad_cpu, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("linear_cross_entropy", &lce_cpu);
  m.impl("linear_cross_entropy_keep_logits", &lce_keep_cpu);
  m.impl("linear_cross_entropy_backward", &lce_backward_cpu);
}

}  // namespace thrifty
