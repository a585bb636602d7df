// Parameters of the quantized linear kernels (CPU and CUDA). Strides are in elements.
//
// Weight formats (format version 1, see docs/QUANT_FORMATS.md), N = out_features, K = in_features:
//   W8  (bits 8): qweight int8 (N, K) row-major, scales float32 (N,):            w[n,k] = q[n,k] * s[n]
//   W4  (bits 4): qweight uint8 (N, K/2), byte k/2 of row n holds k even in its low nibble and k+1 in its
//                 high nibble; scales, zeros float32 (N, K/G) with G = group_size: w[n,k] = (q[n,k] - z[n,k/G]) * s[n,k/G]
//   W8A8: xq int8 (M, K) with x_scales float32 (M,), wq int8 (N, K) with w_scales float32 (N,):
//                 y[m,n] = (sum_k xq[m,k] * wq[n,k]) (int32) * x_scales[m] * w_scales[n] (+ bias[n])
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct QuantLinearParams {
  int64_t M = 0, K = 0, N = 0;  // x (M, K), weight (N, K), y (M, N)
  int bits = 4;                 // 4 or 8
  int64_t group_size = 128;     // bits 4: K is a multiple of it (and it of 32); bits 8: unused
  DType dtype = DType::f32;     // of x and y
  DType bias_dtype = DType::f32;
  const void* x = nullptr;      // (M, K), row stride x_stride, last dim contiguous
  int64_t x_stride = 0;
  const void* qweight = nullptr;  // int8 (N, K) or uint8 (N, K/2), contiguous
  const float* scales = nullptr;  // (N,) or (N, K/G), contiguous
  const float* zeros = nullptr;   // bits 4: (N, K/G), contiguous
  const void* bias = nullptr;     // optional (N,), dtype bias_dtype
  void* y = nullptr;              // (M, N) contiguous, dtype
  float* xbuf = nullptr;          // CPU scratch: M rows of xbuf_stride floats (x in float32, reordered for the kernel,
  int64_t xbuf_stride = 0;        //   zero padded from K to xbuf_stride = round_up(K, 32))
  float* xsum = nullptr;          // CPU scratch: M * (K/G) floats (per-group sums of x, W4 GEMV)
};

struct DequantParams {
  int64_t K = 0, N = 0;
  int bits = 4;
  int64_t group_size = 128;
  const void* qweight = nullptr;
  const float* scales = nullptr;
  const float* zeros = nullptr;
  float* w = nullptr;  // (N, K) float32 contiguous
};

struct Int8LinearParams {
  int64_t M = 0, K = 0, N = 0;
  const int8_t* xq = nullptr;      // (M, K) contiguous
  const float* x_scales = nullptr; // (M,)
  const int8_t* wq = nullptr;      // (N, K) contiguous
  const float* w_scales = nullptr; // (N,)
  const void* bias = nullptr;      // optional (N,), dtype bias_dtype
  DType bias_dtype = DType::f32;
  DType out_dtype = DType::f32;
  void* y = nullptr;               // (M, N) contiguous, out_dtype
  int16_t* xbuf = nullptr;         // CPU scratch: M * Kp int16 (xq widened, K padded to Kp = round_up(K, 64) with 0)
  int64_t Kp = 0;
};

struct QuantizePerTokenParams {
  int64_t rows = 0, K = 0;
  DType dtype = DType::f32;
  const void* x = nullptr;  // (rows, K), row stride x_stride
  int64_t x_stride = 0;
  int8_t* xq = nullptr;     // (rows, K) contiguous: round_half_even(x * 127 / amax), in [-127, 127]
  float* scales = nullptr;  // (rows,) amax / 127 (0 for an all-zero row)
};

}  // namespace thrifty
