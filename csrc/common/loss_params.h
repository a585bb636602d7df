// Parameters of the fused cross-entropy kernels (CPU and CUDA) used by linear_cross_entropy.
// Strides are in elements. The logits come from a matmul done by the glue (common/loss_glue.h).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

// Forward over a chunk of rows holding all vocab logits: per-row lse and loss.
struct CeFwdParams {
  int64_t rows = 0;              // tokens in this chunk
  int64_t vocab = 0;             // classes (logits per row)
  DType dtype = DType::f32;      // of logits
  const void* logits = nullptr;  // (rows, vocab), row stride ld
  int64_t ld = 0;
  const int64_t* labels = nullptr;  // (rows,), in [0, vocab) or == ignore_index (checked by the glue)
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;     // eps: loss = (1-eps) * (lse - z_y) + eps * (lse - mean_j z_j)
  float softcap = 0.0f;             // > 0: z = softcap * tanh(logit / softcap) (in float32) before the softmax
  float* loss = nullptr;            // (rows,) float32 per-row loss (0 for ignored rows)
  float* lse = nullptr;             // (rows,) float32 log-sum-exp of the (capped) logits
};

// Backward over a block of vocab columns [col0, col0 + cols) for every token: the logits of
// the block are overwritten in place with grad_scale_i * d loss_i / d logit_ij.
struct CeGradParams {
  int64_t rows = 0, cols = 0, col0 = 0, vocab = 0;
  DType dtype = DType::f32;
  void* logits = nullptr;  // (rows, cols), row stride ld; in: logits, out: gradient
  int64_t ld = 0;
  const int64_t* labels = nullptr;  // (rows,)
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f, softcap = 0.0f;
  const float* lse = nullptr;         // (rows,) from the forward
  const float* grad_scale = nullptr;  // d L / d loss_i at grad_scale[i * grad_scale_stride] (stride 0: broadcast)
  int64_t grad_scale_stride = 0;
};

}  // namespace thrifty
