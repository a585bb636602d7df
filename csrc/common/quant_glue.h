// Device-agnostic argument checks and output allocation for the quantized linear ops; the
// CPU and CUDA glue both call these, then hand the params to their kernels.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/quant_params.h"

namespace thrifty {

// Largest K for which int8 x int8 sums cannot overflow int32 (128 * 128 * K < 2^31).
constexpr int64_t kInt8MaxK = 131072;

// (rows, K) view of x (..., K); rows given explicitly, as reshape({-1, 0}) is ambiguous for K = 0.
inline at::Tensor quant_rows_2d(const at::Tensor& x) {
  auto x2 = x.reshape({leading_rows(x), x.size(-1)});
  if (x2.size(-1) > 1 && x2.stride(-1) != 1) x2 = x2.contiguous();
  return x2;
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t N, const at::Tensor& ref,
                       const char* ref_name, bool allow_any_float) {
  if (!bias.has_value() || !bias->defined()) return;
  const at::Tensor& b = *bias;
  check_same_device(op, "bias", b, ref_name, ref);
  check_dim(op, "bias", b, 1);
  check_size(op, "bias", b, 0, N, "out_features");
  if (allow_any_float) {
    check_floating(op, "bias", b);
  } else {
    TORCH_CHECK_TYPE(b.scalar_type() == ref.scalar_type() || b.scalar_type() == at::kFloat, "thrifty.", op,
                     ": argument 'bias' must have the dtype of '", ref_name, "' (", ref.scalar_type(),
                     ") or Float, got ", b.scalar_type());
  }
}

// Validates a packed weight (qweight, scales, zeros, bits, group_size) for in_features K (K < 0: take it
// from qweight). Returns N. Shared by quant_linear and quant_dequantize.
inline int64_t check_packed_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                                   const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                   int64_t& K) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "thrifty.", op, ": argument 'bits' must be 4 or 8 (got ", bits, ")");
  check_dim(op, "qweight", qweight, 2);
  check_dtype(op, "scales", scales, {at::kFloat});
  check_same_device(op, "scales", scales, "qweight", qweight);
  const int64_t N = qweight.size(0);
  if (bits == 8) {
    check_dtype(op, "qweight", qweight, {at::kChar});
    if (K < 0) K = qweight.size(1);
    check_size(op, "qweight", qweight, 1, K, "in_features; bits=8 stores one int8 per weight, (out_features, in_features)");
    TORCH_CHECK_VALUE(group_size == -1 || group_size == 0 || group_size == K, "thrifty.", op,
                      ": bits=8 weights are quantized per output channel; argument 'group_size' must be -1 (or 0, "
                      "or in_features=", K, "), got ", group_size);
    TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == N, "thrifty.", op,
                      ": argument 'scales' must have shape (out_features,) = (", N, ",) for bits=8 (got shape ",
                      scales.sizes(), ")");
    TORCH_CHECK_VALUE(!zeros.has_value() || !zeros->defined(), "thrifty.", op,
                      ": argument 'zeros' must be None for bits=8 (symmetric per-channel int8)");
  } else {
    check_dtype(op, "qweight", qweight, {at::kByte});
    if (K < 0) K = 2 * qweight.size(1);
    TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0, "thrifty.", op,
                      ": argument 'group_size' must be a positive multiple of 32 (32, 64, 128, ...) for bits=4, got ",
                      group_size);
    TORCH_CHECK_VALUE(K % group_size == 0, "thrifty.", op, ": in_features K=", K,
                      " is not a multiple of group_size=", group_size,
                      " (bits=4 quantizes whole groups of group_size input features)");
    check_size(op, "qweight", qweight, 1, K / 2,
               "in_features / 2; bits=4 packs two 4-bit weights per uint8, (out_features, in_features / 2)");
    TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group_size, "thrifty.", op,
                      ": argument 'scales' must have shape (out_features, in_features / group_size) = (", N, ", ",
                      K / group_size, ") for bits=4 (got shape ", scales.sizes(), ")");
    TORCH_CHECK_VALUE(zeros.has_value() && zeros->defined(), "thrifty.", op,
                      ": argument 'zeros' is required for bits=4 (asymmetric group-wise, w = (q - zeros) * scales)");
    check_dtype(op, "zeros", *zeros, {at::kFloat});
    check_same_device(op, "zeros", *zeros, "qweight", qweight);
    check_same_shape(op, "zeros", *zeros, "scales", scales);
  }
  check_contiguous(op, "qweight", qweight);
  return N;
}

struct QuantLinearPrep {
  at::Tensor y, x2, scales, zeros, bias;
};

