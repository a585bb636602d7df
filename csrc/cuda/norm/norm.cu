// RMSNorm forward and backward on CUDA.
//
// Forward: one block per row; 16-byte vector loads when the row allows it. The row is read
// twice (sum of squares, then scale), the second time from L1/L2, so HBM traffic is one
// read of x (+ residual) and one write of y (+ h).
// Backward: a fixed grid of blocks strides over rows; each block keeps float32 grad_weight
// partial sums for its rows and writes them once; a second kernel sums the blocks' partials in
// block order (deterministic for a given GPU). Rows up to kBwdRegCols * kBwdThreads vectors wide
// (hidden 8192 in bf16) take rms_norm_bwd_reg_kernel: each thread owns fixed columns, so its
// grad_weight sums stay in registers, and the block loads two rows (grad_y and x, kept in
// registers for the second pass) before one reduction for both: 68% of an H200's copy bandwidth at
// 16384 x 4096 bf16 (0.142 ms; each row still waits on its block reduction). Wider rows take
// rms_norm_bwd_kernel, which keeps the partial sums in shared memory (each thread's V
// consecutive floats: bank conflicts) and loads one row at a time: 44% of an H200's copy
// bandwidth at 16384 x 4096 bf16, when that was the only kernel.
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

// One V-vector of a row's backward: gx = g w rstd - x coef + gh (gh may be null), and the
// grad_weight partial sums dw += g x rstd (shared memory or registers: dw is inlined either way).
template <typename T, typename TW, int V>
__device__ __forceinline__ void grad_x_pack(const float (&g)[V], const float (&x)[V], const TW* w, const T* gh,
                                            float rstd, float coef, T* gx, float* dw) {
  float wv[V], e[V], d[V];
  load_pack<TW, V>(w, wv);
  if (gh != nullptr) {
    load_pack<T, V>(gh, e);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    d[j] = g[j] * wv[j] * rstd - x[j] * coef + e[j];
    dw[j] += g[j] * x[j] * rstd;
  }
  store_pack<T, V>(gx, d);
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
      float a[V], b[V];
      load_pack<T, V>(g + i, a);
      load_pack<T, V>(x + i, b);
      grad_x_pack<T, TW, V>(a, b, w + i, gh != nullptr ? gh + i : nullptr, rstd, coef, gx + i, dw + i);
    }
  }
  __syncthreads();
  float* out = p.grad_weight_partial + static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = dw[i];
}

constexpr int kBwdThreads = 256;
constexpr int kBwdRegCols = 4;  // at most this many V-vectors of a row per thread in the register kernel

// Block sums of R values at once (one pair of barriers for all); every thread gets them.
template <int R>
__device__ __forceinline__ void block_sums(float (&x)[R], float (&scratch)[R][32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) x[r] = warp_sum(x[r]);
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) scratch[r][warp] = x[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) x[r] = warp_sum(lane < nwarps ? scratch[r][lane] : 0.0f);
}

// C: V-vectors per thread per row (column i = (threadIdx.x + c * kBwdThreads) * V); R: rows per step.
template <typename T, typename TW, int V, int C, int R>
__global__ void __launch_bounds__(kBwdThreads, 2) rms_norm_bwd_reg_kernel(RmsNormBwdParams p) {
  __shared__ float scratch[R][32];
  const int n = static_cast<int>(p.hidden);
  const TW* w = static_cast<const TW*>(p.weight);
  float dw[C][V];
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int j = 0; j < V; ++j) dw[c][j] = 0.0f;
  // row0 depends on the block only: every thread runs the same steps (block_sums has barriers)
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * R; row0 < p.rows; row0 += static_cast<int64_t>(gridDim.x) * R) {
    float g[R][C][V], x[R][C][V], dot[R], rstd[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // every load of the step issued before any use
      const int64_t row = row0 + r;
      const bool live = row < p.rows;
      rstd[r] = live ? p.rstd[row] : 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int i = (threadIdx.x + c * kBwdThreads) * V;
        if (live && i < n) {
          load_pack<T, V>(static_cast<const T*>(p.grad_y) + row * p.gy_stride + i, g[r][c]);
          load_pack<T, V>(static_cast<const T*>(p.x) + row * p.x_stride + i, x[r][c]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) g[r][c][j] = x[r][c][j] = 0.0f;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      dot[r] = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int i = (threadIdx.x + c * kBwdThreads) * V;
        if (i < n) {
          float wv[V];
          load_pack<TW, V>(w + i, wv);
#pragma unroll
          for (int j = 0; j < V; ++j) dot[r] += g[r][c][j] * wv[j] * x[r][c][j];
        }
      }
    }
    block_sums<R>(dot, scratch);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      if (row >= p.rows) break;
      const float coef = rstd[r] * rstd[r] * rstd[r] * dot[r] / n;
      T* gx = static_cast<T*>(p.grad_x) + row * p.hidden;
      const T* gh = p.grad_h != nullptr ? static_cast<const T*>(p.grad_h) + row * p.gh_stride : nullptr;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int i = (threadIdx.x + c * kBwdThreads) * V;
        if (i < n)
          grad_x_pack<T, TW, V>(g[r][c], x[r][c], w + i, gh != nullptr ? gh + i : nullptr, rstd[r], coef, gx + i, dw[c]);
      }
    }
  }
  float* out = p.grad_weight_partial + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int i = (threadIdx.x + c * kBwdThreads) * V;
    if (i < n) {
#pragma unroll
      for (int j = 0; j < V; ++j) out[i + j] = dw[c][j];
    }
  }
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

