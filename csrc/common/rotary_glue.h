// Device-agnostic argument checks and output allocation for the rotary-embedding ops; the
// CPU and CUDA glue both call these, then hand the params to their launcher.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <optional>

#include "common/checks.h"
#include "common/rotary_params.h"

namespace thrifty {

// Views t (..., heads, head_dim) as (tokens, heads, head_dim) with one token stride and a
// contiguous last dim, without a copy when the leading dims collapse that way (slices of a
// fused qkv projection, say); otherwise copies. Returns the tensor whose data the strides
// describe.
inline at::Tensor as_tokens(const at::Tensor& t, int64_t& tok_stride, int64_t& head_stride) {
  const int64_t nd = t.dim(), heads = t.size(-2), hd = t.size(-1);
  bool ok = t.stride(-1) == 1 || hd <= 1;
  int64_t ts = heads * hd, run = -1;
  for (int64_t d = nd - 3; d >= 0 && ok; --d) {
    if (t.size(d) == 1) continue;
    if (run < 0) {
      ts = t.stride(d);
      run = t.stride(d) * t.size(d);
    } else if (t.stride(d) != run) {
      ok = false;
    } else {
      run *= t.size(d);
    }
  }
  if (ok) {
    tok_stride = ts;
    head_stride = heads > 1 ? t.stride(-2) : hd;
    return t;
  }
  at::Tensor c = t.contiguous();
  tok_stride = heads * hd;
  head_stride = hd;
  return c;
}

// The last device positions tensor this thread found in range. A model hands the same positions to
// every layer (and autograd hands them to every backward), so the check's device sync happens once
// per positions tensor instead of once per call (per layer, per direction). Keyed on the storage (held
// weakly: a freed storage never matches), the elements (data pointer, count, dtype, contiguous), the
// version counter (any in-place write through torch re-checks) and max_position. A write the version
// counter cannot see (through .data, say) could slip past the check; the kernels clamp positions into
// the cache, so even then nothing is read out of bounds.
struct CheckedPositions {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  const void* data = nullptr;
  int64_t numel = 0, version = -1, max_position = 0;
  at::ScalarType dtype = at::kLong;

  bool matches(const at::Tensor& pos, int64_t max_pos) const {
    if (!storage || data != pos.data_ptr() || numel != pos.numel() || dtype != pos.scalar_type() ||
        version != pos._version() || max_position != max_pos)
      return false;
    auto alive = storage->lock();
    return alive.defined() && alive.get() == pos.storage().unsafeGetStorageImpl();
  }
  void remember(const at::Tensor& pos, int64_t max_pos) {
    storage = pos.storage().getWeakStorageImpl();
    data = pos.data_ptr();
    numel = pos.numel();
    version = pos._version();
    max_position = max_pos;
    dtype = pos.scalar_type();
  }
};

// positions must lie in [0, max_position): checked on the host for CPU tensors (one pass
// over the indices), with one aminmax (and a device sync) for device tensors not checked before.
inline void check_positions_range(const char* op, const at::Tensor& pos, int64_t max_position) {
  if (pos.numel() == 0) return;
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  if (pos.is_cpu()) {
    const int64_t n = pos.numel();
    if (pos.scalar_type() == at::kInt) {
      const int32_t* p = pos.data_ptr<int32_t>();
      for (int64_t i = 0; i < n; ++i) {
        lo = p[i] < lo ? p[i] : lo;
        hi = p[i] > hi ? p[i] : hi;
      }
    } else {
      const int64_t* p = pos.data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) {
        lo = p[i] < lo ? p[i] : lo;
        hi = p[i] > hi ? p[i] : hi;
      }
    }
  } else {
    static thread_local CheckedPositions checked;
    // inference tensors have no version counter (reading it throws): checked every time
    const bool cacheable = pos.is_contiguous() && !pos.is_inference();
    if (cacheable && checked.matches(pos, max_position)) return;
    auto mm = at::aminmax(pos);
    auto both = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kCPU, at::kLong);  // one sync
    lo = both.data_ptr<int64_t>()[0];
    hi = both.data_ptr<int64_t>()[1];
    if (lo >= 0 && hi < max_position && cacheable) checked.remember(pos, max_position);
  }
  TORCH_CHECK_VALUE(lo >= 0 && hi < max_position, "thrifty.", op, ": argument 'positions' must lie in [0, ",
                    max_position, ") (the rows of 'cos_sin_cache'), got values from ", lo, " to ", hi);
}

