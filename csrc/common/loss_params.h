// Parameters of the fused cross-entropy chunk kernel (CPU and CUDA), used by
// linear_cross_entropy: for a chunk of rows of logits (already computed by a matmul) it
// computes each row's log-sum-exp and loss and, when grad_scale is set, overwrites the
// logits in place with d(scale_i * loss_i)/d(logits). Strides are in elements.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace thrifty {

struct CeChunkParams {
  int64_t rows = 0;            // tokens in this chunk
  int64_t vocab = 0;           // classes (logits per row)
  DType dtype = DType::f32;    // of logits
  void* logits = nullptr;      // (rows, vocab), row stride ld; read, and overwritten with the gradient when grad_scale
  int64_t ld = 0;
  const int64_t* labels = nullptr;  // (rows,), in [0, vocab) or == ignore_index (checked by the glue)
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;     // eps: loss = (1-eps) * (lse - z_y) + eps * (lse - mean_j z_j)
  float softcap = 0.0f;             // > 0: z = softcap * tanh(logit / softcap) before the softmax
  float* loss = nullptr;            // (rows,) float32 per-row loss (0 for ignored rows)
  float* lse = nullptr;             // (rows,) float32 log-sum-exp of the (capped) logits
  const float* grad_scale = nullptr;  // optional: row i's gradient is scaled by grad_scale[i * grad_scale_stride]
  int64_t grad_scale_stride = 0;      //   (stride 0: one scale for every row)
};

}  // namespace thrifty
