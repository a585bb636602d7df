// CPU glue for the SwiGLU ops: check, fill params, call the ISA-dispatched core.
#include <torch/library.h>

#include "common/activation_glue.h"
#include "cpu/activation/activation_kernels.h"

namespace thrifty {
namespace {

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  SwigluParams p;
  std::vector<at::Tensor> keep;
  auto out = swiglu_prepare("swiglu", gate, up, p, keep);
  if (p.rows > 0 && p.cols > 0) THRIFTY_CPU_DISPATCH(swiglu_fwd, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  SwigluParams p;
  std::vector<at::Tensor> keep;
  auto out = swiglu_bwd_prepare("swiglu_backward", grad, gate, up, p, keep);
  if (p.rows > 0 && p.cols > 0) THRIFTY_CPU_DISPATCH(swiglu_bwd, p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace thrifty
