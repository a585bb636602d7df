// Torch-free launchers of the quantized linear CUDA kernels (quant_linear.cu, int8_linear.cu),
// called by quant_cuda.cpp. Formats: common/quant_params.h.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "common/quant_params.h"

namespace thrifty::cuda {

// W4A16 / W8A16 with M <= kGemvMaxM rows run the GEMV kernels of quant_linear.cu; above, the glue
// dequantizes the weight into a temporary and calls cuBLAS (quant_cuda.cpp). 8, not 16: on an H200
// (K = N = 8192) the 16-row GEMV bucket took 0.275 ms, the dequantize + cuBLAS path 0.19 ms at M = 256.
constexpr int64_t kGemvMaxM = 8;
// W8A8 with K % 8 == 0 and N % 8 == 0 goes to at::_int_mm (cuBLASLt int8 tensor cores, whose CUDA path
// needs M > kInt8MmMinM: fewer rows are zero-padded); the __dp4a kernel takes the other shapes.
constexpr int64_t kInt8MmMinM = 16;

// W4A16 / W8A16 with bf16/f16 x and 1 <= M <= 32 on tensor cores (w4_mma.cuh, w8_mma.cuh): taken first where
// quant_mma_fits (switched on, 16-bit x, 16-byte aligned qweight and x rows; bits 8: K % 64 == 0), before the
// GEMV and cuBLAS paths. quant_mma_splits: how many blocks split K (1 for most shapes; more when N / 16 blocks
// would leave multiprocessors idle); with splits > 1, launch_quant_mma needs partial: splits * M * N float32
// of device workspace.
bool quant_mma_fits(const QuantLinearParams& p);
int quant_mma_splits(const QuantLinearParams& p);
void launch_quant_mma(const QuantLinearParams& p, int splits, float* partial, cudaStream_t stream);
// The switch of the decode mma kernels (these and int8_mma below): on unless THRIFTY_CUDA_QUANT_MMA=off;
// set_quant_mma("on" | "off") returns the previous mode and throws std::invalid_argument for other names.
bool parse_quant_mma_mode(const std::string& mode);
bool quant_mma_enabled();
std::string set_quant_mma(const std::string& mode);

// W4A16 / W8A16 GEMV for 1 <= M <= kGemvMaxM: warps stream R packed weight rows once with 16-byte
// loads, x comes in 16-byte vectors; a scalar-load kernel takes the shapes the vector one cannot.
void launch_quant_linear(const QuantLinearParams& p, cudaStream_t stream);
// The float32 (N, K) weight of quant_dequantize.
void launch_quant_dequantize(const DequantParams& p, cudaStream_t stream);

// Dequantizes a bits=4 weight into a dense (N, ldw) matrix of `dtype` for the cuBLAS path:
//   split == false: w[n, k] = (q - z) * s rounded once to dtype (use with dtype f32: exact);
//   split == true (bf16 / f16): w[n, k] = hi, w[n, K + k] = lo with hi = dtype(v), lo = dtype(v - hi),
//     v = (q - z) * s in float32, so hi + lo keeps ~16 (bf16) / ~22 (f16) bits of v; ldw = 2K.
struct DequantToParams {
  int64_t K = 0, N = 0, group_size = 128;
  const uint8_t* qweight = nullptr;  // (N, K/2), 16-byte aligned
  const float* scales = nullptr;     // (N, K/G)
  const float* zeros = nullptr;      // (N, K/G)
  DType dtype = DType::f32;
  bool split = false;
  void* w = nullptr;                 // (N, ldw), 16-byte aligned
  int64_t ldw = 0;                   // K or 2K (split)
};
void launch_dequantize4_to(const DequantToParams& p, cudaStream_t stream);
// The weight side of a DequantToParams (shapes, codes, scales, zeros) from QuantLinearParams or
// DequantParams; the caller sets the destination (dtype, split, w, ldw).
template <typename P>
DequantToParams dequant4_from(const P& p) {
  DequantToParams d;
  d.K = p.K;
  d.N = p.N;
  d.group_size = p.group_size;
  d.qweight = static_cast<const uint8_t*>(p.qweight);
  d.scales = p.scales;
  d.zeros = p.zeros;
  return d;
}

// y[m, n] = acc[m, n] * row_scale[m] * col_scale[n] + bias[n] (each factor optional, applied in that order
// in float32), rounded once to out_dtype. acc: (M, N) contiguous float32 or int32.
struct EpilogueParams {
  int64_t M = 0, N = 0;
  const void* acc = nullptr;
  bool acc_int32 = false;
  const float* row_scale = nullptr;  // (M,) or null
  const float* col_scale = nullptr;  // (N,) or null
  const void* bias = nullptr;        // (N,) or null
  DType bias_dtype = DType::f32;
  void* y = nullptr;                 // (M, N) contiguous
  DType out_dtype = DType::f32;
};
void launch_scale_bias_epilogue(const EpilogueParams& p, cudaStream_t stream);

// W8A8 with 1 <= M <= 32 on int8 tensor cores (int8_mma.cuh): taken first where int8_mma_fits (the same switch,
// K % 64 == 0, 16-byte aligned xq and wq); splits and workspace (int32) as for the W4 kernel.
bool int8_mma_fits(const Int8LinearParams& p);
int int8_mma_splits(const Int8LinearParams& p);
void launch_int8_mma(const Int8LinearParams& p, int splits, int* partial, cudaStream_t stream);

// K splits for the decode mma kernels: blocks (grid x), segments along K, warps per block (quant_linear.cu).
int mma_k_splits(int64_t blocks, int64_t nseg, int warps);

// W8A8: tiled int8 GEMM with __dp4a int32 accumulation (the shapes at::_int_mm does not take).
void launch_int8_linear(const Int8LinearParams& p, cudaStream_t stream);
void launch_quantize_per_token(const QuantizePerTokenParams& p, cudaStream_t stream);

}  // namespace thrifty::cuda
