// Torch-free RMSNorm kernel cores, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/norm_params.h"

THRIFTY_DECLARE_CPU_KERNEL(void, rms_norm_fwd, (const ::thrifty::RmsNormParams& p))
THRIFTY_DECLARE_CPU_KERNEL(void, rms_norm_bwd, (const ::thrifty::RmsNormBwdParams& p))
// grad_weight[j] = sum over chunks of partial[c][j], written in wdtype.
THRIFTY_DECLARE_CPU_KERNEL(void, rms_norm_reduce_grad_weight,
                           (const float* partial, int64_t chunks, int64_t n, ::thrifty::DType wdtype, void* out))
