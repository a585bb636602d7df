// Torch-free launchers of the quantized linear CUDA kernels (quant_linear.cu, int8_linear.cu),
// called by quant_cuda.cpp. Formats: common/quant_params.h.
#pragma once
#include <cuda_runtime_api.h>

#include "common/quant_params.h"

namespace thrifty::cuda {

// W4A16 / W8A16: GEMV (one warp per output row, packed weights streamed once with 16-byte loads and
// dequantized in registers) for M <= 8; a shared-memory tiled GEMM above.
void launch_quant_linear(const QuantLinearParams& p, cudaStream_t stream);
void launch_quant_dequantize(const DequantParams& p, cudaStream_t stream);
// W8A8: tiled int8 GEMM with __dp4a int32 accumulation.
void launch_int8_linear(const Int8LinearParams& p, cudaStream_t stream);
void launch_quantize_per_token(const QuantizePerTokenParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
