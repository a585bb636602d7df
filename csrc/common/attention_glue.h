// Device-agnostic argument checks, output allocation and params filling for the fused
// attention ops (flash_attention_fwd / flash_attention_bwd); the CPU glue
// (cpu/attention/attention_aten.cpp) and the CUDA glue both call these, then hand the
// params to their kernels. See common/attention_params.h for layouts and the masking rule,
// common/attention_mask.h for the torch-free mask helpers.
//
// Usage (forward):
//   AttentionParams p;
//   AttentionOut o = attention_fwd_prepare("flash_attention_fwd", q, k, v, cu_q, cu_k, max_q, max_k,
//                                          scale, causal, wl, wr, softcap, /*max_head_dim=*/256, p);
//   if (!o.done) run_kernel(p);           // o.done: nothing left to compute (empty input, no keys)
//   return {o.out, o.lse};
// Rows of a varlen out/lse beyond cu_seqlens_q[batch] are already filled (0 / -inf) by the
// prepare call, as are all rows when there are no keys at all; kernels write every other
// row, including the 0 / -inf of rows whose window holds no key.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/attention_mask.h"
#include "common/attention_params.h"
#include "common/checks.h"

namespace thrifty {

struct AttentionOut {
  at::Tensor out, lse;
  std::vector<at::Tensor> keep;  // inputs copied to a usable layout: keep alive while the kernel runs
  bool done = false;             // true: out/lse are final, do not launch a kernel
};

struct AttentionBwdOut {
  at::Tensor dq, dk, dv;
  std::vector<at::Tensor> keep;
  bool done = false;  // true: dq/dk/dv are final (zeros), do not launch a kernel
};

namespace attention_detail {

// Last dim contiguous (the one layout rule of the params); copies otherwise.
inline at::Tensor last_contig(const at::Tensor& t, std::vector<at::Tensor>& keep) {
  if (t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  auto c = t.contiguous();
  keep.push_back(c);
  return c;
}

// Checks cu_seqlens (int32, 1-D, batch+1, same device) and, when check_values, its values
// (copied to the host: a device sync on CUDA): starts at 0, non-decreasing, every length
// <= max_seqlen, last entry <= total rows. Returns the last entry (or -1 when not checked).
inline int64_t check_cu_seqlens(const char* op, const char* arg, const at::Tensor& cu, int64_t batch_plus_1,
                                const at::Tensor& ref, const char* max_arg, int64_t max_seqlen, int64_t total,
                                const char* total_what, bool check_values) {
  check_dtype(op, arg, cu, {at::kInt});
  check_same_device(op, arg, cu, "q", ref);
  check_dim(op, arg, cu, 1);
  TORCH_CHECK_VALUE(cu.size(0) >= 1, "thrifty.", op, ": argument '", arg,
                    "' must have batch + 1 >= 1 entries (got shape ", cu.sizes(), ")");
  if (batch_plus_1 >= 0) {
    TORCH_CHECK_VALUE(cu.size(0) == batch_plus_1, "thrifty.", op, ": argument '", arg,
                      "' must have batch + 1 = ", batch_plus_1, " entries like 'cu_seqlens_q' (got shape ", cu.sizes(),
                      ")");
  }
  if (!check_values) return -1;
  auto h = cu.device().is_cpu() ? cu.contiguous() : cu.to(at::kCPU).contiguous();
  const int32_t* c = h.data_ptr<int32_t>();
  const int64_t n = h.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, "thrifty.", op, ": argument '", arg, "' must start at 0 (got ", c[0], ")");
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = static_cast<int64_t>(c[b + 1]) - c[b];
    TORCH_CHECK_VALUE(len >= 0, "thrifty.", op, ": argument '", arg, "' must be non-decreasing (monotone), got ",
                      c[b], " then ", c[b + 1], " at index ", b + 1);
    TORCH_CHECK_VALUE(len <= max_seqlen, "thrifty.", op, ": sequence ", b, " of '", arg, "' has length ", len,
                      ", more than '", max_arg, "' = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] <= total, "thrifty.", op, ": argument '", arg, "' ends at ", c[n - 1],
                    ", past the ", total, " rows of ", total_what);
  return c[n - 1];
}

struct Shapes {
  bool varlen = false;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t total_q = 0, total_k = 0;  // varlen: rows of q and k
  int64_t cu_q_end = -1;            // varlen with checked values: cu_seqlens_q[batch]
  int64_t cu_k_end = -1;
};

inline Shapes check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k,
                           int64_t max_q, int64_t max_k, double scale, int64_t wl, int64_t wr, double softcap,
                           int64_t max_head_dim, bool check_cu_values) {
  check_floating(op, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  const bool has_cq = cu_q.has_value() && cu_q->defined(), has_ck = cu_k.has_value() && cu_k->defined();
  TORCH_CHECK_VALUE(has_cq == has_ck, "thrifty.", op,
                    ": arguments 'cu_seqlens_q' and 'cu_seqlens_k' must both be given (varlen) or both be None "
                    "(batched), got ",
                    has_cq ? "a tensor" : "None", " and ", has_ck ? "a tensor" : "None");
  Shapes s;
  s.varlen = has_cq;
  const int64_t nd = s.varlen ? 3 : 4;
  const char* layout_q = s.varlen ? "(total_q, heads, head_dim) in varlen mode" : "(batch, seqlen_q, heads, head_dim)";
  const char* layout_k =
      s.varlen ? "(total_k, kv_heads, head_dim) in varlen mode" : "(batch, seqlen_k, kv_heads, head_dim)";
  TORCH_CHECK_VALUE(q.dim() == nd, "thrifty.", op, ": argument 'q' must be ", nd, "-D ", layout_q, " (got shape ",
                    q.sizes(), ")");
  TORCH_CHECK_VALUE(k.dim() == nd, "thrifty.", op, ": argument 'k' must be ", nd, "-D ", layout_k, " (got shape ",
                    k.sizes(), ")");
  check_same_shape(op, "v", v, "k", k);
  s.heads = q.size(-2);
  s.kv_heads = k.size(-2);
  s.head_dim = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, "thrifty.", op, ": 'k' and 'v' must have the head_dim of 'q' (",
                    s.head_dim, "), got shape ", k.sizes());
  TORCH_CHECK_VALUE(s.head_dim >= 1 && s.head_dim <= max_head_dim, "thrifty.", op, ": head_dim must be in [1, ",
                    max_head_dim, "] on ", q.device().type(), " (got ", s.head_dim,
                    ", the last dim of argument 'q' of shape ", q.sizes(), ")");
  TORCH_CHECK_VALUE(s.kv_heads >= 1 && s.heads >= 1 && s.heads % s.kv_heads == 0, "thrifty.", op,
                    ": the heads of 'q' (", s.heads, ") must be a positive multiple of the kv_heads of 'k'/'v' (",
                    s.kv_heads, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "thrifty.", op,
                    ": argument 'softmax_scale' must be finite and > 0 (got ", scale, ")");
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "thrifty.", op,
                    ": argument 'softcap' must be finite and >= 0 (0 = off), got ", softcap);
  TORCH_CHECK_VALUE(wl >= -1, "thrifty.", op, ": argument 'window_left' must be >= -1 (-1 = unbounded), got ", wl);
  TORCH_CHECK_VALUE(wr >= -1, "thrifty.", op, ": argument 'window_right' must be >= -1 (-1 = unbounded), got ", wr);
  if (s.varlen) {
    s.total_q = q.size(0);
    s.total_k = k.size(0);
    TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0 && max_q <= std::numeric_limits<int32_t>::max() &&
                          max_k <= std::numeric_limits<int32_t>::max(),
                      "thrifty.", op, ": 'max_seqlen_q' and 'max_seqlen_k' must be in [0, 2^31) (got ", max_q, ", ",
                      max_k, ")");
    s.cu_q_end = check_cu_seqlens(op, "cu_seqlens_q", *cu_q, -1, q, "max_seqlen_q", max_q, s.total_q, "'q'",
                                  check_cu_values);
    s.batch = cu_q->size(0) - 1;
    s.cu_k_end = check_cu_seqlens(op, "cu_seqlens_k", *cu_k, s.batch + 1, q, "max_seqlen_k", max_k, s.total_k,
                                  "'k'", check_cu_values);
    s.seqlen_q = max_q;
    s.seqlen_k = max_k;
  } else {
    s.batch = q.size(0);
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
    TORCH_CHECK_VALUE(k.size(0) == s.batch, "thrifty.", op, ": 'k' and 'v' must have the batch size of 'q' (", s.batch,
                      "), got shape ", k.sizes());
    TORCH_CHECK_VALUE(s.seqlen_q <= std::numeric_limits<int32_t>::max() &&
                          s.seqlen_k <= std::numeric_limits<int32_t>::max(),
                      "thrifty.", op, ": sequence lengths must be < 2^31");
  }
  return s;
}

