// Argument checks for the ATen glue. Every message names the op, the argument, what
// was expected and what came, e.g.
//   thrifty.rms_norm: argument 'weight' must have dtype Float, BFloat16 or Half (got Long)
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

#include <initializer_list>
#include <string>

namespace thrifty {

inline std::string dtypes_str(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  size_t i = 0;
  for (auto d : dtypes) {
    if (i > 0) s += (i + 1 == dtypes.size()) ? " or " : ", ";
    s += c10::toString(d);
    ++i;
  }
  return s;
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes)
    if (t.scalar_type() == d) return;
  TORCH_CHECK_TYPE(false, "thrifty.", op, ": argument '", arg, "' must have dtype ", dtypes_str(dtypes),
                   " (got ", t.scalar_type(), ")");
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  check_dtype(op, arg, t, {at::kFloat, at::kBFloat16, at::kHalf});
}

inline void check_same_dtype(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "thrifty.", op, ": argument '", arg,
                   "' must have the same dtype as '", ref_arg, "' (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "thrifty.", op, ": argument '", arg, "' must be on the same device as '",
              ref_arg, "' (", ref.device(), "), got ", t.device());
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "thrifty.", op, ": argument '", arg, "' must be ", dim, "-D (got shape ",
                    t.sizes(), ")");
}

inline void check_min_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() >= dim, "thrifty.", op, ": argument '", arg, "' must have at least ", dim,
                    " dimension(s) (got shape ", t.sizes(), ")");
}

inline void check_same_shape(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                             const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "thrifty.", op, ": argument '", arg, "' must have the same shape as '",
                    ref_arg, "' ", ref.sizes(), " (got ", t.sizes(), ")");
}

inline void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "thrifty.", op, ": argument '", arg, "' must have size ", expected,
                    " in dimension ", dim, " (", what, "), got shape ", t.sizes());
}

// Rows of t (..., K): the product of its leading dims (not numel / K, which is 0 / 0 when K = 0).
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

inline void check_last_dim_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, "thrifty.", op, ": argument '", arg,
                    "' must be contiguous in its last dimension (got strides ", t.strides(), ")");
}

inline void check_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "thrifty.", op, ": argument '", arg, "' must be contiguous (got shape ",
                    t.sizes(), ", strides ", t.strides(), ")");
}

inline void check_device_type(const char* op, const char* arg, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, "thrifty.", op, ": argument '", arg, "' must be a ", c10::DeviceTypeName(type),
              " tensor (got ", t.device(), ")");
}

inline DType to_dtype(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "thrifty.", op, ": argument '", arg, "' must have dtype Float, BFloat16 or Half (got ",
                   t.scalar_type(), ")");
}

}  // namespace thrifty
