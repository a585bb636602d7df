// Device-agnostic argument checks and output allocation for the SwiGLU ops; the CPU and
// CUDA glue both call these, then hand the params to their launcher.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "common/activation_params.h"
#include "common/checks.h"
#include "common/norm_glue.h"  // as_rows: (..., n) viewed as (rows, n) without a copy when it can

namespace thrifty {

inline at::Tensor swiglu_prepare(const char* op, const at::Tensor& gate, const at::Tensor& up, SwigluParams& p,
                                 std::vector<at::Tensor>& keep) {
  check_floating(op, "gate", gate);
  check_same_dtype(op, "up", up, "gate", gate);
  check_same_device(op, "up", up, "gate", gate);
  check_min_dim(op, "gate", gate, 1);
  check_same_shape(op, "up", up, "gate", gate);
  auto g2 = as_rows(gate), u2 = as_rows(up);
  keep = {g2, u2};
  auto out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  p.rows = g2.size(0);
  p.cols = gate.size(-1);
  p.dtype = to_dtype(op, "gate", gate);
  p.gate = g2.data_ptr();
  p.gate_stride = g2.stride(0);
  p.up = u2.data_ptr();
  p.up_stride = u2.stride(0);
  p.out = out.data_ptr();
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> swiglu_bwd_prepare(const char* op, const at::Tensor& grad,
                                                             const at::Tensor& gate, const at::Tensor& up,
                                                             SwigluParams& p, std::vector<at::Tensor>& keep) {
  check_floating(op, "gate", gate);
  check_same_dtype(op, "up", up, "gate", gate);
  check_same_dtype(op, "grad", grad, "gate", gate);
  check_same_device(op, "up", up, "gate", gate);
  check_same_device(op, "grad", grad, "gate", gate);
  check_min_dim(op, "gate", gate, 1);
  check_same_shape(op, "up", up, "gate", gate);
  check_same_shape(op, "grad", grad, "gate", gate);
  auto g2 = as_rows(gate), u2 = as_rows(up), d2 = as_rows(grad);
  keep = {g2, u2, d2};
  auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_gate = at::empty(gate.sizes(), opts), grad_up = at::empty(gate.sizes(), opts);
  p.rows = g2.size(0);
  p.cols = gate.size(-1);
  p.dtype = to_dtype(op, "gate", gate);
  p.gate = g2.data_ptr();
  p.gate_stride = g2.stride(0);
  p.up = u2.data_ptr();
  p.up_stride = u2.stride(0);
  p.grad = d2.data_ptr();
  p.grad_stride = d2.stride(0);
  p.grad_gate = grad_gate.data_ptr();
  p.grad_up = grad_up.data_ptr();
  return {grad_gate, grad_up};
}

}  // namespace thrifty
