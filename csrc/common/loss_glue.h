// Device-agnostic implementation of linear_cross_entropy and its backward, shared by the
// CPU and CUDA glue: argument checks, and the loop over token chunks that calls the
// matmuls (at::mm / at::addmm_, so cuBLAS or the CPU BLAS) and the fused softmax /
// loss / gradient chunk kernel handed in as `chunk_fn`.
//
// Per chunk of n tokens:  logits = h_c @ W^T (n, V) in the input dtype
//                         chunk kernel: loss, lse, and in place logits <- d loss / d logits * scale
//                         grad_h_c = grad_logits @ W;  grad_W += grad_logits^T @ h_c
// Only one chunk's logits exist at any time. grad_W is accumulated in the weight's dtype
// (one rounding per chunk in bf16/f16; chunks hold ~2^26 logits, so 128k vocab x 8k tokens
// is 16 chunks).
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/loss_params.h"

namespace thrifty {

using CeChunkFn = void (*)(const CeChunkParams&);

enum LceReduction : int64_t { kLceNone = 0, kLceMean = 1, kLceSum = 2 };

inline void lce_check(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                      int64_t reduction, double label_smoothing, double softcap, int64_t chunk_size) {
  check_floating(op, "hidden", hidden);
  check_same_dtype(op, "weight", weight, "hidden", hidden);
  check_dtype(op, "labels", labels, {at::kLong});
  check_dim(op, "hidden", hidden, 2);
  check_dim(op, "weight", weight, 2);
  check_dim(op, "labels", labels, 1);
  check_same_device(op, "weight", weight, "hidden", hidden);
  check_same_device(op, "labels", labels, "hidden", hidden);
  check_size(op, "weight", weight, 1, hidden.size(1), "the hidden size, hidden.size(1)");
  check_size(op, "labels", labels, 0, hidden.size(0), "one label per token, hidden.size(0)");
  TORCH_CHECK_VALUE(weight.size(0) > 0, "thrifty.", op, ": argument 'weight' must have at least one row (vocab > 0), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "thrifty.", op,
                    ": argument 'reduction' must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "thrifty.", op,
                    ": argument 'label_smoothing' must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "thrifty.", op,
                    ": argument 'softcap' must be finite and >= 0 (0 disables it), got ", softcap);
  TORCH_CHECK_VALUE(chunk_size >= 0, "thrifty.", op, ": argument 'chunk_size' must be >= 0 (0 = automatic), got ",
                    chunk_size);
}

// Checks every label is in [0, vocab) or == ignore_index; returns the number not ignored.
inline int64_t lce_count_labels(const char* op, const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  if (labels.numel() == 0) return 0;
  auto keep = labels.ne(ignore_index);
  auto bad = keep.logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
  auto stats = at::stack({bad.sum(), keep.sum()}).cpu();
  const int64_t nbad = stats[0].item<int64_t>();
  if (nbad > 0) {
    const int64_t first = at::nonzero(bad.view(-1))[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "thrifty.", op, ": argument 'labels' must be in [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, "); labels[", first, "] = ", labels[first].item<int64_t>());
  }
  return stats[1].item<int64_t>();
}

inline int64_t lce_chunk_rows(int64_t tokens, int64_t vocab, int64_t chunk_size) {
  if (chunk_size > 0) return std::min(chunk_size, std::max<int64_t>(tokens, 1));
  const int64_t budget = int64_t(1) << 26;  // logits per chunk
  return std::max<int64_t>(1, std::min<int64_t>(tokens, budget / vocab));
}

// The chunk loop. grad_scale: nullptr (no gradient), or a float32 tensor of 1 (broadcast) or tokens values.
inline void lce_run(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, int64_t ignore_index,
                    double label_smoothing, double softcap, int64_t chunk_size, CeChunkFn chunk_fn,
                    const at::Tensor& loss_rows, const at::Tensor& lse, const at::Tensor* grad_scale,
                    at::Tensor* grad_hidden, at::Tensor* grad_weight) {
  const int64_t T = h.size(0), V = w.size(0);
  const int64_t rows = lce_chunk_rows(T, V, chunk_size);
  const bool grad = grad_scale != nullptr;
  if (grad && T == 0) grad_weight->zero_();
  auto wt = w.t();
  for (int64_t s = 0; s < T; s += rows) {
    const int64_t n = std::min(rows, T - s);
    auto hc = h.narrow(0, s, n);
    auto logits = at::mm(hc, wt);
    CeChunkParams p;
    p.rows = n;
    p.vocab = V;
    p.dtype = to_dtype("linear_cross_entropy", "hidden", h);
    p.logits = logits.data_ptr();
    p.ld = logits.stride(0);
    p.labels = labels.data_ptr<int64_t>() + s;
    p.ignore_index = ignore_index;
    p.label_smoothing = static_cast<float>(label_smoothing);
    p.softcap = static_cast<float>(softcap);
    p.loss = loss_rows.data_ptr<float>() + s;
    p.lse = lse.data_ptr<float>() + s;
    if (grad) {
      const bool bcast = grad_scale->numel() == 1;
      p.grad_scale = grad_scale->data_ptr<float>() + (bcast ? 0 : s);
      p.grad_scale_stride = bcast ? 0 : 1;
    }
    chunk_fn(p);
    if (grad) {
      auto gh = grad_hidden->narrow(0, s, n);
      at::mm_out(gh, logits, w);
      if (s == 0)
        at::mm_out(*grad_weight, logits.t(), hc);
      else
        grad_weight->addmm_(logits.t(), hc);
    }
  }
}

inline at::Tensor lce_reduce(const at::Tensor& loss_rows, int64_t reduction, int64_t count, at::ScalarType dtype) {
  if (reduction == kLceNone) return loss_rows.to(dtype);
  auto total = loss_rows.sum();
  if (reduction == kLceMean) total = total / static_cast<double>(count);
  return total.to(dtype);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double softcap, bool compute_grad, int64_t chunk_size,
    CeChunkFn chunk_fn) {
  const char* op = "linear_cross_entropy";
  lce_check(op, hidden, weight, labels, reduction, label_smoothing, softcap, chunk_size);
  TORCH_CHECK_VALUE(!compute_grad || reduction != kLceNone, "thrifty.", op,
                    ": compute_grad needs reduction mean or sum (reduction none recomputes in the backward)");
  const int64_t T = hidden.size(0), V = weight.size(0);
  const int64_t count = lce_count_labels(op, labels, V, ignore_index);
  auto h = hidden.contiguous(), w = weight.contiguous(), lab = labels.contiguous();
  auto f32 = hidden.options().dtype(at::kFloat);
  auto loss_rows = at::empty({T}, f32), lse = at::empty({T}, f32);
  at::Tensor gh = at::empty({0}, hidden.options()), gw = at::empty({0}, hidden.options());
  if (compute_grad) {
    gh = at::empty({T, hidden.size(1)}, hidden.options());
    gw = at::empty({V, hidden.size(1)}, hidden.options());
    const double s = reduction == kLceMean ? (count > 0 ? 1.0 / count : 0.0) : 1.0;
    auto scale = at::full({1}, s, f32);
    lce_run(h, w, lab, ignore_index, label_smoothing, softcap, chunk_size, chunk_fn, loss_rows, lse, &scale, &gh, &gw);
  } else {
    lce_run(h, w, lab, ignore_index, label_smoothing, softcap, chunk_size, chunk_fn, loss_rows, lse, nullptr, nullptr,
            nullptr);
  }
  return {lce_reduce(loss_rows, reduction, count, hidden.scalar_type()), lse, gh, gw};
}

inline std::tuple<at::Tensor, at::Tensor> lce_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const c10::optional<at::Tensor>& grad_hidden, const c10::optional<at::Tensor>& grad_weight, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double softcap, int64_t chunk_size, CeChunkFn chunk_fn) {
  const char* op = "linear_cross_entropy_backward";
  lce_check(op, hidden, weight, labels, reduction, label_smoothing, softcap, chunk_size);
  check_same_device(op, "grad_loss", grad_loss, "hidden", hidden);
  const int64_t T = hidden.size(0), V = weight.size(0);
  if (reduction == kLceNone) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == T, "thrifty.", op,
                      ": argument 'grad_loss' must have shape (", T, ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "thrifty.", op,
                      ": argument 'grad_loss' must be a scalar for reduction mean or sum, got shape ", grad_loss.sizes());
  }
  const bool pre = grad_hidden.has_value() && grad_hidden->defined() && grad_hidden->numel() > 0;
  if (pre) {  // gradients of the reduced loss were computed in the forward pass: scale them
    TORCH_CHECK_VALUE(reduction != kLceNone && grad_weight.has_value() && grad_weight->defined(), "thrifty.", op,
                      ": precomputed gradients need reduction mean or sum and both grad_hidden and grad_weight");
    check_same_shape(op, "grad_hidden", *grad_hidden, "hidden", hidden);
    check_same_shape(op, "grad_weight", *grad_weight, "weight", weight);
    auto g = grad_loss.reshape({}).to(hidden.scalar_type());
    return {*grad_hidden * g, *grad_weight * g};
  }
  const int64_t count = lce_count_labels(op, labels, V, ignore_index);
  auto h = hidden.contiguous(), w = weight.contiguous(), lab = labels.contiguous();
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor scale = grad_loss.to(at::kFloat).reshape({-1}).contiguous();
  if (reduction == kLceMean) scale = scale / static_cast<double>(count > 0 ? count : 1);
  auto loss_rows = at::empty({T}, f32), lse = at::empty({T}, f32);
  auto gh = at::empty({T, hidden.size(1)}, hidden.options());
  auto gw = at::empty({V, hidden.size(1)}, hidden.options());
  lce_run(h, w, lab, ignore_index, label_smoothing, softcap, chunk_size, chunk_fn, loss_rows, lse, &scale, &gh, &gw);
  return {gh, gw};
}

}  // namespace thrifty
