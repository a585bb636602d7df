// CUDA glue for the quantized linear ops: check, fill params, launch on the current stream.
// Decode-size M (<= 32) runs thrifty's tensor-core kernels (W4A16 / W8A16 with bf16/f16 x: w4_mma.cuh,
// w8_mma.cuh; W8A8: int8_mma.cuh) where they fit, else its GEMV kernels (M <= 8); larger M dequantizes the weight once per
// call and hands the GEMM to cuBLAS through ATen (at::mm / at::_int_mm), with a thrifty epilogue for
// scales and bias.
#include "cuda/guard.h"
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/quant_glue.h"
#include "common/torch_compat.h"
#include "cuda/quant/quant_launch.h"

namespace thrifty {
namespace {

cuda::EpilogueParams epilogue_for(const at::Tensor& acc, const at::Tensor& y, int64_t M, int64_t N, DType out_dtype,
                                  const void* bias, DType bias_dtype) {
  cuda::EpilogueParams e;
  e.M = M;
  e.N = N;
  e.acc = acc.data_ptr();
  e.acc_int32 = acc.scalar_type() == at::kInt;
  e.bias = bias;
  e.bias_dtype = bias_dtype;
  e.y = y.data_ptr();
  e.out_dtype = out_dtype;
  return e;
}

// quant_linear for M > kGemvMaxM: y = x @ w.T (+ bias) with the GEMM in cuBLAS, float32 accumulation and a
// float32 result that the epilogue rounds once to x's dtype (after the bits=8 scale and the bias), as the GEMV does.
// The weight is dequantized once per call into a temporary that lives until the call returns:
//   bits 8: the int8 codes converted exactly to x's dtype, N*K*sizeof(x) bytes (2 for bf16/f16); scales[n]
//           multiply the float32 result in the epilogue;
//   bits 4, float32 x: w = (q - z) * s in float32, N*K*4 bytes, float32 GEMM (TF32 only if the user enabled it);
//   bits 4, bf16/f16 x: w split into hi = dtype(w) and lo = dtype(w - hi), stored side by side as an (N, 2K)
//           matrix (N*K*4 bytes) and multiplied with [x, x] (M*2K*2 bytes): one tensor-core GEMM, twice the
//           flops, keeps ~16 bits of each float32 weight (one bf16 rounding of w would lose to the float32
//           reference by more than the output rounding). f16: |w| must stay below 65504.
// Without at::mm's out_dtype (torch < 2.8) everything runs as float32 GEMMs.
at::Tensor quant_linear_large_m(const QuantLinearPrep& r, const QuantLinearParams& p, const at::Tensor& qweight) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType xdt = r.x2.scalar_type();
  const bool f32 = xdt == at::kFloat || !THRIFTY_HAVE_MM_OUT_DTYPE;
  at::Tensor acc;
  const float* col_scale = nullptr;
  if (p.bits == 8) {
    col_scale = p.scales;
    if (f32) {
      acc = at::mm(r.x2.to(at::kFloat), qweight.to(at::kFloat).t());
    } else {
#if THRIFTY_HAVE_MM_OUT_DTYPE
      acc = at::mm(r.x2, qweight.to(xdt).t(), at::kFloat);
#endif
    }
  } else {
    cuda::DequantToParams d = cuda::dequant4_from(p);
    at::Tensor w;
    if (f32) {
      w = at::empty({p.N, p.K}, r.x2.options().dtype(at::kFloat));
      d.dtype = DType::f32;
      d.split = false;
      d.ldw = p.K;
    } else {
      w = at::empty({p.N, 2 * p.K}, r.x2.options());
      d.dtype = p.dtype;
      d.split = true;
      d.ldw = 2 * p.K;
    }
    d.w = w.data_ptr();
    cuda::launch_dequantize4_to(d, stream);
    if (f32) {
      acc = at::mm(r.x2.to(at::kFloat), w.t());
    } else {
#if THRIFTY_HAVE_MM_OUT_DTYPE
      acc = at::mm(at::cat({r.x2, r.x2}, 1), w.t(), at::kFloat);
#endif
    }
  }
  TORCH_INTERNAL_ASSERT(acc.defined() && acc.scalar_type() == at::kFloat && acc.size(0) == p.M && acc.size(1) == p.N);
  acc = acc.contiguous();
  auto e = epilogue_for(acc, r.y, p.M, p.N, p.dtype, p.bias, p.bias_dtype);
  e.col_scale = col_scale;
  cuda::launch_scale_bias_epilogue(e, stream);
  return r.y;
}

at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             const c10::optional<at::Tensor>& bias) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  QuantLinearParams p;
  auto r = quant_linear_prepare("quant_linear", x, qweight, scales, zeros, bits, group_size, bias, p);
  TORCH_CHECK_VALUE(bits != 4 || (reinterpret_cast<uintptr_t>(qweight.data_ptr()) & 15) == 0,
                    "thrifty.quant_linear: argument 'qweight' must be 16-byte aligned on CUDA (clone it)");
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  if (cuda::quant_mma_fits(p)) {
    const int splits = cuda::quant_mma_splits(p);
    at::Tensor partial;  // the K splits' float32 sums, when there are several
    if (splits > 1) partial = at::empty({splits, p.M, p.N}, r.y.options().dtype(at::kFloat));
    cuda::launch_quant_mma(p, splits, splits > 1 ? partial.data_ptr<float>() : nullptr,
                        c10::cuda::getCurrentCUDAStream());
    return r.y;
  }
  if (p.M > cuda::kGemvMaxM) return quant_linear_large_m(r, p, qweight);
  cuda::launch_quant_linear(p, c10::cuda::getCurrentCUDAStream());
  return r.y;
}

