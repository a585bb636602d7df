// Device-agnostic implementation of linear_cross_entropy and its backward, shared by the CPU
// and CUDA glue: argument checks and the loops that call the matmuls (at::mm, so cuBLAS or the
// CPU BLAS) and the fused kernels handed in as function pointers.
//
// Forward, over chunks of tokens (<= 2^26 logits each, >= 8 chunks for large inputs): logits = h_c @ W^T, then ce_fwd gives
// per-token lse and loss. Only lse (tokens floats) is saved.
// Backward, recomputing, over blocks of vocab rows of W (sized the same way):
//   Z_b = h @ W_b^T (tokens, block);  ce_grad: Z_b <- G_b = scale * d loss / d Z_b in place
//   grad_W_b = G_b^T @ h      (each row of grad_W written once: one rounding in bf16/f16)
//   grad_h  += G_b @ W_b      (accumulated in float32, rounded once at the end; on CUDA each block's
//                              product is also summed in float32, on the CPU's bf16 path it is rounded once)
// This costs one more logits matmul than computing the gradient in the forward pass, and buys:
// one code path for every reduction (reduction="none" needs the per-token incoming gradient,
// which only the backward has), no gradient stored between forward and backward, and
// grad_weight rounded once instead of once per token chunk.
// Small inputs skip the recompute: linear_cross_entropy_keep_logits runs the forward as one chunk and
// returns its (tokens, V) logits, which the backward then takes (a copy of them: the gradient kernel
// works in place and the saved logits must survive a retain_graph backward) instead of the matmul. The
// Python wrapper picks it for logits of at most 64 MiB (ops/loss.py), where one logits matmul is about a
// quarter of the loss's forward + backward.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/loss_params.h"
#include "common/torch_compat.h"

namespace thrifty {

using CeFwdFn = void (*)(const CeFwdParams&);
using CeGradFn = void (*)(const CeGradParams&);

enum LceReduction : int64_t { kLceNone = 0, kLceMean = 1, kLceSum = 2 };
constexpr int64_t kLceBudget = int64_t(1) << 26;  // most logits per chunk / block
constexpr int64_t kLceCpuMinRows = 256;             // CPU forward: token rows per chunk at least (budget permitting)

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
  TORCH_CHECK_VALUE(weight.size(0) > 0, "thrifty.", op,
                    ": argument 'weight' must have at least one row (vocab > 0), got shape ", weight.sizes());
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
  if (stats[0].item<int64_t>() > 0) {
    const int64_t first = at::nonzero(bad.view(-1))[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "thrifty.", op, ": argument 'labels' must be in [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, "); labels[", first, "] = ", labels[first].item<int64_t>());
  }
  return stats[1].item<int64_t>();
}

// Matmul operands: on a CPU without native bf16 dot products (below avx512_bf16) torch's bf16/f16
// GEMM is ~30x slower than float32, so the matmuls (and the kernels) run on float32 copies there; float16
// always on the CPU (torch's f16 CPU GEMM ran ~45x slower than bf16 at avx512_bf16: 142 s against 3 s).
// Decided once per op call (lce_upcast) and applied to every operand: reading the ISA level per operand let a
// set_cpu_isa from another thread mid-call widen hidden but not the logits, and the kernels then wrote float32
// gradients into a bf16 buffer.
inline bool lce_upcast(const at::Tensor& hidden) {
  return hidden.device().is_cpu() && hidden.scalar_type() != at::kFloat &&
         (hidden.scalar_type() == at::kHalf || cpu_isa_current() != CpuIsa::avx512_bf16);
}

inline at::Tensor lce_operand(const at::Tensor& t, bool upcast) { return upcast ? t.to(at::kFloat) : t; }

