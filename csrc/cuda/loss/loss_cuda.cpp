// CUDA glue for linear_cross_entropy: the shared chunk loop (common/loss_glue.h; matmuls
// through at::mm, i.e. cuBLAS) with the fused softmax / loss / gradient kernel on the
// current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/loss_glue.h"
#include "cuda/loss/loss_launch.h"

namespace thrifty {
namespace {

void ce_chunk_cuda(const CeChunkParams& p) { cuda::launch_ce_chunk(p, c10::cuda::getCurrentCUDAStream()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                    const at::Tensor& labels, int64_t ignore_index,
                                                                    int64_t reduction, double label_smoothing,
                                                                    double softcap, bool compute_grad, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lce_forward(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, compute_grad, chunk_size,
                     &ce_chunk_cuda);
}

std::tuple<at::Tensor, at::Tensor> lce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                     const at::Tensor& weight, const at::Tensor& labels,
                                                     const c10::optional<at::Tensor>& grad_hidden,
                                                     const c10::optional<at::Tensor>& grad_weight, int64_t ignore_index,
                                                     int64_t reduction, double label_smoothing, double softcap,
                                                     int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lce_backward(grad_loss, hidden, weight, labels, grad_hidden, grad_weight, ignore_index, reduction,
                      label_smoothing, softcap, chunk_size, &ce_chunk_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("linear_cross_entropy", &lce_cuda);
  m.impl("linear_cross_entropy_backward", &lce_backward_cuda);
}

}  // namespace thrifty
