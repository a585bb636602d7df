// Weight codes to exact floats without conversion instructions, shared by the GEMV (quant_linear.cu) and the
// W8 tensor-core kernel (w8_mma.cuh). Needs __byte_perm and __uint_as_float from its includer (CUDA, or the
// CPU warp emulator of tests/cuda_emulated/).
#pragma once
#include <cstdint>

namespace thrifty::cuda {

// 2^23 + (byte b of word) as a float: the byte lands in the low mantissa bits of 0x4B000000.
// byte_perm picks result bytes from {word: 0..3, 0x4B000000: 4..7}: [b, 4 (0x00), 4 (0x00), 7 (0x4B)].
__device__ __forceinline__ float magic_byte(uint32_t word, int b) {
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7440u | static_cast<uint32_t>(b)));
}
constexpr float kMagic = 8388608.0f;  // 2^23

}  // namespace thrifty::cuda