// Rows of a chunk (tokens) or block (vocab columns): at most kLceBudget logits, and at least 8
// chunks once the whole (tokens x vocab) matrix passes 8 x 2^20 logits; at least min_rows rows where
// the budget allows (the CPU forward: 64-row logits GEMMs ran ~25% under 256-row ones).
inline int64_t lce_block(int64_t n, int64_t other, int64_t chunk_size, int64_t min_rows = 1) {
  if (chunk_size > 0) return std::min(chunk_size, std::max<int64_t>(n, 1));
  other = std::max<int64_t>(other, 1);
  const int64_t budget = std::min(kLceBudget, std::max<int64_t>(int64_t(1) << 20, n * other / 8));
  const int64_t rows = std::max(budget / other, std::min(min_rows, kLceBudget / other));
  return std::max<int64_t>(1, std::min<int64_t>(n, rows));
}

// keep: one chunk, and its logits returned third (in hidden's dtype; undefined when !keep).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& labels, int64_t ignore_index,
                                                                  int64_t reduction, double label_smoothing,
                                                                  double softcap, int64_t chunk_size, CeFwdFn fwd,
                                                                  bool keep = false) {
  const char* op = "linear_cross_entropy";  // the name users call, for either op
  lce_check(op, hidden, weight, labels, reduction, label_smoothing, softcap, chunk_size);
  const int64_t T = hidden.size(0), V = weight.size(0);
  const int64_t count = lce_count_labels(op, labels, V, ignore_index);
  const bool up = lce_upcast(hidden);
  auto h = lce_operand(hidden.contiguous(), up), w = lce_operand(weight.contiguous(), up), lab = labels.contiguous();
  auto f32 = hidden.options().dtype(at::kFloat);
  auto loss_rows = at::empty({T}, f32), lse = at::empty({T}, f32);
  const int64_t rows = keep ? std::max<int64_t>(T, 1)
                            : lce_block(T, V, chunk_size, hidden.device().is_cpu() ? kLceCpuMinRows : 1);
  auto wt = w.t();
  at::Tensor kept;
  for (int64_t s = 0; s < T; s += rows) {
    const int64_t n = std::min(rows, T - s);
    auto logits = at::mm(h.narrow(0, s, n), wt);
    if (keep) kept = logits;
    CeFwdParams p;
    p.rows = n;
    p.vocab = V;
    p.dtype = to_dtype(op, "hidden", h);
    p.logits = logits.data_ptr();
    p.ld = logits.stride(0);
    p.labels = lab.data_ptr<int64_t>() + s;
    p.ignore_index = ignore_index;
    p.label_smoothing = static_cast<float>(label_smoothing);
    p.softcap = static_cast<float>(softcap);
    p.loss = loss_rows.data_ptr<float>() + s;
    p.lse = lse.data_ptr<float>() + s;
    fwd(p);
  }
  // The loss stays float32 (ops/loss.py rounds it to hidden's dtype outside autocast; under autocast it is
  // float32, as F.cross_entropy's after an autocast linear).
  at::Tensor loss = loss_rows;
  if (reduction != kLceNone) {
    loss = loss_rows.sum();
    if (reduction == kLceMean) loss = loss / static_cast<double>(count);  // 0/0 = nan, as torch
  }
  if (keep) kept = T == 0 ? at::empty({0, V}, hidden.options()) : kept.to(hidden.scalar_type());
  return {loss, lse, kept};
}

