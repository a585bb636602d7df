// Torch-free launchers of the SwiGLU CUDA kernels (swiglu.cu), called by activation_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "common/activation_params.h"

namespace thrifty::cuda {

void launch_swiglu_fwd(const SwigluParams& p, cudaStream_t stream);
void launch_swiglu_bwd(const SwigluParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
