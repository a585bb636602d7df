// Fused multi-tensor optimizer steps on CUDA (the multi_tensor_apply idea).
//
// One launch covers every tensor: block b owns chunk b of the concatenated chunk list and finds its
// tensor by binary search in the chunk prefix sums (a small device buffer built by the glue). lr,
// the grad coefficient and found_inf are read on the device, so a step never syncs with the host
// and a changing lr never recompiles anything. AdamW / Lion stream each element once with 16-byte
// accesses for float32 state (4 elements per thread per iteration); 8-bit AdamW gives one warp to
// each 256-element block (absmax by warp shuffles, code maps and the requantization's bucket tables in
// shared memory; the tables are rebuilt from the maps by a small kernel before each step).
#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/optim/optim_launch.h"
#include "cuda/optim/qlut.cuh"

namespace thrifty::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kThreads8 = 256;
constexpr int V = 4;
static_assert(kOptim8bitLutBytes == 2 * kQLutSize && kOptim8bitChunk % kQuantBlock == 0, "8-bit workspace / chunk");

__host__ __device__ __forceinline__ bool aligned_to(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

struct Consts {
  float lr, coef, decay, b1, b2, omb1, omb2, eps, step_size, inv_bc2;
};

template <OptimKind K, typename P, bool kMaster>
__device__ __forceinline__ void update_one(const Consts& c, float& p, float g, float& m, float& v) {
  g *= c.coef;
  if constexpr (K == OptimKind::lion) {
    const float u = fmaf(c.omb1, g - m, m);
    p = p * c.decay - c.lr * (u > 0.0f ? 1.0f : (u < 0.0f ? -1.0f : 0.0f));
    m = fmaf(c.omb2, g - m, m);
  } else {
    p = p * c.decay;
    m = fmaf(c.omb1, g - m, m);
    v = fmaf(c.omb2 * g, g, v * c.b2);  // (1 - b2) g first, as torch: g * g overflows from |g| ~ 1.8e19
    const float denom = fmaf(sqrtf(v), c.inv_bc2, c.eps);
    p = p - c.step_size * (m / denom);
  }
}

// Reads lr / coef / the tensor's step once per block.
__device__ __forceinline__ Consts block_consts(const OptimStepParams& s, const OptimTensor& t) {
  __shared__ float sh[2];
  Consts c;
  c.lr = *s.lr_ptr;
  c.coef = s.grad_coef_ptr != nullptr ? *s.grad_coef_ptr : 1.0f;
  c.decay = 1.0f - c.lr * s.weight_decay;
  c.b1 = s.beta1;
  c.b2 = s.beta2;
  c.omb1 = s.one_minus_beta1;
  c.omb2 = s.one_minus_beta2;
  c.eps = s.eps;
  c.step_size = c.lr;
  c.inv_bc2 = 1.0f;
  if (t.step != nullptr) {
    if (threadIdx.x == 0) {
      const double st = static_cast<double>(*t.step) + 1.0;
      sh[0] = static_cast<float>(1.0 - pow(s.beta1_exact, st));
      sh[1] = static_cast<float>(sqrt(1.0 - pow(s.beta2_exact, st)));
    }
    __syncthreads();
    c.step_size = c.lr / sh[0];
    c.inv_bc2 = 1.0f / sh[1];
  }
  return c;
}

template <OptimKind K, typename P, bool kMaster>
__global__ void __launch_bounds__(kThreads) optim_step_kernel(OptimStepParams s) {
  if (s.found_inf_ptr != nullptr && *s.found_inf_ptr != 0.0f) return;
  const int64_t chunk = blockIdx.x;
  const int64_t ti = optim_find_tensor(s.chunk_offsets, s.num_tensors, chunk);
  const OptimTensor t = s.tensors[ti];
  const int64_t begin = (chunk - s.chunk_offsets[ti]) * s.chunk_size;
  const int64_t end = min(begin + s.chunk_size, t.n);
  const Consts c = block_consts(s, t);
  P* p = static_cast<P*>(t.param);
  const P* g = static_cast<const P*>(t.grad);
  float* m = static_cast<float*>(t.exp_avg);
  float* v = static_cast<float*>(t.exp_avg_sq);
  float* w = t.master;
  constexpr bool kHasV = K != OptimKind::lion;
  const bool vec = aligned_to(p, sizeof(P) * V) && aligned_to(g, sizeof(P) * V) && aligned_to(m, 16) &&
                   (!kHasV || aligned_to(v, 16)) && (!kMaster || aligned_to(w, 16));
  int64_t i0 = begin;
  if (vec) {
    const int64_t end4 = begin + ((end - begin) / V) * V;
    for (int64_t i = begin + threadIdx.x * V; i < end4; i += static_cast<int64_t>(blockDim.x) * V) {
      float pv[V], gv[V], mv[V], vv[V];
      if constexpr (kMaster) load_pack<float, V>(w + i, pv); else load_pack<P, V>(p + i, pv);
      load_pack<P, V>(g + i, gv);
      load_pack<float, V>(m + i, mv);
      if constexpr (kHasV) load_pack<float, V>(v + i, vv);
#pragma unroll
      for (int j = 0; j < V; ++j) update_one<K, P, kMaster>(c, pv[j], gv[j], mv[j], vv[j]);
      store_pack<float, V>(m + i, mv);
      if constexpr (kHasV) store_pack<float, V>(v + i, vv);
      if constexpr (kMaster) store_pack<float, V>(w + i, pv);
      store_pack<P, V>(p + i, pv);
    }
    i0 = end4;
  }
  for (int64_t i = i0 + threadIdx.x; i < end; i += blockDim.x) {
    float pv = kMaster ? w[i] : to_float(p[i]);
    float mv = m[i], vv = kHasV ? v[i] : 0.0f;
    update_one<K, P, kMaster>(c, pv, to_float(g[i]), mv, vv);
    m[i] = mv;
    if constexpr (kHasV) v[i] = vv;
    if constexpr (kMaster) w[i] = pv;
    p[i] = from_float<P>(pv);
  }
}

// The two maps' 255 midpoints (and +inf) in shared memory, as both kernels below compute them; a map starting
// at 0 (unsigned: v's) has mid[0] = 0, so a positive v never rounds to 0 (common/optim_quant.h's rule).
__device__ __forceinline__ void load_mids(const float* q, float* mids) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    mids[i] = i == 0 && q[0] == 0.0f ? 0.0f : i < 255 ? (q[i] + q[i + 1]) * 0.5f : INFINITY;
}