struct RotaryOut {
  at::Tensor q_out, k_out;
  at::Tensor q_src, k_src, positions, cache;  // kept alive while the kernel runs
};

// Checks (q, k, positions, cos_sin_cache) and fills p (all but the range of positions,
// which the caller checks with check_positions_range on p's positions tensor).
inline RotaryOut rotary_prepare(const char* op, const char* qname, const char* kname, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cache,
                                bool interleaved, bool inverse, RotaryParams& p) {
  check_floating(op, qname, q);
  check_same_dtype(op, kname, k, qname, q);
  check_dtype(op, "positions", positions, {at::kLong, at::kInt});
  check_dtype(op, "cos_sin_cache", cache, {at::kFloat});
  check_same_device(op, kname, k, qname, q);
  check_same_device(op, "positions", positions, qname, q);
  check_same_device(op, "cos_sin_cache", cache, qname, q);
  TORCH_CHECK_VALUE(q.dim() >= 3, "thrifty.", op, ": argument '", qname,
                    "' must be (tokens, heads, head_dim) or (batch, seq, heads, head_dim) (got shape ", q.sizes(), ")");
  TORCH_CHECK_VALUE(k.dim() == q.dim(), "thrifty.", op, ": argument '", kname, "' must have ", q.dim(),
                    " dimensions like '", qname, "' ", q.sizes(), " (got shape ", k.sizes(), ")");
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "thrifty.", op, ": argument '", kname,
                    "' must have the head_dim of '", qname, "' (", q.size(-1), ") in its last dimension (got shape ",
                    k.sizes(), ")");
  auto lead = q.sizes().slice(0, q.dim() - 2);
  TORCH_CHECK_VALUE(k.sizes().slice(0, k.dim() - 2) == lead, "thrifty.", op, ": argument '", kname,
                    "' must have the leading (token) dims of '", qname, "' ", lead, " (got shape ", k.sizes(), ")");
  TORCH_CHECK_VALUE(positions.sizes() == lead, "thrifty.", op, ": argument 'positions' must have shape ", lead,
                    " (the leading dims of '", qname, "', one position per token), got shape ", positions.sizes());
  check_dim(op, "cos_sin_cache", cache, 2);
  const int64_t head_dim = q.size(-1), rot_dim = cache.size(1);
  TORCH_CHECK_VALUE(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_dim, "thrifty.", op,
                    ": argument 'cos_sin_cache' must be (max_position, rotary_dim) with rotary_dim even, > 0 and <= "
                    "head_dim (", head_dim, "), got shape ", cache.sizes());
  TORCH_CHECK_VALUE(cache.size(0) > 0 || positions.numel() == 0, "thrifty.", op,
                    ": argument 'cos_sin_cache' has no rows (shape ", cache.sizes(), ")");

  RotaryOut out;
  out.q_src = as_tokens(q, p.q_tok_stride, p.q_head_stride);
  out.k_src = as_tokens(k, p.k_tok_stride, p.k_head_stride);
  out.positions = positions.contiguous();
  out.cache = cache.contiguous();
  out.q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  out.k_out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t tokens = 1;
  for (auto s : lead) tokens *= s;
  p.tokens = tokens;
  p.q_heads = q.size(-2);
  p.k_heads = k.size(-2);
  p.head_dim = head_dim;
  p.rot_dim = rot_dim;
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.dtype = to_dtype(op, qname, q);
  p.q = out.q_src.data_ptr();
  p.k = out.k_src.data_ptr();
  p.q_out = out.q_out.data_ptr();
  p.k_out = out.k_out.data_ptr();
  p.positions = out.positions.data_ptr();
  p.positions_int32 = positions.scalar_type() == at::kInt;
  p.cos_sin = out.cache.data_ptr<float>();
  p.max_position = cache.size(0);
  return out;
}

}  // namespace thrifty
