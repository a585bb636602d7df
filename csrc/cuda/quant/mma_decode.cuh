// The shape shared by the decode tensor-core kernels (w4_mma.cuh, w8_mma.cuh, int8_mma.cuh): a block of kWarps
// warps owns 16 weight rows (the mma's A side: rows n0 + g and n0 + g + 8 of lane g = lane / 4) and up to
// 8 MT rows of x (the B side, MT tiles of 8); its warps, and gridDim.y blocks when K is split, take the K
// segments in turn. Each lane ends with MT x 4 values in the mma C layout: (n = g, m = 2t), (g, 2t + 1),
// (g + 8, 2t), (g + 8, 2t + 1) of tile mt, t = lane % 4.
//
// Needs from its includer what the kernels need (see w4_mma.cuh): __syncthreads, __ldcs, uint4, threadIdx,
// blockIdx, gridDim, blockDim.
#pragma once

namespace thrifty::cuda::mmadec {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerBlock = 16;
constexpr int64_t kMaxM = 32;  // 4 m tiles

// This warp's first segment and the distance between its segments (all warps of all K splits in turn).
struct SegmentWalk {
  int first, stride;
};
__device__ __forceinline__ SegmentWalk segment_walk() {
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  return {static_cast<int>(blockIdx.y) * kWarps + warp, kWarps * static_cast<int>(gridDim.y)};
}

// Rows n0 + g and n0 + g + 8 of this lane (rows past N read row N - 1 and store nothing).
struct LaneRows {
  int64_t row[2];
};
__device__ __forceinline__ LaneRows lane_rows(int64_t n0, int64_t N) {
  const int64_t g = static_cast<int64_t>(threadIdx.x & 31) >> 2;
  return {{n0 + g < N ? n0 + g : N - 1, n0 + g + 8 < N ? n0 + g + 8 : N - 1}};
}

// The 16 bytes at q[r] + seg * seg_bytes of both rows, for U segments s0 + u * stride (zeros past nseg),
// streamed (each weight byte is read once).
template <int U>
__device__ __forceinline__ void load_rows16(const int8_t* const (&q)[2], int s0, int stride, int nseg,
                                            int64_t seg_bytes, uint4 (&w)[U][2]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int seg = s0 + u * stride;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      w[u][r] = seg < nseg ? __ldcs(reinterpret_cast<const uint4*>(q[r] + static_cast<int64_t>(seg) * seg_bytes))
                           : uint4{0u, 0u, 0u, 0u};
  }
}

// Sums the block's warps' C-layout values and calls out(m, n, sum) for each output of the block's rows inside
// M x N (A: float or int; sums in warp order).
template <int MT, typename A, typename Out>
__device__ __forceinline__ void block_sum(const A (&v)[MT][4], int64_t n0, int64_t M, int64_t N, Out out) {
  __shared__ A red[kWarps][MT * 4][32];
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  for (int mt = 0; mt < MT; ++mt)
    for (int e = 0; e < 4; ++e) red[warp][mt * 4 + e][lane] = v[mt][e];
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < MT * 4 * 32; i += kThreads) {
    const int k = i >> 5, l = i & 31;  // value k = 4 mt + e of lane l
    A sum = 0;
    for (int wp = 0; wp < kWarps; ++wp) sum += red[wp][k][l];
    const int mt = k >> 2, e = k & 3;
    const int64_t n = n0 + (l >> 2) + (e >= 2 ? 8 : 0), m = 8 * mt + 2 * (l & 3) + (e & 1);
    if (n < N && m < M) out(m, n, sum);
  }
}

// The end of a kernel: y through `finish` (out(m, n, sum)) with one K split, else the split's raw sums into
// partial[blockIdx.y][m][n] for the finish kernel.
template <int MT, typename A, typename Finish>
__device__ __forceinline__ void block_store(const A (&v)[MT][4], int64_t n0, int64_t M, int64_t N, A* partial,
                                            Finish finish) {
  block_sum<MT>(v, n0, M, N, [&](int64_t m, int64_t n, A sum) {
    if (partial == nullptr) finish(m, n, sum);
    else partial[static_cast<int64_t>(blockIdx.y) * M * N + m * N + n] = sum;
  });
}

// The finish kernels' body: output o of the M x N result gets finish(m, n, sum of the splits' partial sums).
template <typename A, typename Finish>
__device__ __forceinline__ void finish_splits(int64_t M, int64_t N, const A* partial, int splits, Finish finish) {
  const int64_t mn = M * N, o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= mn) return;
  A sum = 0;
  for (int sp = 0; sp < splits; ++sp) sum += partial[sp * mn + o];
  finish(o / N, o % N, sum);
}

}  // namespace thrifty::cuda::mmadec
