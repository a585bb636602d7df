// W8A8 for 1 <= M <= 32 rows (decode) on int8 tensor cores (mma.sync m16n8k32, s8 x s8 -> s32, sm_80+),
// straight from the (N, K) int8 weight and the (M, K) int8 x, instead of at::_int_mm on zero-padded rows.
//
// As in w4_mma.cuh the weight rows are the 16-row A operand and x rows the 8-column B operand. K is walked in
// segments of 64: lane (g = lane / 4, t = lane % 4) copies 16 bytes of weight rows n0 + g and n0 + g + 8 into
// its lane ring (mma_decode.cuh) and loads 16 of x row m = 8 mt + g, all at k = 64 seg + 16 t. In mma step j
// (0, 1) words 2j and 2j + 1 of those are a0 / a2 (row g), a1 / a3 (row g + 8) and b0 / b1 as they lie: both
// operands put k = 64 seg + 16 t + 8 j + i in k slot 4t + i and 64 seg + 16 t + 8 j + 4 + i in slot 16 + 4t + i
// (i < 4), so no byte moves at all.
// int32 sums are exact, so the 8 warps of a block (strided segments) and the K splits (gridDim.y blocks, as in
// w4_mma.cuh: partial int32 sums, int8_mma_finish_kernel) add up in any order; the epilogue is the one of
// scale_bias_epilogue_kernel: y[m, n] = float(acc) * x_scales[m] * w_scales[n] (+ bias[n]), rounded once.
//
// Block shape, reduction and K splits: mma_decode.cuh. Needs from its includer (like w4_mma.cuh, so that
// tests/cuda_emulated/int8_mma_emulate.cpp runs this source):
// Int8LinearParams, uint4, __ldg, __syncthreads, cp_async<B>, cp_async_commit, cp_async_wait<N>, dynamic_smem(),
// threadIdx/blockIdx/gridDim/blockDim, mma16832_s8, load_any / store_any (bias and output element access by DType).
#pragma once
#include "cuda/quant/mma_decode.cuh"

namespace thrifty::cuda::i8mma {

using mmadec::kRowsPerBlock;
using mmadec::kThreads;
constexpr int64_t kSeg = 64;  // k per segment (4 lanes x 16 bytes)

__device__ __forceinline__ float int8_epilogue(const Int8LinearParams& p, int64_t m, int64_t n, int acc) {
  float v = static_cast<float>(acc) * p.x_scales[m] * p.w_scales[n];
  if (p.bias != nullptr) v += load_any(p.bias, n, p.bias_dtype);
  return v;
}

// The dynamic shared memory int8_mma_kernel needs (its lane ring: 16 bytes per row and segment).
constexpr int int8_mma_smem_bytes() { return mmadec::LaneRing<16, false>::kBytes; }

// MT: 8-row m tiles (M <= 8 MT). partial: null with gridDim.y == 1; else (gridDim.y, M, N) int32 sums.
// Needs K % 64 == 0, 16-byte aligned xq and wq (rows then start on 16-byte boundaries) and
// int8_mma_smem_bytes() bytes of dynamic shared memory.
template <int MT>
__global__ void __launch_bounds__(kThreads, 2) int8_mma_kernel(Int8LinearParams p, int* partial) {
  using Ring = mmadec::LaneRing<16, false>;
  const int t = static_cast<int>(threadIdx.x) & 3, g = (static_cast<int>(threadIdx.x) & 31) >> 2;
  const int64_t K = p.K, N = p.N, n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int M = static_cast<int>(p.M);
  const int nseg = static_cast<int>(K / kSeg);
  const mmadec::LaneRows rows = mmadec::lane_rows(n0, N);
  const int8_t* const q[2] = {p.wq + rows.row[0] * K + 16 * t, p.wq + rows.row[1] * K + 16 * t};

  int acc[MT][4];
  for (int mt = 0; mt < MT; ++mt)
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0;

  const mmadec::WarpSegments segs(mmadec::segment_walk(), nseg);
  const auto issue = [&](int b, const Ring& ring) {  // the b-th segment's 16 weight bytes of both rows
#pragma unroll
    for (int r = 0; r < 2; ++r) cp_async<16>(ring.weights(b, r), q[r] + static_cast<int64_t>(segs[b]) * kSeg);
  };
  const auto compute = [&](int b, const Ring& ring) {
    const int seg = segs[b];
    const uint4 w0 = *reinterpret_cast<const uint4*>(ring.weights(b, 0));
    const uint4 w1 = *reinterpret_cast<const uint4*>(ring.weights(b, 1));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = 8 * mt + g;
      const uint4 xv = m < M ? __ldg(reinterpret_cast<const uint4*>(p.xq + static_cast<int64_t>(m) * K +
                                                                    static_cast<int64_t>(seg) * kSeg + 16 * t))
                             : uint4{0u, 0u, 0u, 0u};
      const uint32_t a0[4] = {w0.x, w1.x, w0.y, w1.y};  // step 0: words 0, 1
      mma16832_s8(acc[mt], a0, xv.x, xv.y);
      const uint32_t a1[4] = {w0.z, w1.z, w0.w, w1.w};  // step 1: words 2, 3
      mma16832_s8(acc[mt], a1, xv.z, xv.w);
    }
  };
  mmadec::stream_segments<16, false>(segs, issue, compute);
  mmadec::block_store<MT>(acc, n0, M, N, partial, [&](int64_t m, int64_t n, int sum) {
    store_any(p.y, m * N + n, int8_epilogue(p, m, n, sum), p.out_dtype);
  });
}

// y from the splits' int32 sums; one thread per output.
__global__ void __launch_bounds__(256) int8_mma_finish_kernel(Int8LinearParams p, const int* partial, int splits) {
  mmadec::finish_splits(p.M, p.N, partial, splits, [&](int64_t m, int64_t n, int sum) {
    store_any(p.y, m * p.N + n, int8_epilogue(p, m, n, sum), p.out_dtype);
  });
}

}  // namespace thrifty::cuda::i8mma
