// Torch-free launcher of the fused cross-entropy chunk kernel (ce_chunk.cu), called by loss_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "common/loss_params.h"

namespace thrifty::cuda {

void launch_ce_chunk(const CeChunkParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
