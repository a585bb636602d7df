// CUDA glue for the rotary-embedding ops: check (positions range with one aminmax on the
// device), fill params, launch on the current stream.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/rotary_glue.h"
#include "cuda/rotary/rotary_launch.h"

namespace thrifty {
namespace {

std::tuple<at::Tensor, at::Tensor> rotary_cuda(const char* op, const char* qn, const char* kn, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& positions,
                                               const at::Tensor& cache, bool interleaved, bool inverse) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(q));
  RotaryParams p;
  auto out = rotary_prepare(op, qn, kn, q, k, positions, cache, interleaved, inverse, p);
  TORCH_CHECK_VALUE(p.tokens <= 0x7fffffffLL && (p.q_heads + p.k_heads) * p.head_dim <= 0x7fffffffLL, "thrifty.", op,
                    ": too many tokens or heads for one launch (tokens ", p.tokens, ", heads ",
                    p.q_heads + p.k_heads, ", head_dim ", p.head_dim, ")");
  check_positions_range(op, out.positions, p.max_position);
  if (p.tokens > 0 && p.head_dim > 0) cuda::launch_rotary_embedding(p, c10::cuda::getCurrentCUDAStream());
  return {out.q_out, out.k_out};
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& positions, const at::Tensor& cache,
                                                         bool interleaved) {
  return rotary_cuda("rotary_embedding", "q", "k", q, k, positions, cache, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                                  const at::Tensor& positions, const at::Tensor& cache,
                                                                  bool interleaved) {
  return rotary_cuda("rotary_embedding_backward", "grad_q", "grad_k", grad_q, grad_k, positions, cache, interleaved,
                     true);
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("rotary_embedding_backward", &rotary_embedding_backward_cuda);
}

}  // namespace thrifty
