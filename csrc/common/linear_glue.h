// Device-agnostic argument checks (and, for the CPU core, output allocation and params) of
// thrifty.linear; the CPU and CUDA glue both call linear_check, so their messages agree.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/linear_params.h"

namespace thrifty {

inline void linear_check(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  check_floating(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_dim(op, "weight", weight, 2);
  check_same_device(op, "weight", weight, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  check_size(op, "weight", weight, 1, x.size(-1), "in_features = x.size(-1)");
  // A transposed weight would be copied on every call: say so instead of hiding the cost.
  check_last_dim_contiguous(op, "weight", weight);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    check_same_device(op, "bias", b, "x", x);
    check_same_dtype(op, "bias", b, "x", x);
    check_dim(op, "bias", b, 1);
    check_size(op, "bias", b, 0, weight.size(0), "out_features = weight.size(0)");
  }
}

struct LinearPrep {
  at::Tensor y, x2, bias;
};

// Checks, takes x as (M, K) rows (a copy only when its last dim is strided), allocates y (..., N)
// contiguous and fills p (no scratch: the CPU glue adds it).
inline LinearPrep linear_prepare(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, LinearParams& p) {
  linear_check(op, x, weight, bias);
  const int64_t K = x.size(-1), N = weight.size(0);
  LinearPrep r;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  r.x2 = x.reshape({M, K});  // not {-1, K}: K may be 0
  if (K > 1 && r.x2.stride(1) != 1) r.x2 = r.x2.contiguous();
  if (bias.has_value() && bias->defined()) r.bias = bias->contiguous();
  auto shape = x.sizes().vec();
  shape.back() = N;
  r.y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  p.M = r.x2.size(0);
  p.K = K;
  p.N = N;
  p.dtype = to_dtype(op, "x", x);
  p.x = r.x2.data_ptr();
  p.x_stride = p.M > 1 ? r.x2.stride(0) : K;
  p.w = weight.data_ptr();
  p.w_stride = N > 1 ? weight.stride(0) : K;
  p.bias = r.bias.defined() ? r.bias.data_ptr() : nullptr;
  p.y = r.y.data_ptr();
  return r;
}

}  // namespace thrifty
