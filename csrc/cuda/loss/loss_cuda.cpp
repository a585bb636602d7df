// CUDA glue for linear_cross_entropy: the shared loops (common/loss_glue.h; matmuls through
// at::mm, i.e. cuBLAS) with the fused softmax / loss / gradient kernels on the current stream.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/loss_glue.h"
#include "cuda/loss/loss_launch.h"

namespace thrifty {
namespace {

void ce_fwd_cuda(const CeFwdParams& p) { cuda::launch_ce_fwd(p, c10::cuda::getCurrentCUDAStream()); }
void ce_grad_cuda(const CeGradParams& p) { cuda::launch_ce_grad(p, c10::cuda::getCurrentCUDAStream()); }

std::tuple<at::Tensor, at::Tensor> lce_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                            int64_t ignore_index, int64_t reduction, double label_smoothing,
                                            double softcap, int64_t chunk_size) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(hidden));
  auto r = lce_forward(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, chunk_size,
                       &ce_fwd_cuda);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_keep_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                         const at::Tensor& labels, int64_t ignore_index,
                                                         int64_t reduction, double label_smoothing, double softcap) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(hidden));
  return lce_forward(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, 0, &ce_fwd_cuda,
                     /*keep=*/true);
}

std::tuple<at::Tensor, at::Tensor> lce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                     const at::Tensor& weight, const at::Tensor& labels,
                                                     const at::Tensor& lse, int64_t ignore_index, int64_t reduction,
                                                     double label_smoothing, double softcap, int64_t chunk_size,
                                                    const c10::optional<at::Tensor>& logits) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(hidden));
  return lce_backward(grad_loss, hidden, weight, labels, lse, ignore_index, reduction, label_smoothing, softcap,
                      chunk_size, &ce_grad_cuda, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("linear_cross_entropy", &lce_cuda);
  m.impl("linear_cross_entropy_keep_logits", &lce_keep_cuda);
  m.impl("linear_cross_entropy_backward", &lce_backward_cuda);
}

}  // namespace thrifty
