// Torch-free launchers of the fused optimizer CUDA kernels (optim.cu), called by optim_cuda.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "common/optim_params.h"

namespace thrifty::cuda {

// Elements per chunk (one thread block each): AdamW / Lion, and 8-bit (a multiple of kQuantBlock).
constexpr int64_t kOptimChunk = 1 << 16;
constexpr int64_t kOptim8bitChunk = 1 << 16;  // large enough that the 32 KB table copy per block stays ~3% of its traffic
// Device workspace of the 8-bit step (OptimStepParams::qlut): the two maps' bucket tables (qlut.cuh).
constexpr int64_t kOptim8bitLutBytes = 2 << 14;

// One launch over every chunk of p.tensors (a device table, like p.chunk_offsets); lr, grad_coef and
// found_inf are read on the device. Then, unless *found_inf != 0, *steps[i] += 1 for i < num_steps
// (steps: a device array of pointers; none for Lion).
void launch_optim_step(const OptimStepParams& p, float* const* steps, int64_t num_steps, cudaStream_t stream);
// Sums of squares per chunk into p.partial, then sqrt(sum in fixed order) into *out.
void launch_l2norm(const L2NormParams& p, float* out, cudaStream_t stream);

}  // namespace thrifty::cuda
