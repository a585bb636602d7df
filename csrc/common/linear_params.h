// Parameters of the low-precision linear op y = x @ weight.T (+ bias) (CPU GEMV core). Strides are in
// elements. x, weight, bias and y share one dtype (float32, bfloat16 or float16); accumulation is float32
// and y is rounded once to that dtype.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

// The CPU GEMV core serves M <= kLinearGemvMaxM rows (x rows taken 8 at a time from a float32 copy, each
// weight row read from memory once); above it the glue multiplies float32 copies with ATen's GEMM (bf16
// directly at the avx512_bf16 level). Crossover measured on the shared 2-core AVX2 EPYC, bf16, against the
// float32-copy path: the GEMV is 1.6-7x faster at M = 8, 1.2-5x at M = 12, 0.9-4x at M = 16 (K 3072 x N 768
// the one loss: x rows of 12 KB spill L1), 0.5-1.0x at M = 64 for K 768..3072.
constexpr int64_t kLinearGemvMaxM = 16;

struct LinearParams {
  int64_t M = 0, K = 0, N = 0;  // x (M, K), weight (N, K), y (M, N)
  DType dtype = DType::f32;     // of x, weight, bias and y
  const void* x = nullptr;      // (M, K), row stride x_stride, last dim contiguous
  int64_t x_stride = 0;
  const void* w = nullptr;      // (N, K), row stride w_stride, last dim contiguous
  int64_t w_stride = 0;
  const void* bias = nullptr;   // optional (N,) contiguous
  void* y = nullptr;            // (M, N) contiguous
  float* xbuf = nullptr;        // CPU scratch: M rows of xbuf_stride floats (x in float32, zero padded
  int64_t xbuf_stride = 0;      //   from K to xbuf_stride = round_up(K, 32))
};

}  // namespace thrifty
