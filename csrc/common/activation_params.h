// Parameters of the SwiGLU kernels (CPU and CUDA). Strides are in elements; the last dim
// of every tensor is contiguous, so gate and up may be the two halves of one fused
// (rows, 2 * cols) gate_up projection (row stride 2 * cols) without a copy.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct SwigluParams {
  int64_t rows = 0;          // product of the leading dims
  int64_t cols = 0;          // last dim (the intermediate size)
  DType dtype = DType::f32;  // of every tensor
  const void* gate = nullptr;  // (rows, cols), row stride gate_stride
  int64_t gate_stride = 0;
  const void* up = nullptr;    // (rows, cols), row stride up_stride
  int64_t up_stride = 0;
  void* out = nullptr;         // forward: silu(gate) * up, (rows, cols) contiguous
  // backward only
  const void* grad = nullptr;  // (rows, cols), row stride grad_stride: gradient of out
  int64_t grad_stride = 0;
  void* grad_gate = nullptr;   // (rows, cols) contiguous
  void* grad_up = nullptr;     // (rows, cols) contiguous
};

}  // namespace thrifty