// Blocks of `kernel` the grid may use: at most `want` (the rows of the grad_weight scratch) and at most
// what the GPU holds at once. The kernels stride over rows with a fixed grid, so a block that had to
// wait for a second wave would double the time of its rows.
template <typename K>
int resident_blocks(K kernel, int threads, size_t smem, int64_t want) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("thrifty: rms_norm backward occupancy query failed: ") + cudaGetErrorString(err));
  const int64_t cap = static_cast<int64_t>(per_sm < 1 ? 1 : per_sm) * multiprocessors();
  return static_cast<int>(want < cap ? want : cap);
}

template <typename T, typename TW, int V>
int bwd_v(const RmsNormBwdParams& p, cudaStream_t s) {
  const size_t smem = p.hidden * sizeof(float);
  constexpr auto kernel = rms_norm_bwd_kernel<T, TW, V>;
  allow_dynamic_smem<kernel>(static_cast<int>(smem), "rms_norm backward");  // before the occupancy query
  const int threads = threads_for(p.hidden, V);
  const int blocks = resident_blocks(kernel, threads, smem, p.chunks);
  kernel<<<static_cast<unsigned>(blocks), threads, smem, s>>>(p);
  return blocks;
}

template <typename T, typename TW, int V, int C, int R>
int bwd_reg_launch(const RmsNormBwdParams& p, cudaStream_t s) {
  auto kernel = rms_norm_bwd_reg_kernel<T, TW, V, C, R>;
  const int blocks = resident_blocks(kernel, kBwdThreads, 0, p.chunks);
  kernel<<<static_cast<unsigned>(blocks), kBwdThreads, 0, s>>>(p);
  return blocks;
}

// The register kernel for V-wide vectors: C vectors per thread cover the row (R = 2 rows per step while
// the registers allow). Returns the blocks launched, 0 when the row is wider than kBwdRegCols vectors
// per thread.
template <typename T, typename TW, int V>
int bwd_reg(const RmsNormBwdParams& p, cudaStream_t s) {
  const int64_t per_thread = (p.hidden + int64_t{kBwdThreads} * V - 1) / (int64_t{kBwdThreads} * V);
  if (per_thread <= 1) return bwd_reg_launch<T, TW, V, 1, 2>(p, s);
  if (per_thread <= 2) return bwd_reg_launch<T, TW, V, 2, 2>(p, s);
  if (per_thread <= kBwdRegCols) return bwd_reg_launch<T, TW, V, kBwdRegCols, 1>(p, s);
  return 0;
}

template <typename T, typename TW>
void bwd(const RmsNormBwdParams& p, void* grad_weight, cudaStream_t s) {
  int v = pick_vec<T, TW>(p, {{p.grad_y, p.gy_stride}, {p.x, p.x_stride}, {p.grad_h, p.gh_stride}, {p.grad_x, p.hidden}});
  // 16- and 8-byte vectors take the register kernel when the row fits it; the rest the shared-memory one
  constexpr int v16 = 16 / sizeof(T), v8 = 8 / sizeof(T);
  int blocks = v == v16 ? bwd_reg<T, TW, v16>(p, s) : (v == v8 ? bwd_reg<T, TW, v8>(p, s) : 0);
  if (blocks == 0) {
    switch (v) {
      case 8: blocks = bwd_v<T, TW, 8>(p, s); break;
      case 4: blocks = bwd_v<T, TW, 4>(p, s); break;
      case 2: blocks = bwd_v<T, TW, 2>(p, s); break;
      default: blocks = bwd_v<T, TW, 1>(p, s); break;
    }
  }
  check_launch("rms_norm backward");
  const int n = static_cast<int>(p.hidden);
  reduce_columns_kernel<TW><<<(n + 255) / 256, 256, 0, s>>>(p.grad_weight_partial, blocks, n,
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
  // Up to 4 blocks per SM (the launchers take fewer when fewer fit at once): the register kernel has
  // 2 rows x 2 tensors x 16 bytes per thread in flight per step. The shared-memory kernel (wider rows)
  // measured 43% of an H200's copy bandwidth at 4 blocks per SM, 46% at 2, at 16384 x 4096 bf16.
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
