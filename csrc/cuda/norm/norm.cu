// RMSNorm forward and backward on CUDA.
//
// Forward: one block per row; 16-byte vector loads when the row allows it. The row is read
// twice (sum of squares, then scale), the second time from L1/L2, so HBM traffic is one
// read of x (+ residual) and one write of y (+ h).
// Backward: a fixed grid of blocks strides over rows; each block keeps float32 grad_weight
// partial sums for its rows in shared memory and writes them once; a second kernel sums
// the blocks' partials in block order (deterministic for a given GPU).
#include "cuda/common.cuh"
#include "cuda/norm/norm_launch.h"

namespace thrifty::cuda {
namespace {

template <typename T, typename TW, int V>
__global__ void rms_norm_fwd_kernel(RmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int n = static_cast<int>(p.hidden);
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const TW* w = static_cast<const TW*>(p.weight);
  T* y = static_cast<T*>(p.y) + row * p.hidden;
  const T* src = x;
  float ss = 0.0f;
  if (p.residual != nullptr) {
    const T* r = static_cast<const T*>(p.residual) + row * p.r_stride;
    T* h = static_cast<T*>(p.h) + row * p.hidden;
    for (int i = threadIdx.x * V; i < n; i += blockDim.x * V) {
      float a[V], b[V];
      load_pack<T, V>(x + i, a);
      load_pack<T, V>(r + i, b);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        a[j] = to_float(from_float<T>(a[j] + b[j]));  // the rounded h is what the norm sees
        ss += a[j] * a[j];
      }
      store_pack<T, V>(h + i, a);
    }
    src = h;  // each thread re-reads only the elements it wrote: no barrier needed
  } else {
    // Two vectors per step, both loads issued before the math: one 16-byte load in flight per thread
    // left an H200 at 75% of its copy bandwidth.
    const int step = blockDim.x * V;
    int i = threadIdx.x * V;
    for (; i + step < n; i += 2 * step) {
      float a[V], b[V];
      load_pack<T, V>(x + i, a);
      load_pack<T, V>(x + i + step, b);
#pragma unroll
      for (int j = 0; j < V; ++j) ss += a[j] * a[j] + b[j] * b[j];
    }
    if (i < n) {
      float a[V];
      load_pack<T, V>(x + i, a);
#pragma unroll
      for (int j = 0; j < V; ++j) ss += a[j] * a[j];
    }
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / n + p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rstd;
  for (int i = threadIdx.x * V; i < n; i += blockDim.x * V) {
    float a[V], g[V];
    load_pack<T, V>(src + i, a);
    load_pack<TW, V>(w + i, g);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = a[j] * rstd * g[j];
    store_pack<T, V>(y + i, a);
  }
}

template <typename T, typename TW, int V>
__global__ void rms_norm_bwd_kernel(RmsNormBwdParams p) {
  extern __shared__ float dw[];  // (hidden,) this block's grad_weight partial sums
  __shared__ float scratch[32];
  const int n = static_cast<int>(p.hidden);
  const TW* w = static_cast<const TW*>(p.weight);
  for (int i = threadIdx.x; i < n; i += blockDim.x) dw[i] = 0.0f;
  // each thread touches the same columns of dw in every row: no barrier needed until the end
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* g = static_cast<const T*>(p.grad_y) + row * p.gy_stride;
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const float rstd = p.rstd[row];
    float dot = 0.0f;
    for (int i = threadIdx.x * V; i < n; i += blockDim.x * V) {
      float a[V], b[V], c[V];
      load_pack<T, V>(g + i, a);
      load_pack<T, V>(x + i, b);
      load_pack<TW, V>(w + i, c);
#pragma unroll
      for (int j = 0; j < V; ++j) dot += a[j] * c[j] * b[j];
    }
    dot = block_sum(dot, scratch);
    const float coef = rstd * rstd * rstd * dot / n;
    T* gx = static_cast<T*>(p.grad_x) + row * p.hidden;
    const T* gh = p.grad_h != nullptr ? static_cast<const T*>(p.grad_h) + row * p.gh_stride : nullptr;
    for (int i = threadIdx.x * V; i < n; i += blockDim.x * V) {
      float a[V], b[V], c[V], d[V], e[V];
      load_pack<T, V>(g + i, a);
      load_pack<T, V>(x + i, b);
      load_pack<TW, V>(w + i, c);
      if (gh != nullptr) {
        load_pack<T, V>(gh + i, e);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) e[j] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        d[j] = a[j] * c[j] * rstd - b[j] * coef + e[j];
        dw[i + j] += a[j] * b[j] * rstd;
      }
      store_pack<T, V>(gx + i, d);
    }
  }
  __syncthreads();
  float* out = p.grad_weight_partial + static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = dw[i];
}

