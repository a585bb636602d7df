// Torch-free launchers of the CUDA FlashAttention-2 kernels (csrc/cuda/attention/), called by
// attention_cuda.cpp. Inputs must satisfy: dtype bf16 or f16; head_dim % 8 == 0 and <= 256;
// every row/head/batch stride a multiple of 8 elements and every base pointer 16-byte aligned
// (the glue makes such copies when needed). head_dim is padded up to the kernel size 64, 96,
// 128 or 256 inside the kernel (zero-filled loads), so any multiple of 8 up to 256 works.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/attention_params.h"

namespace thrifty::cuda {

// Kernel head dim used for head_dim (64, 96, 128, 256), or 0 if head_dim is unsupported.
int flash_kernel_head_dim(int head_dim);
// Whether this build compiled the kernels for (dtype, head_dim) (THRIFTY_FAST_BUILD keeps only
// bf16 with kernel head dims 64 and 128).
bool flash_attention_compiled(DType dtype, int head_dim);

void launch_flash_attention_fwd(const AttentionParams& p, cudaStream_t stream);
// Bytes of p.workspace the backward needs: Dsum = rowsum(dO * O) per row, plus the float32 dQ
// accumulator when the atomic dQ path is selected (THRIFTY_ATTN_ATOMIC_DQ=1 and not
// p.deterministic). Uses batch, heads, seqlen_q (max_seqlen_q in varlen), head_dim, deterministic.
size_t flash_attention_bwd_workspace_bytes(const AttentionBwdParams& p);
// dq, dk, dv must not alias the inputs; p.workspace must hold flash_attention_bwd_workspace_bytes(p).
void launch_flash_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
