// CUDA glue for the SwiGLU ops: check, fill params, launch on the current stream.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/activation_glue.h"
#include "cuda/activation/activation_launch.h"

namespace thrifty {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(gate));
  SwigluParams p;
  std::vector<at::Tensor> keep;
  auto out = swiglu_prepare("swiglu", gate, up, p, keep);
  cuda::launch_swiglu_fwd(p, c10::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(gate));
  SwigluParams p;
  std::vector<at::Tensor> keep;
  auto out = swiglu_bwd_prepare("swiglu_backward", grad, gate, up, p, keep);
  cuda::launch_swiglu_bwd(p, c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace thrifty
