// Device-agnostic argument checks and table building for the fused optimizer ops; the CPU
// and CUDA glue both call these, then run their kernels over the table.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/optim_params.h"

namespace thrifty {

struct OptimTable {
  std::vector<OptimTensor> tensors;  // non-empty tensors only
  std::vector<int64_t> offsets;      // chunk prefix sums, size tensors.size() + 1
  std::vector<int64_t> src_index;    // index of each table entry in the op's lists
};

inline void check_hparam(const char* op, const char* name, double x, double lo, double hi, bool hi_open) {
  TORCH_CHECK_VALUE(std::isfinite(x) && x >= lo && (hi_open ? x < hi : x <= hi), "thrifty.", op, ": '", name,
                    "' must be finite and in [", lo, ", ", hi, hi_open ? ")" : "]", " (got ", x, ")");
}

inline void check_scalar_tensor(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref) {
  check_dtype(op, arg, t, {at::kFloat});
  TORCH_CHECK_VALUE(t.numel() == 1, "thrifty.", op, ": argument '", arg, "' must hold one value (got shape ", t.sizes(),
                    ")");
  check_same_device(op, arg, t, "params[0]", ref);
}

inline void check_list_len(const char* op, const char* arg, at::TensorList l, size_t n) {
  TORCH_CHECK_VALUE(l.size() == n, "thrifty.", op, ": list '", arg, "' must have one tensor per param (", n,
                    "), got ", l.size());
}

inline void check_elem(const char* op, const char* arg, size_t i, const at::Tensor& t, const at::Tensor& param,
                       at::ScalarType dtype, int64_t numel) {
  const std::string name = std::string(arg) + "[" + std::to_string(i) + "]";
  TORCH_CHECK(t.layout() == at::kStrided, "thrifty.", op, ": '", name, "' must be a dense (strided) tensor, got ",
              t.layout(), (std::string(arg) == "grads" ? " (sparse gradients are not supported)" : ""));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "thrifty.", op, ": '", name, "' must have dtype ", dtype,
                   (std::string(arg) == "grads" ? " (the dtype of its param)" : ""), ", got ", t.scalar_type());
  check_same_device(op, name.c_str(), t, "params[0]", param);
  TORCH_CHECK_VALUE(t.numel() == numel, "thrifty.", op, ": '", name, "' must have ", numel, " elements, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "thrifty.", op, ": '", name, "' must be contiguous (got strides ", t.strides(),
                    ")");
}

// Checks every list and fills the table. exp_avg_sqs may be empty (Lion); masters may be empty
// (no master weights); absmax lists only for 8-bit (quant = true); steps may be empty (Lion).
inline OptimTable optim_build_table(const char* op, at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,
                                    at::TensorList absmax_m, at::TensorList absmax_v, at::TensorList steps,
                                    bool quant, bool need_sq, bool need_steps, int64_t chunk_size, DType& pdtype) {
  const size_t n = params.size();
  OptimTable tab;
  tab.offsets.push_back(0);
  if (n == 0) return tab;
  check_list_len(op, "grads", grads, n);
  check_list_len(op, "exp_avgs", exp_avgs, n);
  if (need_sq) check_list_len(op, "exp_avg_sqs", exp_avg_sqs, n);
  if (!masters.empty()) check_list_len(op, "masters", masters, n);
  if (quant) {
    check_list_len(op, "absmax_m", absmax_m, n);
    check_list_len(op, "absmax_v", absmax_v, n);
  }
  if (need_steps) check_list_len(op, "steps", steps, n);
  const at::Tensor& p0 = params[0];
  check_floating(op, "params[0]", p0);
  pdtype = to_dtype(op, "params[0]", p0);
  const auto state_dtype = quant ? at::kByte : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    check_elem(op, "params", i, p, p0, p0.scalar_type(), numel);
    check_elem(op, "grads", i, grads[i], p0, p.scalar_type(), numel);
    check_elem(op, "exp_avgs", i, exp_avgs[i], p0, state_dtype, numel);
    if (need_sq) check_elem(op, "exp_avg_sqs", i, exp_avg_sqs[i], p0, state_dtype, numel);
    if (!masters.empty()) check_elem(op, "masters", i, masters[i], p0, at::kFloat, numel);
    const int64_t nblocks = (numel + kQuantBlock - 1) / kQuantBlock;
    if (quant) {
      check_elem(op, "absmax_m", i, absmax_m[i], p0, at::kFloat, nblocks);
      check_elem(op, "absmax_v", i, absmax_v[i], p0, at::kFloat, nblocks);
    }
    if (need_steps) check_elem(op, "steps", i, steps[i], p0, at::kFloat, 1);
    if (numel == 0) continue;
    OptimTensor t;
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    if (need_sq) t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    if (!masters.empty()) t.master = masters[i].data_ptr<float>();
    if (quant) {
      t.absmax_m = absmax_m[i].data_ptr<float>();
      t.absmax_v = absmax_v[i].data_ptr<float>();
    }
    if (need_steps) t.step = steps[i].data_ptr<float>();
    t.n = numel;
    t.dtype = pdtype;
    tab.tensors.push_back(t);
    tab.src_index.push_back(static_cast<int64_t>(i));
    tab.offsets.push_back(tab.offsets.back() + (numel + chunk_size - 1) / chunk_size);
  }
  return tab;
}

inline void optim_check_hparams(const char* op, double beta1, double beta2, double eps, double weight_decay,
                                bool adam) {
  check_hparam(op, "beta1", beta1, 0.0, 1.0, true);
  check_hparam(op, "beta2", beta2, 0.0, adam ? 1.0 : 1.0, true);
  if (adam) check_hparam(op, "eps", eps, 0.0, INFINITY, true);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay), "thrifty.", op, ": 'weight_decay' must be finite (got ",
                    weight_decay, ")");
}

