// 8-bit optimizer requantization on CUDA: the code of a normalized value x is the number of code midpoints
// below x (common/optim_quant.h's rule: the nearest code, ties to the lower one). mids holds the 255
// midpoints, sorted, and mids[255] = +inf.
//
// quantize_nearest: an 8-step binary search. quantize_lut: a table indexed by x's top kQLutBits bits (sign,
// exponent, 5 mantissa bits: a "bucket") holds the count at the bucket's lowest value, and a walk up the
// midpoints finishes it: the same code as the search for every float but NaN (the count only grows with x;
// NaN gets 0 or, in the infinity buckets, 255: a NaN moment is lost either way), and on the dynamic maps
// 0-3 steps (the unsigned map's top decade puts about 2 midpoints in a bucket) instead of 8 dependent
// shared-memory loads. Bucket floors come from
// qlut_bucket_floor; optim.cu's build kernel fills the table with quantize_nearest of them.
//
// Needs from the includer: __device__ / __forceinline__, __float_as_uint, __uint_as_float, so that the
// CPU check tests/cuda_emulated/optim_qlut_check.cpp compiles this same source.
#pragma once
#include <cstdint>

namespace thrifty::cuda {

constexpr int kQLutBits = 14;  // 1 sign + 8 exponent + 5 mantissa bits
constexpr int kQLutShift = 32 - kQLutBits;
constexpr int kQLutSize = 1 << kQLutBits;  // entries (bytes) per map

__device__ __forceinline__ int quantize_nearest(const float* mids, float x) {
  int c = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1)
    if (mids[c + step - 1] < x) c += step;
  return c;
}

// The lowest float of bucket b: its smallest bit pattern for positive buckets, the largest for negative ones.
__device__ __forceinline__ float qlut_bucket_floor(uint32_t b) {
  const uint32_t bits = b << kQLutShift;
  return __uint_as_float((b >> (kQLutBits - 1)) != 0u ? bits | ((1u << kQLutShift) - 1u) : bits);
}

__device__ __forceinline__ int quantize_lut(const uint8_t* lut, const float* mids, float x) {
  int c = lut[__float_as_uint(x) >> kQLutShift];
  while (mids[c] < x) ++c;  // stops at mids[255] = +inf at the latest
  return c;
}

}  // namespace thrifty::cuda