inline QuantLinearPrep quant_linear_prepare(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                            const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                                            int64_t bits, int64_t group_size, const c10::optional<at::Tensor>& bias,
                                            QuantLinearParams& p) {
  check_floating(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_same_device(op, "qweight", qweight, "x", x);
  int64_t K = x.size(-1);
  const int64_t N = check_packed_weight(op, qweight, scales, zeros, bits, group_size, K);
  check_bias(op, bias, N, x, "x", false);
  QuantLinearPrep r;
  r.x2 = quant_rows_2d(x);
  r.scales = scales.contiguous();
  if (bits == 4) r.zeros = zeros->contiguous();
  if (bias.has_value() && bias->defined()) r.bias = bias->contiguous();
  auto shape = x.sizes().vec();
  shape.back() = N;
  r.y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  p.M = r.x2.size(0);
  p.K = K;
  p.N = N;
  p.bits = static_cast<int>(bits);
  p.group_size = bits == 4 ? group_size : K;
  p.dtype = to_dtype(op, "x", x);
  p.x = r.x2.data_ptr();
  p.x_stride = r.x2.size(0) > 1 ? r.x2.stride(0) : K;
  p.qweight = qweight.data_ptr();
  p.scales = r.scales.data_ptr<float>();
  p.zeros = bits == 4 ? r.zeros.data_ptr<float>() : nullptr;
  if (r.bias.defined()) {
    p.bias = r.bias.data_ptr();
    p.bias_dtype = to_dtype(op, "bias", r.bias);
  }
  p.y = r.y.data_ptr();
  return r;
}

struct Int8LinearPrep {
  at::Tensor y, xq2, xs, wq, ws, bias;
};

inline Int8LinearPrep int8_linear_prepare(const char* op, const at::Tensor& xq, const at::Tensor& x_scales,
                                          const at::Tensor& wq, const at::Tensor& w_scales,
                                          const c10::optional<at::Tensor>& bias,
                                          c10::optional<at::ScalarType> out_dtype, Int8LinearParams& p) {
  check_dtype(op, "xq", xq, {at::kChar});
  check_min_dim(op, "xq", xq, 1);
  check_dtype(op, "x_scales", x_scales, {at::kFloat});
  check_dtype(op, "wq", wq, {at::kChar});
  check_dim(op, "wq", wq, 2);
  check_dtype(op, "w_scales", w_scales, {at::kFloat});
  check_same_device(op, "x_scales", x_scales, "xq", xq);
  check_same_device(op, "wq", wq, "xq", xq);
  check_same_device(op, "w_scales", w_scales, "xq", xq);
  const int64_t K = xq.size(-1), N = wq.size(0), M = leading_rows(xq);
  check_size(op, "wq", wq, 1, K, "in_features, xq.size(-1)");
  TORCH_CHECK_VALUE(K <= kInt8MaxK, "thrifty.", op, ": in_features K=", K, " is too large for int32 accumulation (at most ",
                    kInt8MaxK, ")");
  TORCH_CHECK_VALUE(x_scales.numel() == M && (x_scales.dim() == xq.dim() - 1 ||
                    (x_scales.dim() == xq.dim() && x_scales.size(-1) == 1)),
                    "thrifty.", op, ": argument 'x_scales' must have one value per row of 'xq', shape ",
                    xq.sizes().slice(0, xq.dim() - 1), " or with a trailing 1 (got shape ", x_scales.sizes(), ")");
  TORCH_CHECK_VALUE(w_scales.dim() == 1 && w_scales.size(0) == N, "thrifty.", op,
                    ": argument 'w_scales' must have shape (out_features,) = (", N, ",) (got shape ", w_scales.sizes(), ")");
  check_bias(op, bias, N, xq, "xq", true);
  const at::ScalarType odt = out_dtype.has_value() ? *out_dtype : at::kFloat;
  TORCH_CHECK_TYPE(odt == at::kFloat || odt == at::kBFloat16 || odt == at::kHalf, "thrifty.", op,
                   ": argument 'out_dtype' must be Float, BFloat16 or Half (got ", odt, ")");
  Int8LinearPrep r;
  r.xq2 = xq.reshape({M, K}).contiguous();
  r.xs = x_scales.reshape({-1}).contiguous();
  TORCH_CHECK_VALUE(wq.is_contiguous(), "thrifty.", op, ": argument 'wq' must be contiguous (got strides ",
                    wq.strides(), ")");
  r.wq = wq;
  r.ws = w_scales.contiguous();
  if (bias.has_value() && bias->defined()) r.bias = bias->contiguous();
  auto shape = xq.sizes().vec();
  shape.back() = N;
  r.y = at::empty(shape, xq.options().dtype(odt));
  p.M = M;
  p.K = K;
  p.N = N;
  p.xq = r.xq2.data_ptr<int8_t>();
  p.x_scales = r.xs.data_ptr<float>();
  p.wq = r.wq.data_ptr<int8_t>();
  p.w_scales = r.ws.data_ptr<float>();
  if (r.bias.defined()) {
    p.bias = r.bias.data_ptr();
    p.bias_dtype = to_dtype(op, "bias", r.bias);
  }
  p.out_dtype = odt == at::kFloat ? DType::f32 : (odt == at::kBFloat16 ? DType::bf16 : DType::f16);
  p.y = r.y.data_ptr();
  return r;
}

struct QuantizePerTokenPrep {
  at::Tensor xq, scales, x2;
};

inline QuantizePerTokenPrep quantize_per_token_prepare(const char* op, const at::Tensor& x, QuantizePerTokenParams& p) {
  check_floating(op, "x", x);
  check_min_dim(op, "x", x, 1);
  QuantizePerTokenPrep r;
  r.x2 = quant_rows_2d(x);
  r.xq = at::empty(x.sizes(), x.options().dtype(at::kChar).memory_format(at::MemoryFormat::Contiguous));
  auto sshape = x.sizes().vec();
  sshape.back() = 1;
  r.scales = at::empty(sshape, x.options().dtype(at::kFloat));
  p.rows = r.x2.size(0);
  p.K = x.size(-1);
  p.dtype = to_dtype(op, "x", x);
  p.x = r.x2.data_ptr();
  p.x_stride = p.rows > 1 ? r.x2.stride(0) : p.K;
  p.xq = r.xq.data_ptr<int8_t>();
  p.scales = r.scales.data_ptr<float>();
  return r;
}

}  // namespace thrifty
