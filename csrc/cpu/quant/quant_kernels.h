// Torch-free quantized GEMM kernel cores, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/quant_params.h"

// y = x @ dequant(W).T (+ bias): W8A16 / W4A16. GEMV path for M <= 8, cache-blocked GEMM above.
THRIFTY_DECLARE_CPU_KERNEL(void, quant_linear_fwd, (const ::thrifty::QuantLinearParams& p))
// w = dequant(W) as float32 (N, K): the exact values the kernels multiply by.
THRIFTY_DECLARE_CPU_KERNEL(void, quant_dequantize, (const ::thrifty::DequantParams& p))
// W8A8: y = (xq @ wq.T) * x_scales[:, None] * w_scales[None, :] (+ bias), int32 accumulation.
THRIFTY_DECLARE_CPU_KERNEL(void, int8_linear_fwd, (const ::thrifty::Int8LinearParams& p))
// Dynamic symmetric per-row int8 quantization.
THRIFTY_DECLARE_CPU_KERNEL(void, quantize_per_token_fwd, (const ::thrifty::QuantizePerTokenParams& p))
