// RMSNorm forward and backward on CUDA.
//
// Forward: one block per row; 16-byte vector loads when the row allows it. The row is read
// twice (sum of squares, then scale), the second time from L1/L2, so HBM traffic is one
// read of x (+ residual) and one write of y (+ h).
// Backward: a fixed grid of blocks strides over rows; each block keeps float32 grad_weight
// partial sums for its rows (in registers when a row is one vector per thread, else in shared
// memory) and writes them once; a second kernel sums the blocks' partials in block order
// (deterministic for a given GPU).
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

// The backward when a row fits the block as one vector per thread (hidden <= 1024 * V): each thread
// owns columns [V*tid, V*tid + V) for every row, so the weight and the grad_weight sums live in
// registers, the row's grad_y and x are read once (no second pass), and the next row's loads are issued
// before this row's block reduction so HBM latency overlaps the barriers.
template <typename T, typename TW, int V>
__global__ void rms_norm_bwd_reg_kernel(RmsNormBwdParams p) {
  __shared__ float scratch[32];
  const int n = static_cast<int>(p.hidden);
  const int i = threadIdx.x * V;
  const bool active = i < n;
  float w[V], dwr[V], a[V], b[V], e[V];
#pragma unroll
  for (int j = 0; j < V; ++j) w[j] = dwr[j] = a[j] = b[j] = e[j] = 0.0f;
  if (active) load_pack<TW, V>(static_cast<const TW*>(p.weight) + i, w);
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* xx = static_cast<const T*>(p.x);
  const T* gh = static_cast<const T*>(p.grad_h);
  int64_t row = blockIdx.x;
  float rstd = 0.0f;
  if (row < p.rows) {
    rstd = p.rstd[row];
    if (active) {
      load_pack<T, V>(gy + row * p.gy_stride + i, a);
      load_pack<T, V>(xx + row * p.x_stride + i, b);
      if (gh != nullptr) load_pack<T, V>(gh + row * p.gh_stride + i, e);
    }
  }
  for (; row < p.rows; row += gridDim.x) {
    const int64_t next = row + gridDim.x;
    float an[V], bn[V], en[V], rstd_n = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) an[j] = bn[j] = en[j] = 0.0f;
    if (next < p.rows) {
      rstd_n = p.rstd[next];
      if (active) {
        load_pack<T, V>(gy + next * p.gy_stride + i, an);
        load_pack<T, V>(xx + next * p.x_stride + i, bn);
        if (gh != nullptr) load_pack<T, V>(gh + next * p.gh_stride + i, en);
      }
    }
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) dot += a[j] * w[j] * b[j];
    dot = block_sum(dot, scratch);  // every thread of the block takes part (inactive ones add 0)
    const float coef = rstd * rstd * rstd * dot / n;
    if (active) {
      float d[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        d[j] = a[j] * w[j] * rstd - b[j] * coef + e[j];
        dwr[j] += a[j] * b[j] * rstd;
      }
      store_pack<T, V>(static_cast<T*>(p.grad_x) + row * p.hidden + i, d);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      a[j] = an[j];
      b[j] = bn[j];
      e[j] = en[j];
    }
    rstd = rstd_n;
  }
  if (active) {
    float* out = p.grad_weight_partial + static_cast<int64_t>(blockIdx.x) * n + i;
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = dwr[j];
  }
}

template <typename TW>
__global__ void reduce_columns_kernel(const float* partial, int chunks, int n, TW* out) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  // four independent sums keep four loads in flight (a fixed order: still deterministic)
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int c = 0;
  for (; c + 4 <= chunks; c += 4) {
    s0 += partial[static_cast<int64_t>(c) * n + col];
    s1 += partial[static_cast<int64_t>(c + 1) * n + col];
    s2 += partial[static_cast<int64_t>(c + 2) * n + col];
    s3 += partial[static_cast<int64_t>(c + 3) * n + col];
  }
  for (; c < chunks; ++c) s0 += partial[static_cast<int64_t>(c) * n + col];
  out[col] = from_float<TW>((s0 + s1) + (s2 + s3));
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
  if (p.hidden <= 1024LL * V) {  // one vector per thread: the register kernel
    rms_norm_bwd_reg_kernel<T, TW, V><<<static_cast<unsigned>(p.chunks), threads_for(p.hidden, V), 0, s>>>(p);
    return;
  }
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
  // 4 blocks per SM (2048 threads at hidden 4096 bf16): 2 left the backward latency-bound at 46% of
  // an H200's copy bandwidth (each row's two block reductions stall the block).
  int64_t b = rows < 4LL * num_sms ? rows : 4LL * num_sms;
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
