// CUDA glue for the quantized linear ops: check, fill params, launch on the current stream.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/quant_glue.h"
#include "cuda/quant/quant_launch.h"

namespace thrifty {
namespace {

at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             const c10::optional<at::Tensor>& bias) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  QuantLinearParams p;
  auto r = quant_linear_prepare("quant_linear", x, qweight, scales, zeros, bits, group_size, bias, p);
  TORCH_CHECK_VALUE(bits != 4 || (reinterpret_cast<uintptr_t>(qweight.data_ptr()) & 15) == 0,
                    "thrifty.quant_linear: argument 'qweight' must be 16-byte aligned on CUDA (clone it)");
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  cuda::launch_quant_linear(p, c10::cuda::getCurrentCUDAStream());
  return r.y;
}

at::Tensor quant_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(qweight));
  int64_t K = -1;
  const int64_t N = check_packed_weight("quant_dequantize", qweight, scales, zeros, bits, group_size, K);
  auto s = scales.contiguous();
  at::Tensor z;
  auto w = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  DequantParams p;
  p.K = K;
  p.N = N;
  p.bits = static_cast<int>(bits);
  p.group_size = bits == 4 ? group_size : K;
  p.qweight = qweight.data_ptr();
  p.scales = s.data_ptr<float>();
  if (bits == 4) {
    z = zeros->contiguous();
    p.zeros = z.data_ptr<float>();
  }
  p.w = w.data_ptr<float>();
  if (N > 0 && K > 0) cuda::launch_quant_dequantize(p, c10::cuda::getCurrentCUDAStream());
  return w;
}

at::Tensor int8_linear_cuda(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& wq,
                            const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias,
                            c10::optional<at::ScalarType> out_dtype) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(xq));
  Int8LinearParams p;
  auto r = int8_linear_prepare("int8_linear", xq, x_scales, wq, w_scales, bias, out_dtype, p);
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  cuda::launch_int8_linear(p, c10::cuda::getCurrentCUDAStream());
  return r.y;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  QuantizePerTokenParams p;
  auto r = quantize_per_token_prepare("quantize_per_token", x, p);
  if (p.rows > 0) {
    if (p.K == 0) r.scales.zero_();
    else cuda::launch_quantize_per_token(p, c10::cuda::getCurrentCUDAStream());
  }
  return {r.xq, r.scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("quant_linear", &quant_linear_cuda);
  m.impl("quant_dequantize", &quant_dequantize_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("quantize_per_token", &quantize_per_token_cuda);
}

}  // namespace thrifty