template <typename TW>
__global__ void reduce_columns_kernel(const float* partial, int chunks, int n, TW* out) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.0f;
  for (int c = 0; c < chunks; ++c) s += partial[static_cast<int64_t>(c) * n + col];
  out[col] = from_float<TW>(s);
}

// Widest vector (16 bytes of T) that every row start and the hidden size allow.
template <typename T, typename TW, typename P>
int pick_vec(const P& p, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  int v = 16 / sizeof(T);
  while (v > 1) {
    bool ok = p.hidden % v == 0 && reinterpret_cast<uintptr_t>(p.weight) % (sizeof(TW) * v) == 0;
    for (auto& r : rows)
      if (r.first != nullptr && (reinterpret_cast<uintptr_t>(r.first) % (sizeof(T) * v) != 0 || r.second % v != 0))
        ok = false;
    if (ok) break;
    v /= 2;
  }
  return v;
}

int threads_for(int64_t hidden, int v) {
  int t = static_cast<int>((hidden / v + 31) / 32 * 32);
  return t < 32 ? 32 : (t > 1024 ? 1024 : t);
}

template <typename T, typename TW>
void fwd(const RmsNormParams& p, cudaStream_t s) {
  int v = pick_vec<T, TW>(p, {{p.x, p.x_stride}, {p.residual, p.r_stride}, {p.y, p.hidden}, {p.h, p.hidden}});
  // two vectors per thread (the unrolled sum of squares above): half the threads, twice the blocks per SM
  dim3 grid(static_cast<unsigned>(p.rows)), block(threads_for(p.hidden, 2 * v));
  switch (v) {
    case 8: rms_norm_fwd_kernel<T, TW, 8><<<grid, block, 0, s>>>(p); break;
    case 4: rms_norm_fwd_kernel<T, TW, 4><<<grid, block, 0, s>>>(p); break;
    case 2: rms_norm_fwd_kernel<T, TW, 2><<<grid, block, 0, s>>>(p); break;
    default: rms_norm_fwd_kernel<T, TW, 1><<<grid, block, 0, s>>>(p); break;
  }
  check_launch("rms_norm forward");
}

template <typename T, typename TW, int V>
void bwd_v(const RmsNormBwdParams& p, cudaStream_t s) {
  const size_t smem = p.hidden * sizeof(float);
  auto kernel = rms_norm_bwd_kernel<T, TW, V>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  kernel<<<static_cast<unsigned>(p.chunks), threads_for(p.hidden, V), smem, s>>>(p);
}

template <typename T, typename TW>
void bwd(const RmsNormBwdParams& p, void* grad_weight, cudaStream_t s) {
  int v = pick_vec<T, TW>(p, {{p.grad_y, p.gy_stride}, {p.x, p.x_stride}, {p.grad_h, p.gh_stride}, {p.grad_x, p.hidden}});
  switch (v) {
    case 8: bwd_v<T, TW, 8>(p, s); break;
    case 4: bwd_v<T, TW, 4>(p, s); break;
    case 2: bwd_v<T, TW, 2>(p, s); break;
    default: bwd_v<T, TW, 1>(p, s); break;
  }
  check_launch("rms_norm backward");
  const int n = static_cast<int>(p.hidden);
  reduce_columns_kernel<TW><<<(n + 255) / 256, 256, 0, s>>>(p.grad_weight_partial, static_cast<int>(p.chunks), n,
                                                           static_cast<TW*>(grad_weight));
  check_launch("rms_norm backward (grad_weight reduction)");
}

}  // namespace

void launch_rms_norm_fwd(const RmsNormParams& p, cudaStream_t s) {
  if (p.wdtype == DType::f32 && p.dtype != DType::f32) {
    if (p.dtype == DType::bf16) return fwd<__nv_bfloat16, float>(p, s);
    return fwd<__half, float>(p, s);
  }
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] { fwd<T, T>(p, s); });
}

int rms_norm_bwd_blocks(int64_t rows, int num_sms) {
  // 2 blocks per SM. The backward is latency-bound (each row's two block reductions stall the block):
  // 46% of an H200's copy bandwidth at 16384 x 4096 bf16; 4 blocks per SM measured 43%.
  int64_t b = rows < 2LL * num_sms ? rows : 2LL * num_sms;
  return static_cast<int>(b < 1 ? 1 : b);
}

void launch_rms_norm_bwd(const RmsNormBwdParams& p, void* grad_weight, cudaStream_t s) {
  if (p.wdtype == DType::f32 && p.dtype != DType::f32) {
    if (p.dtype == DType::bf16) return bwd<__nv_bfloat16, float>(p, grad_weight, s);
    return bwd<__half, float>(p, grad_weight, s);
  }
  THRIFTY_CUDA_DTYPE_SWITCH(p.dtype, T, [&] { bwd<T, T>(p, grad_weight, s); });
}

}  // namespace thrifty::cuda