inline std::tuple<at::Tensor, at::Tensor> lce_backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                       const at::Tensor& weight, const at::Tensor& labels,
                                                       const at::Tensor& lse, int64_t ignore_index, int64_t reduction,
                                                       double label_smoothing, double softcap, int64_t chunk_size,
                                                       CeGradFn grad_fn, const c10::optional<at::Tensor>& logits) {
  const char* op = "linear_cross_entropy_backward";
  lce_check(op, hidden, weight, labels, reduction, label_smoothing, softcap, chunk_size);
  check_same_device(op, "grad_loss", grad_loss, "hidden", hidden);
  check_same_device(op, "lse", lse, "hidden", hidden);
  check_dtype(op, "lse", lse, {at::kFloat});
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == T, "thrifty.", op, ": argument 'lse' must have shape (", T,
                    ",), got ", lse.sizes());
  if (reduction == kLceNone) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == T, "thrifty.", op,
                      ": argument 'grad_loss' must have shape (", T, ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "thrifty.", op,
                      ": argument 'grad_loss' must be a scalar for reduction mean or sum, got shape ", grad_loss.sizes());
  }
  const bool have_logits = logits.has_value() && logits->defined();
  if (have_logits) {
    check_same_dtype(op, "logits", *logits, "hidden", hidden);
    check_same_device(op, "logits", *logits, "hidden", hidden);
    TORCH_CHECK_VALUE(logits->dim() == 2 && logits->size(0) == T && logits->size(1) == V, "thrifty.", op,
                      ": argument 'logits' must have shape (", T, ", ", V, ") (hidden @ weight.T), got ",
                      logits->sizes());
  }
  const bool up = lce_upcast(hidden);
  auto h = lce_operand(hidden.contiguous(), up), w = lce_operand(weight.contiguous(), up);
  auto lab = labels.contiguous(), l = lse.contiguous();
  at::Tensor scale = grad_loss.to(at::kFloat).reshape({-1}).contiguous();
  if (reduction == kLceMean) {
    const int64_t count = labels.ne(ignore_index).sum().item<int64_t>();
    scale = scale / static_cast<double>(count > 0 ? count : 1);
  }
  auto gw = at::empty({V, H}, hidden.options());
  const bool f32 = h.scalar_type() == at::kFloat, same = h.scalar_type() == hidden.scalar_type();
  auto gh_acc = at::zeros({T, H}, hidden.options().dtype(at::kFloat));
  if (T == 0) {
    gw.zero_();
    return {gh_acc.to(hidden.scalar_type()), gw};
  }
  // Vocab blocks as the recomputing path's, kept logits or not: the kept logits are copied a block at a time
  // (G is formed in place, and the saved logits must stay as they are for a retained graph), so the backward
  // holds one block more than the logits, not a second full copy (the kept path's peak was ~4x the logits).
  const int64_t cols = lce_block(V, T, chunk_size);
  for (int64_t v0 = 0; v0 < V; v0 += cols) {
    const int64_t n = std::min(cols, V - v0);
    auto wb = w.narrow(0, v0, n);
    at::Tensor z;  // (T, n), turned into G in place below
    if (have_logits) {
      auto zb = logits->narrow(1, v0, n);
      z = lce_operand(zb, up);
      z = z.is_same(zb) ? z.clone(at::MemoryFormat::Contiguous) : z.contiguous();
    } else {
      z = at::mm(h, wb.t());
    }
    CeGradParams p;
    p.rows = T;
    p.cols = n;
    p.col0 = v0;
    p.vocab = V;
    p.dtype = to_dtype(op, "hidden", h);
    p.logits = z.data_ptr();
    p.ld = z.stride(0);
    p.labels = lab.data_ptr<int64_t>();
    p.ignore_index = ignore_index;
    p.label_smoothing = static_cast<float>(label_smoothing);
    p.softcap = static_cast<float>(softcap);
    p.lse = l.data_ptr<float>();
    p.grad_scale = scale.data_ptr<float>();
    p.grad_scale_stride = scale.numel() == 1 ? 0 : 1;
    grad_fn(p);
    auto gwb = gw.narrow(0, v0, n);
    if (same)
      at::mm_out(gwb, z.t(), h);
    else
      gwb.copy_(at::mm(z.t(), h));
    if (f32)
      gh_acc.addmm_(z, wb);
#if THRIFTY_HAVE_MM_OUT_DTYPE
    else if (z.is_cuda())
      gh_acc.add_(at::mm(z, wb, at::kFloat));  // cuBLAS: float32 sums out, no bf16/f16 rounding per block
#endif
    else
      gh_acc.add_(at::mm(z, wb));  // CPU at avx512_bf16: the block's product is rounded to bf16/f16 once
  }
  return {hidden.scalar_type() == at::kFloat ? gh_acc : gh_acc.to(hidden.scalar_type()), gw};
}

}  // namespace thrifty
