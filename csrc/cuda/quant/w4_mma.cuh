// W4A16 for 1 <= M <= 32 rows of bf16/f16 x on tensor cores (mma.sync m16n8k16, f32 accumulation, sm_80+),
// straight from the format-1 packed weight (N, K/2) bytes: the weights are dequantized in registers and never
// written out (the Marlin idea, without Marlin's offline re-layout).
//
// Swapped operands, as for small batches: D (16 n x 8 m) = W (16 n x 16 k) . X^T (16 k x 8 m), so the weight
// rows fill the 16-row A side and up to 8 x rows the B side (MT = 1, 2 or 4 m tiles of 8 rows).
//
// K is walked in segments of S = 32, 64 or 128 k (the largest of them dividing group_size), one group's s, z
// each. Lane (g = lane / 4, t = lane % 4) copies S / 8 bytes of weight rows n0 + g and n0 + g + 8 at k offset
// t * S / 4 (and the group's scale and zero point) into its lane ring (mma_decode.cuh: cp.async, 5 segments in
// flight per warp): the 4 lanes of a quad cover the segment, and 8 rows x (4 lanes x S/8 bytes) makes every copy
// instruction read whole 32-byte sectors. The k slots of an mma need not be the k order in memory, only the
// same for A and B, so each 32-bit word (8 nibbles, k0..k7 of the lane's range) feeds two mma k steps as it
// lies:  pair j = ((word >> 4j) & 0x000F000F) | magic  is the 16-bit pair (c + k_j, c + k_{j+4}), one shift
// and one LOP3, with c = 128 (bf16 0x4300 | q) or 1024 (f16 0x6400 | q), both exact. Step h (0, 1) of word w
// gives a0/a1 = pair 2h of rows g / g+8 (mma k slots 2t, 2t+1) and a2/a3 = pair 2h+1 (slots 2t+8, 2t+9); its
// B registers are x's matching pairs (x_{2h}, x_{2h+4}) and (x_{2h+1}, x_{2h+5}) of the same 8 k, two byte
// permutes of the 16-byte x load. Both sides agree on the k of each slot, which depends on t only.
//
// Per segment, with xs[m] = sum of x over the segment (quad shuffles) and C = sum (c + q) x from the mma:
//   acc[n, m] += s[n, grp] * (C - (c + z[n, grp]) * xs[m])       (= s * sum (q - z) x; S divides the group)
// The 8 warps of a block split the segments (strided) of the block's 16 rows; a shared-memory sum ends it,
// the bias is added and y rounded once to T. Few rows (N / 16 blocks would leave SMs idle) split K further
// over gridDim.y blocks: each writes its float32 sums to partial[split][m][n] and w4_mma_finish_kernel adds
// them up (in split order), adds the bias and rounds.
//
// This header holds only the kernels (template over T = __nv_bfloat16 / __half, S, MT = m tiles; the block
// shape, reduction, K splits and lane ring of mma_decode.cuh) and needs from its includer: QuantLinearParams,
// uint2/uint4, __ldg, cp_async<B>, cp_async_commit, cp_async_wait<N>, dynamic_smem(), __byte_perm, __shfl_sync,
// __shfl_xor_sync, __syncthreads, threadIdx/blockIdx/gridDim/blockDim, mma16816<T>, from_float<T>, to_float2<T>,
// bias_at, so that a CPU warp emulator can run the same source (tests/cuda_emulated/quant_mma_emulate.cpp).
#pragma once
#include "cuda/quant/mma_decode.cuh"

namespace thrifty::cuda::w4mma {

using mmadec::kRowsPerBlock;
using mmadec::kThreads;
using mmadec::kWarps;

// The 16-bit pair's bit pattern for c + q (q a nibble) and c itself, per x type.
template <bool BF16>
struct Magic;
template <>
struct Magic<true> {
  static constexpr uint32_t bits = 0x43004300u;  // bf16 128: exponent 7, the 7 mantissa bits take q
  static constexpr float offset = 128.0f;
};
template <>
struct Magic<false> {
  static constexpr uint32_t bits = 0x64006400u;  // f16 1024: exponent 10, q in the low mantissa bits
  static constexpr float offset = 1024.0f;
};

__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, int j, uint32_t magic) {
  return ((word >> (4 * j)) & 0x000F000Fu) | magic;
}

// sum += the 8 x values of a 16-byte load (four 16-bit pairs of T).
template <typename T>
__device__ __forceinline__ void add_x8(const uint4& v, float& sum) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2<T>(words[i]);
    sum += f.x + f.y;
  }
}