inline void fill_common(AttentionParams& p, const char* op, const Shapes& s, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const c10::optional<at::Tensor>& cu_q,
                        const c10::optional<at::Tensor>& cu_k, double scale, bool causal, int64_t wl, int64_t wr,
                        double softcap) {
  p.dtype = to_dtype(op, "q", q);
  p.batch = static_cast<int>(s.batch);
  p.heads = static_cast<int>(s.heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.varlen = s.varlen;
  p.cu_seqlens_q = s.varlen ? cu_q->data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = s.varlen ? cu_k->data_ptr<int32_t>() : nullptr;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  const int o = s.varlen ? 1 : 0;  // varlen tensors lack the batch dim
  p.q_batch_stride = s.varlen ? 0 : q.stride(0);
  p.q_row_stride = q.stride(1 - o);
  p.q_head_stride = q.stride(2 - o);
  p.k_batch_stride = s.varlen ? 0 : k.stride(0);
  p.k_row_stride = k.stride(1 - o);
  p.k_head_stride = k.stride(2 - o);
  p.v_batch_stride = s.varlen ? 0 : v.stride(0);
  p.v_row_stride = v.stride(1 - o);
  p.v_head_stride = v.stride(2 - o);
  p.softmax_scale = static_cast<float>(scale);
  p.causal = causal;
  // a window of 2^31 keys or more spans any sequence (lengths are int32): the same as unbounded
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  p.window_left = wl > kIntMax ? -1 : static_cast<int>(wl);
  // causal = window_right 0 (keys up to the bottom-right diagonal); with a window_right too,
  // the tighter bound (min(wr, 0) for wr >= 0, i.e. 0) wins.
  p.window_right = causal ? 0 : (wr > kIntMax ? -1 : static_cast<int>(wr));
  p.softcap = static_cast<float>(softcap);
}

}  // namespace attention_detail