at::Tensor quant_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(qweight));
  int64_t K = -1;
  const int64_t N = check_packed_weight("quant_dequantize", qweight, scales, zeros, bits, group_size, K);
  auto s = scales.contiguous();
  at::Tensor z;
  auto w = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  DequantParams p;
  p.K = K;
  p.N = N;
  p.bits = static_cast<int>(bits);
  p.group_size = bits == 4 ? group_size : K;
  p.qweight = qweight.data_ptr();
  p.scales = s.data_ptr<float>();
  if (bits == 4) {
    z = zeros->contiguous();
    p.zeros = z.data_ptr<float>();
  }
  p.w = w.data_ptr<float>();
  if (N > 0 && K > 0) cuda::launch_quant_dequantize(p, c10::cuda::getCurrentCUDAStream());
  return w;
}

at::Tensor int8_linear_cuda(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& wq,
                            const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias,
                            c10::optional<at::ScalarType> out_dtype) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(xq));
  Int8LinearParams p;
  auto r = int8_linear_prepare("int8_linear", xq, x_scales, wq, w_scales, bias, out_dtype, p);
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (cuda::int8_mma_fits(p)) {  // decode-size M: int8 tensor cores straight from the weight (int8_mma.cuh)
    const int splits = cuda::int8_mma_splits(p);
    at::Tensor partial;  // the K splits' int32 sums, when there are several
    if (splits > 1) partial = at::empty({splits, p.M, p.N}, r.y.options().dtype(at::kInt));
    cuda::launch_int8_mma(p, splits, splits > 1 ? partial.data_ptr<int>() : nullptr, stream);
    return r.y;
  }
  if (p.K % 8 == 0 && p.N % 8 == 0) {
    // cuBLASLt int8 tensor cores (exact int32 sums, like __dp4a); at::_int_mm's CUDA path wants M > 16 and
    // K, N multiples of 8. Fewer rows (decode) are padded with zero rows to 2 * kInt8MmMinM: the GEMM
    // still streams the int8 weight once, where the __dp4a tiles took 20x cuBLAS bf16's time at M = 16
    // on an H200. The epilogue applies x_scales[m] * w_scales[n] (+ bias) as the __dp4a kernel does.
    at::Tensor x8 = r.xq2;
    if (p.M <= cuda::kInt8MmMinM) {
      x8 = at::zeros({2 * cuda::kInt8MmMinM, p.K}, r.xq2.options());
      x8.narrow(0, 0, p.M).copy_(r.xq2);
    }
    const at::Tensor acc = at::_int_mm(x8, r.wq.t()).narrow(0, 0, p.M).contiguous();
    auto e = epilogue_for(acc, r.y, p.M, p.N, p.out_dtype, p.bias, p.bias_dtype);
    e.row_scale = p.x_scales;
    e.col_scale = p.w_scales;
    cuda::launch_scale_bias_epilogue(e, stream);
    return r.y;
  }
  cuda::launch_int8_linear(p, stream);
  return r.y;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  const c10::cuda::OptionalCUDAGuard guard(cuda::cuda_device_of(x));
  QuantizePerTokenParams p;
  auto r = quantize_per_token_prepare("quantize_per_token", x, p);
  if (p.rows > 0) {
    if (p.K == 0) r.scales.zero_();
    else cuda::launch_quantize_per_token(p, c10::cuda::getCurrentCUDAStream());
  }
  return {r.xq, r.scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CUDA, m) {
  m.impl("quant_linear", &quant_linear_cuda);
  m.impl("quant_dequantize", &quant_dequantize_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("quantize_per_token", &quantize_per_token_cuda);
}

}  // namespace thrifty