// lut[map * kQLutSize + b] = quantize_nearest(mids of map, floor of bucket b) (qlut.cuh), map 0: m, 1: v.
// grid (kQLutSize / 256, 2), 256 threads.
__global__ void __launch_bounds__(256) build_qlut_kernel(const float* qmap_m, const float* qmap_v, uint8_t* lut) {
  __shared__ float mids[256];
  load_mids(blockIdx.y == 0 ? qmap_m : qmap_v, mids);
  __syncthreads();
  const uint32_t b = blockIdx.x * blockDim.x + threadIdx.x;
  lut[blockIdx.y * kQLutSize + b] = static_cast<uint8_t>(quantize_nearest(mids, qlut_bucket_floor(b)));
}

// 8-bit AdamW: one warp per 256-element quantization block; lane l owns elements l + 32 k. The codes are
// found with the bucket tables of s.qlut (copied to shared memory per block) and a short walk (qlut.cuh).
template <typename P, bool kMaster>
__global__ void __launch_bounds__(kThreads8) adamw8bit_kernel(OptimStepParams s) {
  __shared__ float qm[256], qv[256], mid_m[256], mid_v[256];
  __shared__ uint4 lut[2 * kQLutSize / 16];
  if (s.found_inf_ptr != nullptr && *s.found_inf_ptr != 0.0f) return;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    qm[i] = s.qmap_m[i];
    qv[i] = s.qmap_v[i];
  }
  load_mids(s.qmap_m, mid_m);
  load_mids(s.qmap_v, mid_v);
  for (int i = threadIdx.x; i < 2 * kQLutSize / 16; i += blockDim.x)
    lut[i] = __ldg(reinterpret_cast<const uint4*>(s.qlut) + i);
  const uint8_t* lut_m = reinterpret_cast<const uint8_t*>(lut);
  const uint8_t* lut_v = lut_m + kQLutSize;
  const int64_t chunk = blockIdx.x;
  const int64_t ti = optim_find_tensor(s.chunk_offsets, s.num_tensors, chunk);
  const OptimTensor t = s.tensors[ti];
  const int64_t begin = (chunk - s.chunk_offsets[ti]) * s.chunk_size;
  const int64_t end = min(begin + s.chunk_size, t.n);
  const Consts c = block_consts(s, t);  // syncs the block: qm / qv are ready too
  __syncthreads();
  P* p = static_cast<P*>(t.param);
  const P* g = static_cast<const P*>(t.grad);
  uint8_t* cm = static_cast<uint8_t*>(t.exp_avg);
  uint8_t* cv = static_cast<uint8_t*>(t.exp_avg_sq);
  float* w = t.master;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  constexpr int E = kQuantBlock / 32;
  for (int64_t b0 = begin + static_cast<int64_t>(warp) * kQuantBlock; b0 < end;
       b0 += static_cast<int64_t>(nwarps) * kQuantBlock) {
    const int64_t blk = b0 / kQuantBlock;
    const float am = t.absmax_m[blk], av = t.absmax_v[blk];
    float mv[E], vv[E];
    float mmax = 0.0f, vmax = 0.0f;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int64_t i = b0 + lane + 32 * k;
      mv[k] = 0.0f;
      vv[k] = 0.0f;
      if (i < end) {
        mv[k] = qm[cm[i]] * am;
        vv[k] = qv[cv[i]] * av;
        float pv = kMaster ? w[i] : to_float(p[i]);
        update_one<OptimKind::adamw8bit, P, kMaster>(c, pv, to_float(g[i]), mv[k], vv[k]);
        if constexpr (kMaster) w[i] = pv;
        p[i] = from_float<P>(pv);
        mmax = fmaxf(mmax, fabsf(mv[k]));
        vmax = fmaxf(vmax, vv[k]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      mmax = fmaxf(mmax, __shfl_xor_sync(0xffffffffu, mmax, o));
      vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, o));
    }
    if (lane == 0) {
      t.absmax_m[blk] = mmax;
      t.absmax_v[blk] = vmax;
    }
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int64_t i = b0 + lane + 32 * k;
      if (i < end) {
        cm[i] = static_cast<uint8_t>(quantize_lut(lut_m, mid_m, mmax > 0.0f ? mv[k] / mmax : 0.0f));
        cv[i] = static_cast<uint8_t>(quantize_lut(lut_v, mid_v, vmax > 0.0f ? vv[k] / vmax : 0.0f));
      }
    }
  }
}

