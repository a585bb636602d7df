// CPU glue for the fused optimizer ops: check, build the multi-tensor table, run one pass.
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "common/optim_glue.h"
#include "common/optim_quant.h"
#include "cpu/optim/optim_kernels.h"

namespace thrifty {
namespace {

constexpr int64_t kCpuChunk = 1 << 16;  // elements per chunk (a multiple of kQuantBlock)

float read_scalar(const at::Tensor& t) { return t.data_ptr<float>()[0]; }

// The quantizer table of a code map (common/optim_quant.h). The optimizer passes the same two maps
// every step, so tables are built once per distinct map (about a millisecond for the dynamic maps)
// and kept in a small cache, keyed by the 256 values; shared_ptr keeps an entry alive while a step
// that holds it runs, whatever the other threads evict.
struct QuantTable {
  float q[256];
  std::vector<uint32_t> entry;
  alignas(64) uint8_t planes[4][256];
  QuantLut lut;
};

std::shared_ptr<const QuantTable> quant_table(const char* op, const char* arg, const at::Tensor& qmap) {
  static std::mutex mu;
  static std::vector<std::shared_ptr<const QuantTable>> cache;  // at most kCacheSize, newest last
  constexpr size_t kCacheSize = 8;
  const float* q = qmap.data_ptr<float>();
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& t : cache)
      if (std::memcmp(t->q, q, sizeof(t->q)) == 0) return t;
  }
  float mids[255];
  TORCH_CHECK_VALUE(quant_mids(q, mids), "thrifty.", op, ": '", arg,
                    "' must hold 256 finite values in increasing order whose midpoints (q[k] + q[k+1]) / 2 strictly ",
                    "increase (no value repeated three times)");
  const int shift = quant_lut_shift(mids);
  TORCH_CHECK_VALUE(shift >= 0, "thrifty.", op, ": '", arg, "' is too dense for the CPU quantizer: two neighbouring ",
                    "midpoints (q[k] + q[k+1]) / 2 agree in sign, exponent and the top ", kQMaxMantBits,
                    " mantissa bits");
  auto t = std::make_shared<QuantTable>();
  t->entry.resize(quant_lut_size(shift));
  TORCH_CHECK_VALUE(fill_quant_lut(mids, shift, t->entry.data()), "thrifty.", op, ": '", arg,
                    "' is too dense for the CPU quantizer: a midpoint at 0 shares a denormal bucket with another");
  std::memcpy(t->q, q, sizeof(t->q));
  fill_quant_planes(q, t->planes);
  t->lut.shift = static_cast<uint32_t>(shift);
  t->lut.entry = t->entry.data();
  t->lut.planes = t->planes;
  std::lock_guard<std::mutex> lock(mu);
  cache.push_back(t);
  if (cache.size() > kCacheSize) cache.erase(cache.begin());
  return t;
}

