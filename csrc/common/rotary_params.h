// Parameters of the rotary-embedding kernels (CPU and CUDA). Strides are in elements; the
// last (head_dim) dimension of every tensor is contiguous.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct RotaryParams {
  int64_t tokens = 0;        // product of the leading dims of q (and k)
  int64_t q_heads = 0;       // heads of q
  int64_t k_heads = 0;       // heads of k (may be fewer: GQA)
  int64_t head_dim = 0;
  int64_t rot_dim = 0;       // even, <= head_dim: features [0, rot_dim) rotate, the rest are copied
  bool interleaved = false;  // false: neox (pairs (i, i + rot_dim/2)); true: GPT-J (pairs (2i, 2i+1))
  bool inverse = false;      // rotate by -angle (the backward)
  DType dtype = DType::f32;  // of q, k and the outputs

  const void* q = nullptr;   // (tokens, q_heads, head_dim) with strides (q_tok_stride, q_head_stride, 1)
  int64_t q_tok_stride = 0, q_head_stride = 0;
  const void* k = nullptr;   // (tokens, k_heads, head_dim) with strides (k_tok_stride, k_head_stride, 1)
  int64_t k_tok_stride = 0, k_head_stride = 0;
  void* q_out = nullptr;     // (tokens, q_heads, head_dim) contiguous
  void* k_out = nullptr;     // (tokens, k_heads, head_dim) contiguous

  const void* positions = nullptr;  // (tokens,) contiguous, int64 or int32, each in [0, max_position)
  bool positions_int32 = false;
  const float* cos_sin = nullptr;   // (max_position, rot_dim) contiguous: [cos(rot_dim/2) | sin(rot_dim/2)]
  int64_t max_position = 0;
};

}  // namespace thrifty
