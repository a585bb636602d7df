// The shape shared by the decode tensor-core kernels (w4_mma.cuh, w8_mma.cuh, int8_mma.cuh): a block of kWarps
// warps owns 16 weight rows (the mma's A side: rows n0 + g and n0 + g + 8 of lane g = lane / 4) and up to
// 8 MT rows of x (the B side, MT tiles of 8); its warps, and gridDim.y blocks when K is split, take the K
// segments in turn. Each lane ends with MT x 4 values in the mma C layout: (n = g, m = 2t), (g, 2t + 1),
// (g + 8, 2t), (g + 8, 2t + 1) of tile mt, t = lane % 4.
//
// The weight bytes stream through a per-lane ring in shared memory (LaneRing below): cp.async keeps kStages - 1
// of a warp's segments in flight while it computes on one, which registers alone could not hold.
//
// Needs from its includer what the kernels need (see w4_mma.cuh): __syncthreads, uint4, threadIdx,
// blockIdx, gridDim, blockDim, cp_async<B>, cp_async_commit, cp_async_wait<N>, dynamic_smem() (the block's
// dynamic shared memory, 16-byte aligned).
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

// A warp's segments in its walk order: the b-th is first + b * stride; count of them below nseg.
struct WarpSegments {
  int first, stride, count;
  __device__ __forceinline__ WarpSegments(SegmentWalk w, int nseg)
      : first(w.first), stride(w.stride), count(w.first < nseg ? (nseg - w.first + w.stride - 1) / w.stride : 0) {}
  __device__ __forceinline__ int operator[](int b) const { return first + b * stride; }
};

// kStages slots per lane in shared memory, one segment each: its weight bytes (WB per row, the lane's two
// rows) and, with SZ, a float pair per row (W4's scale and zero point). Each lane copies, and later reads
// back, only its own bytes, so cp.async.wait_group alone orders copy and read (no barrier). Layout
// [slot][row][thread] (weights, then pairs): a warp's reads of a slot are contiguous.
// Size: 6 x 256 x (2 WB + 16) = 72 KiB for W4 with 128-k segments (16 bytes), 48 KiB for W8; with the
// block_sum array (up to 16 KiB) it fits the 99 KiB a block may have on sm_86 / sm_89.
template <int WB, bool SZ>
struct LaneRing {
  static constexpr int kStages = 6;  // 5 segments in flight per warp while one is computed
  static constexpr int kWeightBytes = kStages * 2 * kThreads * WB;
  static constexpr int kBytes = kWeightBytes + (SZ ? kStages * 2 * kThreads * 8 : 0);
  unsigned char* base;
  __device__ __forceinline__ int index(int b, int r) const {
    return (b % kStages * 2 + r) * kThreads + static_cast<int>(threadIdx.x);
  }
  __device__ __forceinline__ unsigned char* weights(int b, int r) const { return base + index(b, r) * WB; }
  __device__ __forceinline__ float* pair(int b, int r) const {
    return reinterpret_cast<float*>(base + kWeightBytes + index(b, r) * 8);
  }
};

// The copy / compute pipeline over a warp's segments: issue(b, ring) starts the copies of its b-th segment,
// compute(b, ring) runs on it once they have landed. One commit group per segment (empty ones past the
// last keep the count), so wait_group<kStages - 1> after issuing segment b + kStages - 1 means b is in.
template <int WB, bool SZ, typename Issue, typename Compute>
__device__ __forceinline__ void stream_segments(const WarpSegments& segs, Issue issue, Compute compute) {
  using Ring = LaneRing<WB, SZ>;
  const Ring ring{dynamic_smem()};
  for (int b = 0; b < Ring::kStages - 1; ++b) {
    if (b < segs.count) issue(b, ring);
    cp_async_commit();
  }
  for (int b = 0; b < segs.count; ++b) {
    if (b + Ring::kStages - 1 < segs.count) issue(b + Ring::kStages - 1, ring);
    cp_async_commit();
    cp_async_wait<Ring::kStages - 1>();
    compute(b, ring);
  }
}

// Rows n0 + g and n0 + g + 8 of this lane (rows past N read row N - 1 and store nothing).
struct LaneRows {
  int64_t row[2];
};
__device__ __forceinline__ LaneRows lane_rows(int64_t n0, int64_t N) {
  const int64_t g = static_cast<int64_t>(threadIdx.x & 31) >> 2;
  return {{n0 + g < N ? n0 + g : N - 1, n0 + g + 8 < N ? n0 + g + 8 : N - 1}};
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