// Validates every argument of flash_attention_fwd, allocates out (like q, contiguous) and
// lse (float32: (batch, heads, seqlen_q) batched, (heads, total_q) varlen) and fills p.
// max_head_dim: the device's limit (256 on CPU). check_cu_values: validate the contents of
// cu_seqlens (a host copy: a sync on CUDA; the CPU glue always checks).
inline AttentionOut attention_fwd_prepare(const char* op, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
                                          const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double softmax_scale, bool causal,
                                          int64_t window_left, int64_t window_right, double softcap,
                                          int64_t max_head_dim, AttentionParams& p, bool check_cu_values = true) {
  using namespace attention_detail;
  const Shapes s = check_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                window_left, window_right, softcap, max_head_dim, check_cu_values);
  AttentionOut r;
  const at::Tensor q2 = last_contig(q, r.keep), k2 = last_contig(k, r.keep), v2 = last_contig(v, r.keep);
  at::Tensor cq, ck;
  if (s.varlen) {
    cq = cu_seqlens_q->contiguous();
    ck = cu_seqlens_k->contiguous();
    r.keep.push_back(cq);
    r.keep.push_back(ck);
  }
  r.out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.varlen)
    r.lse = at::empty({s.heads, s.total_q}, q.options().dtype(at::kFloat));
  else
    r.lse = at::empty({s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
  fill_common(p, op, s, q2, k2, v2, s.varlen ? c10::optional<at::Tensor>(cq) : c10::nullopt,
              s.varlen ? c10::optional<at::Tensor>(ck) : c10::nullopt, softmax_scale, causal, window_left,
              window_right, softcap);
  const int o = s.varlen ? 1 : 0;
  p.out = r.out.data_ptr();
  p.o_batch_stride = s.varlen ? 0 : r.out.stride(0);
  p.o_row_stride = r.out.stride(1 - o);
  p.o_head_stride = r.out.stride(2 - o);
  p.lse = r.lse.data_ptr<float>();
  p.lse_batch_stride = s.varlen ? 0 : r.lse.stride(0);
  p.lse_head_stride = s.varlen ? r.lse.stride(0) : r.lse.stride(1);

  const bool no_keys = s.varlen ? s.total_k == 0 || s.seqlen_k == 0 : s.seqlen_k == 0;
  if (q.numel() == 0 || s.batch == 0 || no_keys) {
    r.out.zero_();
    r.lse.fill_(-std::numeric_limits<float>::infinity());
    r.done = true;
    return r;
  }
  if (s.varlen) {
    // Rows past cu_seqlens_q[batch] belong to no sequence: 0 / -inf, like rows with no visible key.
    if (!check_cu_values) {
      r.out.zero_();
      r.lse.fill_(-std::numeric_limits<float>::infinity());
    } else if (s.cu_q_end < s.total_q) {
      r.out.narrow(0, s.cu_q_end, s.total_q - s.cu_q_end).zero_();
      r.lse.narrow(1, s.cu_q_end, s.total_q - s.cu_q_end).fill_(-std::numeric_limits<float>::infinity());
    }
  }
  return r;
}

// Validates every argument of flash_attention_bwd (the forward's arguments plus grad_out,
// out, lse), allocates dq/dk/dv (contiguous, shaped like q/k/v) and fills p (workspace is
// left to the device glue). Rows past cu_seqlens_q[batch] / cu_seqlens_k[batch] get zero
// gradients here.
inline AttentionBwdOut attention_bwd_prepare(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                             const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q,
                                             const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                             int64_t max_seqlen_k, double softmax_scale, bool causal,
                                             int64_t window_left, int64_t window_right, double softcap,
                                             bool deterministic, int64_t max_head_dim, AttentionBwdParams& p,
                                             bool check_cu_values = true) {
  using namespace attention_detail;
  const Shapes s = check_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                window_left, window_right, softcap, max_head_dim, check_cu_values);
  check_same_shape(op, "grad_out", dout, "q", q);
  check_same_dtype(op, "grad_out", dout, "q", q);
  check_same_device(op, "grad_out", dout, "q", q);
  check_same_shape(op, "out", out, "q", q);
  check_same_dtype(op, "out", out, "q", q);
  check_same_device(op, "out", out, "q", q);
  check_dtype(op, "lse", lse, {at::kFloat});
  check_same_device(op, "lse", lse, "q", q);
  if (s.varlen) {
    TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == s.heads && lse.size(1) == s.total_q, "thrifty.", op,
                      ": argument 'lse' must have shape (heads, total_q) = (", s.heads, ", ", s.total_q, "), got ",
                      lse.sizes());
  } else {
    TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads && lse.size(2) == s.seqlen_q,
                      "thrifty.", op, ": argument 'lse' must have shape (batch, heads, seqlen_q) = (", s.batch, ", ",
                      s.heads, ", ", s.seqlen_q, "), got ", lse.sizes());
  }
  AttentionBwdOut r;
  const at::Tensor q2 = last_contig(q, r.keep), k2 = last_contig(k, r.keep), v2 = last_contig(v, r.keep);
  const at::Tensor do2 = last_contig(dout, r.keep), o2 = last_contig(out, r.keep);
  // lse: the kernels index lse[b, h, i] / lse[h, row] with a unit innermost stride
  const at::Tensor lse2 = lse.stride(-1) == 1 ? lse : lse.contiguous();
  r.keep.push_back(lse2);
  at::Tensor cq, ck;
  if (s.varlen) {
    cq = cu_seqlens_q->contiguous();
    ck = cu_seqlens_k->contiguous();
    r.keep.push_back(cq);
    r.keep.push_back(ck);
  }
  const auto cf = at::MemoryFormat::Contiguous;
  r.dq = at::empty(q.sizes(), q.options().memory_format(cf));
  r.dk = at::empty(k.sizes(), k.options().memory_format(cf));
  r.dv = at::empty(v.sizes(), v.options().memory_format(cf));
  fill_common(p, op, s, q2, k2, v2, s.varlen ? c10::optional<at::Tensor>(cq) : c10::nullopt,
              s.varlen ? c10::optional<at::Tensor>(ck) : c10::nullopt, softmax_scale, causal, window_left,
              window_right, softcap);
  const int o = s.varlen ? 1 : 0;
  p.out = const_cast<void*>(o2.data_ptr());
  p.o_batch_stride = s.varlen ? 0 : o2.stride(0);
  p.o_row_stride = o2.stride(1 - o);
  p.o_head_stride = o2.stride(2 - o);
  p.lse = lse2.data_ptr<float>();
  p.lse_batch_stride = s.varlen ? 0 : lse2.stride(0);
  p.lse_head_stride = s.varlen ? lse2.stride(0) : lse2.stride(1);
  p.dout = do2.data_ptr();
  p.do_batch_stride = s.varlen ? 0 : do2.stride(0);
  p.do_row_stride = do2.stride(1 - o);
  p.do_head_stride = do2.stride(2 - o);
  p.dq = r.dq.data_ptr();
  p.dk = r.dk.data_ptr();
  p.dv = r.dv.data_ptr();
  p.dq_batch_stride = s.varlen ? 0 : r.dq.stride(0);
  p.dq_row_stride = r.dq.stride(1 - o);
  p.dq_head_stride = r.dq.stride(2 - o);
  p.dk_batch_stride = s.varlen ? 0 : r.dk.stride(0);
  p.dk_row_stride = r.dk.stride(1 - o);
  p.dk_head_stride = r.dk.stride(2 - o);
  p.dv_batch_stride = s.varlen ? 0 : r.dv.stride(0);
  p.dv_row_stride = r.dv.stride(1 - o);
  p.dv_head_stride = r.dv.stride(2 - o);
  p.deterministic = deterministic;

  const bool no_keys = s.varlen ? s.total_k == 0 || s.seqlen_k == 0 : s.seqlen_k == 0;
  const bool no_queries = s.varlen ? s.total_q == 0 || s.seqlen_q == 0 : s.seqlen_q == 0;
  if (q.numel() == 0 || k.numel() == 0 || s.batch == 0 || no_keys || no_queries) {
    r.dq.zero_();
    r.dk.zero_();
    r.dv.zero_();
    r.done = true;
    return r;
  }
  if (s.varlen) {
    if (!check_cu_values) {
      r.dq.zero_();
      r.dk.zero_();
      r.dv.zero_();
    } else {
      if (s.cu_q_end < s.total_q) r.dq.narrow(0, s.cu_q_end, s.total_q - s.cu_q_end).zero_();
      if (s.cu_k_end < s.total_k) {
        r.dk.narrow(0, s.cu_k_end, s.total_k - s.cu_k_end).zero_();
        r.dv.narrow(0, s.cu_k_end, s.total_k - s.cu_k_end).zero_();
      }
    }
  }
  return r;
}

}  // namespace thrifty
