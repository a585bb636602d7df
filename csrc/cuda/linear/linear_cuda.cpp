// CUDA glue of thrifty.linear. No kernel of our own: cuBLAS (through at::linear) already runs bf16/f16
// GEMMs and GEMVs with float32 accumulation at memory bandwidth, which is what the CPU core exists to
// provide where torch's CPU path is slow. The checks are the CPU's (common/linear_glue.h), so both
// devices accept and reject the same arguments with the same messages.
#include "cuda/guard.h"
#include <torch/library.h>

#include "common/linear_glue.h"

namespace thrifty {
namespace {

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  linear_check("linear", x, weight, bias);
  return at::linear(x, weight, bias).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) { m.impl("linear", &linear_cuda); }

}  // namespace thrifty
