// Parameters of the fused multi-tensor optimizer kernels (CPU and CUDA).
//
// One call updates many tensors at once (the multi_tensor_apply idea): the glue builds a
// table of OptimTensor (pointers + sizes), every tensor is cut into chunks of chunk_size
// elements, and the kernel runs over the chunks of all tensors together: one parallel pass
// on CPU, one launch on CUDA (the table and the chunk prefix sums live in a small device
// buffer there). Each element is streamed once: read p (or master), g, m, v; write p
// (+ master), m, v.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct QuantLut;

// One tensor of a multi-tensor call. All element pointers index the same n contiguous elements.
struct OptimTensor {
  void* param = nullptr;       // (n,) pdtype, updated in place (the rounded master when master != nullptr)
  const void* grad = nullptr;  // (n,) pdtype (l2norm: dtype below)
  float* master = nullptr;     // optional (n,) float32 master weights
  void* exp_avg = nullptr;     // (n,) float32 first moment, or uint8 codes (8-bit)
  void* exp_avg_sq = nullptr;  // (n,) float32 second moment, or uint8 codes (8-bit); unused by Lion
  float* absmax_m = nullptr;   // 8-bit: (ceil(n / 256),) block scales of exp_avg
  float* absmax_v = nullptr;   // 8-bit: (ceil(n / 256),) block scales of exp_avg_sq
  float* step = nullptr;       // AdamW: 0-d float32 step count before this step (CUDA reads it on device)
  int64_t n = 0;
  float bias_c1 = 1.0f;        // CPU: 1 - beta1^t for this tensor's new step t (the glue fills it)
  float bias_c2_sqrt = 1.0f;   // CPU: sqrt(1 - beta2^t)
  DType dtype = DType::f32;    // l2norm: dtype of grad
  int32_t pad_ = 0;
};

enum class OptimKind : int { adamw = 0, adamw8bit = 1, lion = 2 };

constexpr int64_t kQuantBlock = 256;  // 8-bit: elements per absmax block

struct OptimStepParams {
  OptimKind kind = OptimKind::adamw;
  DType pdtype = DType::f32;           // params and grads
  bool has_master = false;             // every tensor has a float32 master copy
  int64_t num_tensors = 0;
  const OptimTensor* tensors = nullptr;     // host table (CPU) or device table (CUDA)
  const int64_t* chunk_offsets = nullptr;   // (num_tensors + 1) prefix sums of chunks per tensor (same memory)
  int64_t total_chunks = 0;
  int64_t chunk_size = 0;              // elements per chunk (a multiple of kQuantBlock for 8-bit)
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f;
  float one_minus_beta1 = 0.1f, one_minus_beta2 = 0.001f;  // computed in double (1 - 0.999f is off by 1e-5)
  // The betas as given, for the bias corrections 1 - beta^t: 0.999f^t would make 1 - beta2^t 1.3e-5 off
  // (relative), the step 6.5e-6 off, 100x float32's rounding against torch.optim.AdamW in float64.
  double beta1_exact = 0.9, beta2_exact = 0.999;
  // CPU: the values. CUDA: read on device from the pointers (no host sync, no recompilation).
  float lr = 0.0f, grad_coef = 1.0f;
  const float* lr_ptr = nullptr;        // 0-d float32
  const float* grad_coef_ptr = nullptr; // optional 0-d float32: grads are multiplied by it (unscale * clip)
  const float* found_inf_ptr = nullptr; // optional 0-d float32: nonzero -> the whole step is skipped
  const float* qmap_m = nullptr;        // 8-bit: 256 sorted code values of exp_avg (signed dynamic map)
  const float* qmap_v = nullptr;        // 8-bit: 256 sorted code values of exp_avg_sq (unsigned dynamic map)
  const struct QuantLut* lut_m = nullptr;  // 8-bit, CPU: quantizer tables of qmap_m / qmap_v (common/optim_quant.h)
  const struct QuantLut* lut_v = nullptr;
  uint8_t* qlut = nullptr;              // 8-bit, CUDA: 2 x kQLutSize bytes of device workspace, 16-byte aligned
                                        //   (cuda/optim/qlut.cuh), filled by the step itself
};

// Global L2 norm over a list of tensors: per-chunk float32 sums of squares, then a fixed-order sum.
struct L2NormParams {
  int64_t num_tensors = 0;
  const OptimTensor* tensors = nullptr;  // grad, n, dtype used
  const int64_t* chunk_offsets = nullptr;
  int64_t total_chunks = 0;
  int64_t chunk_size = 0;
  float* partial = nullptr;              // (total_chunks,) sums of squares
};

// Index of the tensor owning chunk c: the last i with offsets[i] <= c (offsets has n + 1 entries).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t optim_find_tensor(const int64_t* offsets, int64_t n, int64_t c) {
  int64_t lo = 0, hi = n;  // offsets[lo] <= c < offsets[hi]
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= c) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace thrifty
