// Torch-free element types shared by the kernel cores (CPU and CUDA) and the glue.
// bf16 and f16 are raw 16-bit storage types here: the kernels convert them to float
// to compute (see csrc/cpu/vec.h) and never do arithmetic on them directly.
#pragma once
#include <cstdint>

namespace thrifty {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

}  // namespace thrifty
