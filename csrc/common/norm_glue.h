// Device-agnostic argument checks and output allocation for the RMSNorm ops; the CPU and
// CUDA glue both call these, then hand the params to their launcher.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/norm_params.h"

namespace thrifty {

// Views t (..., hidden) as (rows, hidden) with one row stride and a contiguous last dim,
// copying only when the leading dims cannot be collapsed that way.
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t hidden = t.size(-1);
  if (t.stride(-1) == 1 || hidden <= 1) {
    auto v = t.dim() == 1 ? t.unsqueeze(0) : t;
    // collapsible iff each leading dim's stride equals the next one's stride * size
    bool ok = true;
    for (int64_t d = 0; d + 2 < v.dim(); ++d)
      if (v.size(d) > 1 && v.stride(d) != v.stride(d + 1) * v.size(d + 1)) ok = false;
    if (ok) {
      const int64_t rows = v.numel() / std::max<int64_t>(hidden, 1);
      const int64_t rs = v.dim() >= 2 ? v.stride(-2) : hidden;
      return v.as_strided({rows, hidden}, {rows > 1 ? rs : hidden, 1});
    }
  }
  return t.contiguous().view({-1, hidden});
}

struct RmsNormOut {
  at::Tensor y, h, rstd;
};

inline RmsNormOut rms_norm_prepare(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps,
                                   const c10::optional<at::Tensor>& residual, RmsNormParams& p,
                                   at::Tensor& x2, at::Tensor& r2) {
  check_floating(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_dim(op, "weight", weight, 1);
  check_same_device(op, "weight", weight, "x", x);
  check_size(op, "weight", weight, 0, x.size(-1), "the hidden size, x.size(-1)");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, "thrifty.", op,
                   ": argument 'weight' must have the dtype of 'x' (", x.scalar_type(), ") or Float, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "thrifty.", op, ": argument 'eps' must be finite and >= 0 (got ",
                    eps, ")");
  const int64_t hidden = x.size(-1);
  x2 = as_rows(x);
  RmsNormOut out;
  out.y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto lead = x.sizes().slice(0, x.dim() - 1);
  out.rstd = at::empty(lead, x.options().dtype(at::kFloat));
  p.rows = x2.size(0);
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(op, "x", x);
  p.wdtype = to_dtype(op, "weight", weight);
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.weight = weight.data_ptr();
  TORCH_CHECK_VALUE(weight.stride(0) == 1 || hidden <= 1, "thrifty.", op,
                    ": argument 'weight' must be contiguous (got stride ", weight.stride(0), ")");
  p.y = out.y.data_ptr();
  p.rstd = out.rstd.data_ptr<float>();
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_same_device(op, "residual", r, "x", x);
    check_same_dtype(op, "residual", r, "x", x);
    check_same_shape(op, "residual", r, "x", x);
    r2 = as_rows(r);
    out.h = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    p.residual = r2.data_ptr();
    p.r_stride = r2.stride(0);
    p.h = out.h.data_ptr();
  }
  return out;
}

struct RmsNormBwdOut {
  at::Tensor grad_x, grad_weight, partial;
};

inline RmsNormBwdOut rms_norm_bwd_prepare(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                          const at::Tensor& weight, const at::Tensor& rstd,
                                          const c10::optional<at::Tensor>& grad_h, RmsNormBwdParams& p,
                                          std::vector<at::Tensor>& keep) {
  check_floating(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_same_shape(op, "grad_y", grad_y, "x", x);
  check_same_dtype(op, "grad_y", grad_y, "x", x);
  check_same_device(op, "grad_y", grad_y, "x", x);
  check_dim(op, "weight", weight, 1);
  check_same_device(op, "weight", weight, "x", x);
  check_size(op, "weight", weight, 0, x.size(-1), "the hidden size, x.size(-1)");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, "thrifty.", op,
                   ": argument 'weight' must have the dtype of 'x' (", x.scalar_type(), ") or Float, got ",
                   weight.scalar_type());
  check_dtype(op, "rstd", rstd, {at::kFloat});
  check_same_device(op, "rstd", rstd, "x", x);
  TORCH_CHECK_VALUE(rstd.numel() * x.size(-1) == x.numel(), "thrifty.", op,
                    ": argument 'rstd' must have one value per row of 'x' (", x.numel() / std::max<int64_t>(x.size(-1), 1),
                    "), got shape ", rstd.sizes());
  auto gy2 = as_rows(grad_y), x2 = as_rows(x), w = weight.contiguous(), r = rstd.contiguous();
  keep = {gy2, x2, w, r};
  RmsNormBwdOut out;
  out.grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  out.grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  p.rows = x2.size(0);
  p.hidden = x.size(-1);
  p.dtype = to_dtype(op, "x", x);
  p.wdtype = to_dtype(op, "weight", weight);
  p.grad_y = gy2.data_ptr();
  p.gy_stride = gy2.stride(0);
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.weight = w.data_ptr();
  p.rstd = r.data_ptr<float>();
  p.grad_x = out.grad_x.data_ptr();
  if (grad_h.has_value() && grad_h->defined()) {
    check_same_shape(op, "grad_h", *grad_h, "x", x);
    check_same_dtype(op, "grad_h", *grad_h, "x", x);
    check_same_device(op, "grad_h", *grad_h, "x", x);
    auto gh2 = as_rows(*grad_h);
    keep.push_back(gh2);
    p.grad_h = gh2.data_ptr();
    p.gh_stride = gh2.stride(0);
  }
  return out;
}

}  // namespace thrifty
