// CPU glue for the quantized linear ops: check, fill params, allocate scratch, call the ISA-dispatched core.
#include <torch/library.h>

#include "common/quant_glue.h"
#include "cpu/quant/quant_kernels.h"

namespace thrifty {
namespace {

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                            const c10::optional<at::Tensor>& bias) {
  QuantLinearParams p;
  auto r = quant_linear_prepare("quant_linear", x, qweight, scales, zeros, bits, group_size, bias, p);
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  p.xbuf_stride = (p.K + 31) / 32 * 32;
  auto xbuf = at::empty({p.M * p.xbuf_stride}, x.options().dtype(at::kFloat));
  auto xsum = at::empty({p.M * (p.K / p.group_size)}, x.options().dtype(at::kFloat));
  p.xbuf = xbuf.data_ptr<float>();
  p.xsum = xsum.data_ptr<float>();
  THRIFTY_CPU_DISPATCH(quant_linear_fwd, p);
  return r.y;
}

at::Tensor quant_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                                const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
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
  if (N > 0 && K > 0) THRIFTY_CPU_DISPATCH(quant_dequantize, p);
  return w;
}

at::Tensor int8_linear_cpu(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& wq,
                           const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias,
                           c10::optional<at::ScalarType> out_dtype) {
  Int8LinearParams p;
  auto r = int8_linear_prepare("int8_linear", xq, x_scales, wq, w_scales, bias, out_dtype, p);
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  p.Kp = (p.K + 63) / 64 * 64;
  auto xbuf = at::empty({p.M * p.Kp}, xq.options().dtype(at::kShort));
  p.xbuf = xbuf.data_ptr<int16_t>();
  THRIFTY_CPU_DISPATCH(int8_linear_fwd, p);
  return r.y;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  QuantizePerTokenParams p;
  auto r = quantize_per_token_prepare("quantize_per_token", x, p);
  if (p.rows > 0) {
    if (p.K == 0) r.scales.zero_();
    else THRIFTY_CPU_DISPATCH(quantize_per_token_fwd, p);
  }
  return {r.xq, r.scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("quant_dequantize", &quant_dequantize_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("quantize_per_token", &quantize_per_token_cpu);
}

}  // namespace thrifty