// Hyperparameters into the step params; 1 - beta in double (1 - 0.999f is off by 1e-5), and the betas
// kept in double for the bias corrections.
inline void optim_set_hparams(OptimStepParams& s, double beta1, double beta2, double eps, double weight_decay) {
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.beta1_exact = beta1;
  s.beta2_exact = beta2;
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
}

// What each step op checks and fills the same way on every device: hyperparameters (checked even
// when params is empty), the lists (into the returned table, chunked by the device kernel's chunk
// size) and the device-independent fields of s. The device glue then checks lr / grad_coef /
// found_inf (optim_check_scalars), fills what its kernel reads and runs. Callers return early when
// params is empty (nothing else is checked then, as nothing is touched).
inline OptimTable adamw_prepare(const char* op, OptimStepParams& s, at::TensorList params, at::TensorList grads,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,
                                at::TensorList steps, double beta1, double beta2, double eps, double weight_decay,
                                int64_t chunk_size) {
  optim_check_hparams(op, beta1, beta2, eps, weight_decay, true);
  s.kind = OptimKind::adamw;
  s.has_master = !masters.empty();
  optim_set_hparams(s, beta1, beta2, eps, weight_decay);
  return optim_build_table(op, params, grads, exp_avgs, exp_avg_sqs, masters, {}, {}, steps, false, true, true,
                           chunk_size, s.pdtype);
}

inline void check_qmap(const char* op, const char* arg, const at::Tensor& q, const at::Tensor& ref) {
  check_dtype(op, arg, q, {at::kFloat});
  check_same_device(op, arg, q, "params[0]", ref);
  TORCH_CHECK_VALUE(q.dim() == 1 && q.size(0) == 256 && q.is_contiguous(), "thrifty.", op, ": argument '", arg,
                    "' must be a contiguous (256,) code map, got shape ", q.sizes());
}

inline OptimTable adamw8bit_prepare(const char* op, OptimStepParams& s, at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList absmax_m,
                                    at::TensorList absmax_v, const at::Tensor& qmap_m, const at::Tensor& qmap_v,
                                    at::TensorList masters, at::TensorList steps, double beta1, double beta2,
                                    double eps, double weight_decay, int64_t chunk_size) {
  optim_check_hparams(op, beta1, beta2, eps, weight_decay, true);
  s.kind = OptimKind::adamw8bit;
  s.has_master = !masters.empty();
  optim_set_hparams(s, beta1, beta2, eps, weight_decay);
  auto tab = optim_build_table(op, params, grads, exp_avgs, exp_avg_sqs, masters, absmax_m, absmax_v, steps, true,
                               true, true, chunk_size, s.pdtype);
  if (params.empty()) return tab;
  check_qmap(op, "qmap_m", qmap_m, params[0]);
  check_qmap(op, "qmap_v", qmap_v, params[0]);
  s.qmap_m = qmap_m.data_ptr<float>();
  s.qmap_v = qmap_v.data_ptr<float>();
  return tab;
}

inline OptimTable lion_prepare(const char* op, OptimStepParams& s, at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList masters, double beta1, double beta2,
                               double weight_decay, int64_t chunk_size) {
  optim_check_hparams(op, beta1, beta2, 0.0, weight_decay, false);
  s.kind = OptimKind::lion;
  s.has_master = !masters.empty();
  optim_set_hparams(s, beta1, beta2, s.eps, weight_decay);  // eps unused
  return optim_build_table(op, params, grads, exp_avgs, {}, masters, {}, {}, {}, false, false, false, chunk_size,
                           s.pdtype);
}

// The one-value tensors of a step: float32, on the params' device, which must be of `type`.
inline void optim_check_scalars(const char* op, c10::DeviceType type, const at::Tensor& p0, const at::Tensor& lr,
                                const c10::optional<at::Tensor>& grad_coef,
                                const c10::optional<at::Tensor>& found_inf) {
  check_device_type(op, "params[0]", p0, type);
  check_scalar_tensor(op, "lr", lr, p0);
  if (grad_coef.has_value()) check_scalar_tensor(op, "grad_coef", *grad_coef, p0);
  if (found_inf.has_value()) check_scalar_tensor(op, "found_inf", *found_inf, p0);
}

// Table for the L2 norm: any floating dtype per tensor, any device-consistent list.
inline OptimTable l2norm_build_table(const char* op, at::TensorList tensors, int64_t chunk_size) {
  OptimTable tab;
  tab.offsets.push_back(0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_floating(op, name.c_str(), t);
    check_same_device(op, name.c_str(), t, "tensors[0]", tensors[0]);
    TORCH_CHECK(t.layout() == at::kStrided, "thrifty.", op, ": '", name, "' must be a dense (strided) tensor, got ",
                t.layout());
    TORCH_CHECK_VALUE(t.is_contiguous(), "thrifty.", op, ": '", name, "' must be contiguous (got strides ",
                      t.strides(), ")");
    if (t.numel() == 0) continue;
    OptimTensor e;
    e.grad = t.data_ptr();
    e.n = t.numel();
    e.dtype = to_dtype(op, name.c_str(), t);
    tab.tensors.push_back(e);
    tab.src_index.push_back(static_cast<int64_t>(i));
    tab.offsets.push_back(tab.offsets.back() + (e.n + chunk_size - 1) / chunk_size);
  }
  return tab;
}

}  // namespace thrifty
