// CUDA glue for the fused optimizer ops: check, copy the multi-tensor table (tensors, chunk
// prefix sums, step pointers) to the device in one asynchronous copy, launch once.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

#include "common/optim_glue.h"
#include "cuda/optim/optim_launch.h"

namespace thrifty {
namespace {

// Device copy of the table: [OptimTensor x n][int64 offsets x (n+1)][float* steps x ns].
struct DeviceTable {
  at::Tensor buf;
  const OptimTensor* tensors = nullptr;
  const int64_t* offsets = nullptr;
  float* const* steps = nullptr;
};

DeviceTable upload(const OptimTable& tab, const std::vector<float*>& steps, const at::Tensor& ref) {
  const size_t nt = tab.tensors.size(), no = tab.offsets.size(), ns = steps.size();
  const size_t b0 = nt * sizeof(OptimTensor), b1 = b0 + no * sizeof(int64_t), b2 = b1 + ns * sizeof(float*);
  auto host = at::empty({static_cast<int64_t>(b2)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<char*>(host.data_ptr());
  if (nt) std::memcpy(h, tab.tensors.data(), b0);
  std::memcpy(h + b0, tab.offsets.data(), no * sizeof(int64_t));
  if (ns) std::memcpy(h + b1, steps.data(), ns * sizeof(float*));
  DeviceTable d;
  d.buf = host.to(ref.device(), /*non_blocking=*/true);  // the pinned block is kept until the copy is done
  auto* base = static_cast<char*>(d.buf.data_ptr());
  d.tensors = reinterpret_cast<const OptimTensor*>(base);
  d.offsets = reinterpret_cast<const int64_t*>(base + b0);
  d.steps = reinterpret_cast<float* const*>(base + b1);
  return d;
}

void run_step(const char* op, OptimStepParams& s, const OptimTable& tab, at::TensorList params, at::TensorList steps,
              const at::Tensor& lr, const c10::optional<at::Tensor>& grad_coef,
              const c10::optional<at::Tensor>& found_inf, int64_t chunk) {
  const at::Tensor& p0 = params[0];
  optim_check_scalars(op, c10::DeviceType::CUDA, p0, lr, grad_coef, found_inf);
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(p0));
  std::vector<float*> step_ptrs;
  for (const auto& st : steps) step_ptrs.push_back(st.data_ptr<float>());
  auto d = upload(tab, step_ptrs, p0);
  s.num_tensors = static_cast<int64_t>(tab.tensors.size());
  s.tensors = d.tensors;
  s.chunk_offsets = d.offsets;
  s.total_chunks = tab.offsets.back();
  s.chunk_size = chunk;
  s.lr_ptr = lr.data_ptr<float>();
  s.grad_coef_ptr = grad_coef.has_value() ? grad_coef->data_ptr<float>() : nullptr;
  s.found_inf_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  cuda::launch_optim_step(s, d.steps, static_cast<int64_t>(step_ptrs.size()), c10::cuda::getCurrentCUDAStream());
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList masters, at::TensorList steps, const at::Tensor& lr, double beta1, double beta2,
                     double eps, double weight_decay, const c10::optional<at::Tensor>& grad_coef,
                     const c10::optional<at::Tensor>& found_inf) {
  const char* op = "adamw_step";
  OptimStepParams s;
  auto tab = adamw_prepare(op, s, params, grads, exp_avgs, exp_avg_sqs, masters, steps, beta1, beta2, eps,
                           weight_decay, cuda::kOptimChunk);
  if (params.empty()) return;
  run_step(op, s, tab, params, steps, lr, grad_coef, found_inf, cuda::kOptimChunk);
}

void adamw8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList absmax_m, at::TensorList absmax_v,
                         const at::Tensor& qmap_m, const at::Tensor& qmap_v, at::TensorList masters,
                         at::TensorList steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                         double weight_decay, const c10::optional<at::Tensor>& grad_coef,
                         const c10::optional<at::Tensor>& found_inf) {
  const char* op = "adamw8bit_step";
  OptimStepParams s;
  auto tab = adamw8bit_prepare(op, s, params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, qmap_m, qmap_v,
                               masters, steps, beta1, beta2, eps, weight_decay, cuda::kOptim8bitChunk);
  if (params.empty()) return;
  // The requantization's bucket tables, rebuilt from the maps on the device by the step (no host sync).
  const at::Tensor qlut = at::empty({cuda::kOptim8bitLutBytes}, params[0].options().dtype(at::kByte));
  s.qlut = qlut.data_ptr<uint8_t>();
  run_step(op, s, tab, params, steps, lr, grad_coef, found_inf, cuda::kOptim8bitChunk);
}

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList masters,
                    const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                    const c10::optional<at::Tensor>& grad_coef, const c10::optional<at::Tensor>& found_inf) {
  const char* op = "lion_step";
  OptimStepParams s;
  auto tab = lion_prepare(op, s, params, grads, exp_avgs, masters, beta1, beta2, weight_decay, cuda::kOptimChunk);
  if (params.empty()) return;
  run_step(op, s, tab, params, {}, lr, grad_coef, found_inf, cuda::kOptimChunk);
}

at::Tensor multi_tensor_l2norm_cuda(at::TensorList tensors) {
  const char* op = "multi_tensor_l2norm";
  check_device_type(op, "tensors[0]", tensors[0], c10::DeviceType::CUDA);
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(tensors[0]));
  auto tab = l2norm_build_table(op, tensors, cuda::kOptimChunk);
  auto d = upload(tab, {}, tensors[0]);
  L2NormParams p;
  p.num_tensors = static_cast<int64_t>(tab.tensors.size());
  p.tensors = d.tensors;
  p.chunk_offsets = d.offsets;
  p.total_chunks = tab.offsets.back();
  p.chunk_size = cuda::kOptimChunk;
  auto partial = at::empty({std::max<int64_t>(p.total_chunks, 1)}, tensors[0].options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  auto out = at::empty({}, tensors[0].options().dtype(at::kFloat));
  cuda::launch_l2norm(p, out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("adamw_step", &adamw_step_cuda);
  m.impl("adamw8bit_step", &adamw8bit_step_cuda);
  m.impl("lion_step", &lion_step_cuda);
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cuda);
}

}  // namespace thrifty
