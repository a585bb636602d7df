// Torch-free launchers of the fused cross-entropy kernels (ce.cu), called by loss_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "common/loss_params.h"

namespace thrifty::cuda {

void launch_ce_fwd(const CeFwdParams& p, cudaStream_t stream);
void launch_ce_grad(const CeGradParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