__global__ void increment_steps_kernel(float* const* steps, int64_t n, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) *steps[i] += 1.0f;
}

template <typename T>
__device__ __forceinline__ float sumsq_chunk(const T* x, int64_t begin, int64_t end) {
  float acc = 0.0f;
  if (aligned_to(x, sizeof(T) * V)) {
    const int64_t end4 = begin + ((end - begin) / V) * V;
    for (int64_t i = begin + threadIdx.x * V; i < end4; i += static_cast<int64_t>(blockDim.x) * V) {
      float a[V];
      load_pack<T, V>(x + i, a);
#pragma unroll
      for (int j = 0; j < V; ++j) acc = fmaf(a[j], a[j], acc);
    }
    begin = end4;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float a = to_float(x[i]);
    acc = fmaf(a, a, acc);
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads) l2norm_partial_kernel(L2NormParams p) {
  __shared__ float scratch[32];
  const int64_t chunk = blockIdx.x;
  const int64_t ti = optim_find_tensor(p.chunk_offsets, p.num_tensors, chunk);
  const OptimTensor t = p.tensors[ti];
  const int64_t begin = (chunk - p.chunk_offsets[ti]) * p.chunk_size;
  const int64_t end = min(begin + p.chunk_size, t.n);
  float acc;
  switch (t.dtype) {
    case DType::bf16: acc = sumsq_chunk(static_cast<const __nv_bfloat16*>(t.grad), begin, end); break;
    case DType::f16: acc = sumsq_chunk(static_cast<const __half*>(t.grad), begin, end); break;
    default: acc = sumsq_chunk(static_cast<const float*>(t.grad), begin, end); break;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) p.partial[chunk] = acc;
}

__global__ void __launch_bounds__(1024) l2norm_final_kernel(const float* partial, int64_t n, float* out) {
  __shared__ float scratch[32];
  float acc = 0.0f;  // fixed assignment of partials to threads and a fixed tree: deterministic
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *out = sqrtf(acc);
}

template <OptimKind K, typename P>
void launch_kind(const OptimStepParams& p, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.total_chunks);
  if constexpr (K == OptimKind::adamw8bit) {
    if (p.qlut == nullptr || !aligned_to(p.qlut, 16))
      throw std::logic_error("thrifty: the 8-bit step needs OptimStepParams::qlut, 16-byte aligned workspace");
    build_qlut_kernel<<<dim3(kQLutSize / 256, 2), 256, 0, stream>>>(p.qmap_m, p.qmap_v, p.qlut);
    if (p.has_master) adamw8bit_kernel<P, true><<<grid, kThreads8, 0, stream>>>(p);
    else adamw8bit_kernel<P, false><<<grid, kThreads8, 0, stream>>>(p);
  } else {
    if (p.has_master) optim_step_kernel<K, P, true><<<grid, kThreads, 0, stream>>>(p);
    else optim_step_kernel<K, P, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <OptimKind K>
void launch_dtype(const OptimStepParams& p, cudaStream_t stream) {
  switch (p.pdtype) {
    case DType::bf16: return launch_kind<K, __nv_bfloat16>(p, stream);
    case DType::f16: return launch_kind<K, __half>(p, stream);
    default: return launch_kind<K, float>(p, stream);
  }
}

}  // namespace

void launch_optim_step(const OptimStepParams& p, float* const* steps, int64_t num_steps, cudaStream_t stream) {
  if (p.total_chunks > 0) {
    switch (p.kind) {
      case OptimKind::adamw: launch_dtype<OptimKind::adamw>(p, stream); break;
      case OptimKind::adamw8bit: launch_dtype<OptimKind::adamw8bit>(p, stream); break;
      default: launch_dtype<OptimKind::lion>(p, stream); break;
    }
    check_launch("optim_step");
  }
  if (num_steps > 0) {
    const int threads = 256;
    increment_steps_kernel<<<static_cast<unsigned>((num_steps + threads - 1) / threads), threads, 0, stream>>>(
        steps, num_steps, p.found_inf_ptr);
    check_launch("optim_step (step counts)");
  }
}

void launch_l2norm(const L2NormParams& p, float* out, cudaStream_t stream) {
  if (p.total_chunks > 0) {
    l2norm_partial_kernel<<<static_cast<unsigned>(p.total_chunks), kThreads, 0, stream>>>(p);
    check_launch("multi_tensor_l2norm");
  }
  l2norm_final_kernel<<<1, 1024, 0, stream>>>(p.partial, p.total_chunks, out);
  check_launch("multi_tensor_l2norm (final)");
}

}  // namespace thrifty::cuda
