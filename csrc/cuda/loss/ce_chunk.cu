// Fused softmax cross-entropy over a chunk of logit rows (CUDA): one block per row, three
// sweeps (cap + max + sum z; sum exp; gradient in place), the row staying in L2 between
// them. The math is the CPU kernel's (csrc/cpu/loss/ce_chunk_kernel.cpp):
//   lse = log sum exp z;  loss = (1-eps)(lse - z_y) + eps (lse - mean z)
//   grad_j = scale * (softmax_j - eps/V - (1-eps)[j==y]) * (1 - (z_j/c)^2 if softcap c)
#include "common/loss_params.h"
#include "cuda/common.cuh"
#include "cuda/loss/loss_launch.h"

namespace thrifty::cuda {
namespace {

constexpr int kThreads = 512;

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
__global__ void __launch_bounds__(kThreads) ce_chunk_kernel(CeChunkParams p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x, V = p.vocab;
  T* z = static_cast<T*>(p.logits) + r * p.ld;
  const int64_t y = p.labels[r];
  const bool ignored = y == p.ignore_index;
  const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f, eps = p.label_smoothing;
  float m = -INFINITY, zs = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float v = to_float(z[j]);
    if (cap > 0.f) {
      T c = from_float<T>(cap * tanhf(v * inv_cap));
      z[j] = c;
      v = to_float(c);
    }
    m = fmaxf(m, v);
    zs += v;
  }
  m = block_max(m, scratch);
  zs = block_sum(zs, scratch);
  float se = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) se += __expf(to_float(z[j]) - m);
  se = block_sum(se, scratch);
  const float lse = m + logf(se);
  const float zy = ignored ? 0.f : to_float(z[y]);
  if (threadIdx.x == 0) {
    p.lse[r] = lse;
    p.loss[r] = ignored ? 0.f : (1.f - eps) * (lse - zy) + eps * (lse - zs / static_cast<float>(V));
  }
  if (p.grad_scale == nullptr) return;
  __syncthreads();  // every thread has read z[y] before it is overwritten
  const float s = ignored ? 0.f : p.grad_scale[r * p.grad_scale_stride];
  const float eps_v = eps / static_cast<float>(V);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = to_float(z[j]);
    float d = __expf(v - lse) - eps_v - (j == y ? 1.f - eps : 0.f);
    if (cap > 0.f) d *= 1.f - (v * inv_cap) * (v * inv_cap);
    z[j] = from_float<T>(s * d);
  }
}

}  // namespace

void launch_ce_chunk(const CeChunkParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] {
    ce_chunk_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  });
  check_launch("linear_cross_entropy (ce_chunk)");
}

}  // namespace thrifty::cuda
