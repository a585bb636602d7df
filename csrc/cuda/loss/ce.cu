// Fused softmax cross-entropy kernels (CUDA) for linear_cross_entropy. The math is the CPU
// kernel's (csrc/cpu/loss/ce_kernel.cpp):
//   z = c * tanh(x / c) if softcap c > 0 (float32, recomputed where needed)
//   lse = log sum exp z;  loss = (1-eps)(lse - z_y) + eps (lse - mean z)
//   grad_j = scale * (exp(z_j - lse) - eps/V - (1-eps)[j==y]) * (1 - (z_j/c)^2 if softcap)
// ce_fwd: one block per row, two sweeps (max + sum z; sum exp), the row staying in L2.
// ce_grad: a grid-stride elementwise pass over a (rows x block of columns) tile, in place.
#include "common/loss_params.h"
#include "cuda/common.cuh"
#include "cuda/loss/loss_launch.h"

namespace thrifty::cuda {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float capped(float x, float cap, float inv_cap) {
  return cap > 0.f ? cap * tanhf(x * inv_cap) : x;
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(CeFwdParams p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x, V = p.vocab;
  const T* z = static_cast<const T*>(p.logits) + r * p.ld;
  const int64_t y = p.labels[r];
  const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f, eps = p.label_smoothing;
  float m = -INFINITY, zs = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = capped(to_float(z[j]), cap, inv_cap);
    m = fmaxf(m, v);
    zs += v;
  }
  m = block_max(m, scratch);
  zs = block_sum(zs, scratch);
  float se = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) se += expf(capped(to_float(z[j]), cap, inv_cap) - m);
  se = block_sum(se, scratch);
  if (threadIdx.x == 0) {
    const float lse = m + logf(se);
    p.lse[r] = lse;
    // each term only where its weight is not 0 (an infinite logit: 0 * inf would be NaN), as the CPU kernel
    float loss = 0.f;
    if (y != p.ignore_index) {
      if (eps < 1.f) loss = (1.f - eps) * (lse - capped(to_float(z[y]), cap, inv_cap));
      if (eps > 0.f) loss += eps * (lse - zs / static_cast<float>(V));
    }
    p.loss[r] = loss;
  }
}

template <typename T>
__global__ void ce_grad_kernel(CeGradParams p) {
  const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  const float eps_v = p.label_smoothing / static_cast<float>(p.vocab), on = 1.f - p.label_smoothing;
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, j = i - r * p.cols;
    T* g = static_cast<T*>(p.logits) + r * p.ld + j;
    const int64_t y = p.labels[r];
    const float s = y == p.ignore_index ? 0.f : p.grad_scale[r * p.grad_scale_stride];
    const float v = capped(to_float(*g), cap, inv_cap);
    float d = expf(v - p.lse[r]) - eps_v - (j + p.col0 == y ? on : 0.f);
    if (cap > 0.f) d *= 1.f - (v * inv_cap) * (v * inv_cap);
    *g = from_float<T>(s * d);
  }
}

}  // namespace

void launch_ce_fwd(const CeFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    ce_fwd_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  });
  check_launch("linear_cross_entropy (ce_fwd)");
}

void launch_ce_grad(const CeGradParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.cols;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    ce_grad_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  });
  check_launch("linear_cross_entropy_backward (ce_grad)");
}

}  // namespace thrifty::cuda
