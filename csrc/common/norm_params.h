// Parameters of the RMSNorm kernels (CPU and CUDA). Strides are in elements; the last
// (hidden) dimension is always contiguous.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct RmsNormParams {
  int64_t rows = 0;          // product of the leading dims
  int64_t hidden = 0;        // normalised (last) dim
  float eps = 1e-6f;
  DType dtype = DType::f32;  // of x, residual, y, h
  DType wdtype = DType::f32; // of weight: same as dtype, or f32

  const void* x = nullptr;         // (rows, hidden), row stride x_stride
  int64_t x_stride = 0;
  const void* residual = nullptr;  // optional (rows, hidden), row stride r_stride: h = x + residual
  int64_t r_stride = 0;
  const void* weight = nullptr;    // (hidden,)
  void* y = nullptr;               // (rows, hidden) contiguous
  void* h = nullptr;               // (rows, hidden) contiguous, written when residual != nullptr
  float* rstd = nullptr;           // (rows,) 1 / sqrt(mean(h^2) + eps), saved for the backward
};

struct RmsNormBwdParams {
  int64_t rows = 0, hidden = 0;
  DType dtype = DType::f32, wdtype = DType::f32;
  const void* grad_y = nullptr;  // (rows, hidden) row stride gy_stride
  int64_t gy_stride = 0;
  const void* x = nullptr;       // (rows, hidden) the normalised input (h for the fused add), row stride x_stride
  int64_t x_stride = 0;
  const void* weight = nullptr;  // (hidden,)
  const float* rstd = nullptr;   // (rows,)
  const void* grad_h = nullptr;  // optional (rows, hidden) row stride gh_stride: gradient flowing into h from
  int64_t gh_stride = 0;         //   its own use as the residual stream; added to grad_x
  void* grad_x = nullptr;        // (rows, hidden) contiguous, dtype
  float* grad_weight_partial = nullptr;  // (chunks, hidden) float32 scratch: per-chunk sums of grad_y * x * rstd
  int64_t chunks = 1;                    // rows are split into this many fixed chunks (deterministic)
};

}  // namespace thrifty
