// CPU glue for the rotary-embedding ops: check, fill params, call the ISA-dispatched core.
#include <torch/library.h>

#include "common/rotary_glue.h"
#include "cpu/rotary/rotary_kernels.h"

namespace thrifty {
namespace {

std::tuple<at::Tensor, at::Tensor> rotary_cpu(const char* op, const char* qn, const char* kn, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& positions,
                                              const at::Tensor& cache, bool interleaved, bool inverse) {
  check_device_type(op, qn, q, c10::DeviceType::CPU);
  RotaryParams p;
  auto out = rotary_prepare(op, qn, kn, q, k, positions, cache, interleaved, inverse, p);
  check_positions_range(op, out.positions, p.max_position);
  if (p.tokens > 0 && p.q_heads + p.k_heads > 0 && p.head_dim > 0) THRIFTY_CPU_DISPATCH(rotary_embedding_fwd, p);
  return {out.q_out, out.k_out};
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& positions, const at::Tensor& cache,
                                                        bool interleaved) {
  return rotary_cpu("rotary_embedding", "q", "k", q, k, positions, cache, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                                 const at::Tensor& positions, const at::Tensor& cache,
                                                                 bool interleaved) {
  return rotary_cpu("rotary_embedding_backward", "grad_q", "grad_k", grad_q, grad_k, positions, cache, interleaved,
                    true);
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("rotary_embedding", &rotary_embedding_cpu);
  m.impl("rotary_embedding_backward", &rotary_embedding_backward_cpu);
}

}  // namespace thrifty