// NW words (S / 8 bytes) of a packed row at p (the lane ring in shared memory).
template <int NW>
__device__ __forceinline__ void read_words(const unsigned char* p, uint32_t (&w)[NW]) {
  if constexpr (NW == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (NW == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = *reinterpret_cast<const unsigned int*>(p);
  }
}

// The dynamic shared memory w4_mma_kernel<., ., S, .> needs (its lane ring).
template <int S>
constexpr int w4_mma_smem_bytes() {
  return mmadec::LaneRing<S / 8, true>::kBytes;
}

// T: __nv_bfloat16 or __half. S: k per segment (32, 64, 128; divides group_size). MT: 8-row m tiles (M <= 8 MT).
// Needs: qweight 16-byte aligned, x 16-byte aligned with x_stride a multiple of 8 elements (or M == 1), and
// w4_mma_smem_bytes<S>() bytes of dynamic shared memory.
// partial: null with gridDim.y == 1; else (gridDim.y, M, N) float32 sums, finished by w4_mma_finish_kernel.
template <typename T, bool BF16, int S, int MT>
__global__ void __launch_bounds__(kThreads, 2) w4_mma_kernel(QuantLinearParams p, float* partial) {
  constexpr int NW = S / 32;  // packed words per lane, row and segment
  using Ring = mmadec::LaneRing<S / 8, true>;
  constexpr uint32_t magic = Magic<BF16>::bits;
  constexpr float offset = Magic<BF16>::offset;
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  const int64_t K = p.K, N = p.N, n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int M = static_cast<int>(p.M);
  const int nseg = static_cast<int>(K / S);
  const int64_t ng = K / p.group_size;
  const int spg = static_cast<int>(p.group_size / S);  // segments per group
  const mmadec::LaneRows rows = mmadec::lane_rows(n0, N);
  const int64_t(&row)[2] = rows.row;
  const uint8_t* q[2];
  for (int r = 0; r < 2; ++r) q[r] = static_cast<const uint8_t*>(p.qweight) + row[r] * (K / 2) + t * (S / 8);
  const T* x = static_cast<const T*>(p.x);

  float acc[MT][4];
  for (int mt = 0; mt < MT; ++mt)
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.0f;

  const mmadec::WarpSegments segs(mmadec::segment_walk(), nseg);
  // The b-th segment's copies: S / 8 weight bytes of both rows, their group's scale and zero point.
  const auto issue = [&](int b, const Ring& ring) {
    const int seg = segs[b];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      cp_async<S / 8>(ring.weights(b, r), q[r] + static_cast<int64_t>(seg) * (S / 2));
      const int64_t gi = row[r] * ng + seg / spg;
      cp_async<4>(ring.pair(b, r), p.scales + gi);
      cp_async<4>(ring.pair(b, r) + 1, p.zeros + gi);
    }
  };
  const auto compute = [&](int b, const Ring& ring) {
    const int seg = segs[b];
    uint32_t wq[2][NW];
    float sc[2], zz[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      read_words<NW>(ring.weights(b, r), wq[r]);
      sc[r] = ring.pair(b, r)[0];
      zz[r] = offset + ring.pair(b, r)[1];
    }
    // Word by word: x's 8 values at the word's k for each m tile (rows m = 8 mt + g, zeros past M), their
    // sum, and the word's two mma steps.
    float c[MT][4], xsum[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      xsum[mt] = 0.0f;
      for (int e = 0; e < 4; ++e) c[mt][e] = 0.0f;
    }
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      uint4 xv[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = 8 * mt + g;
        const T* xr = x + static_cast<int64_t>(m) * p.x_stride + static_cast<int64_t>(seg) * S + t * (S / 4) + 8 * w;
        xv[mt] = m < M ? __ldg(reinterpret_cast<const uint4*>(xr)) : uint4{0u, 0u, 0u, 0u};
        add_x8<T>(xv[mt], xsum[mt]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {nibble_pair(wq[0][w], 2 * h, magic), nibble_pair(wq[1][w], 2 * h, magic),
                               nibble_pair(wq[0][w], 2 * h + 1, magic), nibble_pair(wq[1][w], 2 * h + 1, magic)};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t lo = h == 0 ? xv[mt].x : xv[mt].y;  // x_{2h}, x_{2h+1}
          const uint32_t hi = h == 0 ? xv[mt].z : xv[mt].w;  // x_{2h+4}, x_{2h+5}
          mma16816<T>(c[mt], a, __byte_perm(lo, hi, 0x5410u), __byte_perm(lo, hi, 0x7632u));
        }
      }
    }
    // xs[m] over the segment (quad sums), moved to the C layout: this lane's outputs are m = 2t, 2t + 1.
    float xa[MT], xb[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float sum = xsum[mt];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);  // lanes of quad g: row m = 8 mt + g
      xa[mt] = __shfl_sync(0xffffffffu, sum, 8 * t);
      xb[mt] = __shfl_sync(0xffffffffu, sum, 8 * t + 4);
    }
    // c: (n = g, m = 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1) of the m tile.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] = fmaf(sc[0], fmaf(-zz[0], xa[mt], c[mt][0]), acc[mt][0]);
      acc[mt][1] = fmaf(sc[0], fmaf(-zz[0], xb[mt], c[mt][1]), acc[mt][1]);
      acc[mt][2] = fmaf(sc[1], fmaf(-zz[1], xa[mt], c[mt][2]), acc[mt][2]);
      acc[mt][3] = fmaf(sc[1], fmaf(-zz[1], xb[mt], c[mt][3]), acc[mt][3]);
    }
  };
  mmadec::stream_segments<S / 8, true>(segs, issue, compute);

  mmadec::block_store<MT>(acc, n0, M, N, partial, [&](int64_t m, int64_t n, float sum) {
    static_cast<T*>(p.y)[m * N + n] = from_float<T>(sum + bias_at(p, n));
  });
}

// y[m, n] = T(sum over the splits of partial[s][m][n] + bias[n]); one thread per output.
template <typename T>
__global__ void __launch_bounds__(256) w4_mma_finish_kernel(QuantLinearParams p, const float* partial, int splits) {
  mmadec::finish_splits(p.M, p.N, partial, splits, [&](int64_t m, int64_t n, float sum) {
    static_cast<T*>(p.y)[m * p.N + n] = from_float<T>(sum + bias_at(p, n));
  });
}

}  // namespace thrifty::cuda::w4mma
