// Torch-free launcher of the rotary-embedding CUDA kernels (rotary.cu), called by rotary_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "common/rotary_params.h"

namespace thrifty::cuda {

// Positions must already be checked to lie in [0, p.max_position).
void launch_rotary_embedding(const RotaryParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
