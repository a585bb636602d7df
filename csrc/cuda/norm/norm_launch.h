// Torch-free launchers of the RMSNorm CUDA kernels (norm.cu), called by norm_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "common/norm_params.h"

namespace thrifty::cuda {

void launch_rms_norm_fwd(const RmsNormParams& p, cudaStream_t stream);
// Number of row-blocks the backward uses: p.chunks of the float32 grad_weight scratch.
int rms_norm_bwd_blocks(int64_t rows, int num_sms);
// grad_x, and grad_weight partial sums per block, then their reduction into grad_weight (wdtype).
void launch_rms_norm_bwd(const RmsNormBwdParams& p, void* grad_weight, cudaStream_t stream);

}  // namespace thrifty::cuda