// Common driver: found_inf / lr / grad_coef / bias corrections, the kernel, then step += 1 (for
// every listed tensor, the empty ones included). A set found_inf skips everything: nothing moves,
// the steps stay.
void run_step(const char* op, OptimStepParams& s, OptimTable& tab, at::TensorList params, at::TensorList steps,
              const at::Tensor& lr, const c10::optional<at::Tensor>& grad_coef,
              const c10::optional<at::Tensor>& found_inf) {
  optim_check_scalars(op, c10::DeviceType::CPU, params[0], lr, grad_coef, found_inf);
  if (found_inf.has_value() && read_scalar(*found_inf) != 0.0f) return;
  s.lr = read_scalar(lr);
  TORCH_CHECK_VALUE(std::isfinite(s.lr), "thrifty.", op, ": 'lr' must be finite (got ", s.lr, ")");
  s.grad_coef = grad_coef.has_value() ? read_scalar(*grad_coef) : 1.0f;
  for (auto& t : tab.tensors) {
    if (t.step == nullptr) continue;  // Lion: no step counts
    const double st = static_cast<double>(*t.step) + 1.0;
    t.bias_c1 = static_cast<float>(1.0 - std::pow(s.beta1_exact, st));
    t.bias_c2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(s.beta2_exact, st)));
  }
  s.num_tensors = static_cast<int64_t>(tab.tensors.size());
  s.tensors = tab.tensors.data();
  s.chunk_offsets = tab.offsets.data();
  s.total_chunks = tab.offsets.back();
  s.chunk_size = kCpuChunk;
  if (s.total_chunks > 0) THRIFTY_CPU_DISPATCH(optim_step, s);
  for (const auto& st : steps) st.data_ptr<float>()[0] += 1.0f;
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList masters, at::TensorList steps, const at::Tensor& lr, double beta1, double beta2,
                    double eps, double weight_decay, const c10::optional<at::Tensor>& grad_coef,
                    const c10::optional<at::Tensor>& found_inf) {
  const char* op = "adamw_step";
  OptimStepParams s;
  auto tab = adamw_prepare(op, s, params, grads, exp_avgs, exp_avg_sqs, masters, steps, beta1, beta2, eps,
                           weight_decay, kCpuChunk);
  if (params.empty()) return;
  run_step(op, s, tab, params, steps, lr, grad_coef, found_inf);
}

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList absmax_m, at::TensorList absmax_v,
                        const at::Tensor& qmap_m, const at::Tensor& qmap_v, at::TensorList masters,
                        at::TensorList steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                        double weight_decay, const c10::optional<at::Tensor>& grad_coef,
                        const c10::optional<at::Tensor>& found_inf) {
  const char* op = "adamw8bit_step";
  OptimStepParams s;
  auto tab = adamw8bit_prepare(op, s, params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, qmap_m, qmap_v,
                               masters, steps, beta1, beta2, eps, weight_decay, kCpuChunk);
  if (params.empty()) return;
  const auto lut_m = quant_table(op, "qmap_m", qmap_m), lut_v = quant_table(op, "qmap_v", qmap_v);
  s.lut_m = &lut_m->lut;
  s.lut_v = &lut_v->lut;
  run_step(op, s, tab, params, steps, lr, grad_coef, found_inf);
}

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList masters,
                   const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                   const c10::optional<at::Tensor>& grad_coef, const c10::optional<at::Tensor>& found_inf) {
  const char* op = "lion_step";
  OptimStepParams s;
  auto tab = lion_prepare(op, s, params, grads, exp_avgs, masters, beta1, beta2, weight_decay, kCpuChunk);
  if (params.empty()) return;
  run_step(op, s, tab, params, {}, lr, grad_coef, found_inf);
}

at::Tensor multi_tensor_l2norm_cpu(at::TensorList tensors) {
  const char* op = "multi_tensor_l2norm";
  if (tensors.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  check_device_type(op, "tensors[0]", tensors[0], c10::DeviceType::CPU);
  auto tab = l2norm_build_table(op, tensors, kCpuChunk);
  L2NormParams p;
  p.num_tensors = static_cast<int64_t>(tab.tensors.size());
  p.tensors = tab.tensors.data();
  p.chunk_offsets = tab.offsets.data();
  p.total_chunks = tab.offsets.back();
  p.chunk_size = kCpuChunk;
  std::vector<float> partial(static_cast<size_t>(p.total_chunks));
  p.partial = partial.data();
  if (p.total_chunks > 0) THRIFTY_CPU_DISPATCH(optim_l2norm_partials, p);
  double total = 0.0;  // fixed order: deterministic for any thread count
  for (float x : partial) total += static_cast<double>(x);
  auto out = at::empty({}, tensors[0].options().dtype(at::kFloat));
  out.data_ptr<float>()[0] = static_cast<float>(std::sqrt(total));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
  m.impl("adamw8bit_step", &adamw8bit_step_cpu);
  m.impl("lion_step", &lion_step_cpu);
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cpu);
}

}  // namespace thrifty
