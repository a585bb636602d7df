// W8A16 for 1 <= M <= 32 rows of bf16/f16 x on tensor cores (mma.sync m16n8k16, f32 accumulation, sm_80+),
// straight from the (N, K) int8 weight: the companion of w4_mma.cuh (same operand roles, warps, K splits and
// workspace) for bits 8, whose per-channel scale leaves no groups inside K.
//
// K is walked in segments of 64: lane (g = lane / 4, t = lane % 4) copies 16 bytes of weight rows n0 + g and
// n0 + g + 8 at k = 64 seg + 16 t into its lane ring (mma_decode.cuh) and loads x row m = 8 mt + g's 16 values
// there (two 16-byte loads). Word w of the weight bytes (k0..k3 of the lane's 4 k) is mma step w: a0 / a1 = the
// 16-bit pair (k0, k1) of rows g / g + 8 (k slots 2t, 2t+1), a2 / a3 = (k2, k3) (slots 2t+8, 2t+9); B = x's pairs
// (x0, x1), (x2, x3) as they lie.
// Each byte becomes the exact 16-bit value of u = q + 128 (0..255):
//   f16:  0x6400 | u = 1024 + u, one byte permute per pair (offset c = 1024);
//   bf16: u goes through float32 (the byte in the mantissa of 2^23, minus 2^23) and a paired round to bf16,
//         exact because u has at most 8 significant bits (offset c = 0, then 128 for the sign flip).
// So C = sum (c + 128 + q) x and acc = C - (c + 128) * sum x over the warp's own segments; the warps' sums
// (and K splits, as in w4_mma.cuh) are added, then y = s[n] * acc + bias, rounded once to T.
//
// Block shape, reduction and K splits: mma_decode.cuh. Needs from its includer (see w4_mma.cuh):
// QuantLinearParams, uint4, __ldg, cp_async<B>, cp_async_commit, cp_async_wait<N>, dynamic_smem(), __byte_perm,
// __uint_as_float, __shfl_sync, __shfl_xor_sync, __syncthreads, threadIdx/blockIdx/gridDim/blockDim, mma16816<T>,
// from_float<T>, to_float2<T>, pack2<T>, bias_at.
#pragma once
#include "cuda/quant/code_bits.cuh"
#include "cuda/quant/mma_decode.cuh"
#include "cuda/quant/w4_mma.cuh"  // add_x8

namespace thrifty::cuda::w8mma {

using mmadec::kRowsPerBlock;
using mmadec::kThreads;
constexpr int64_t kSeg = 64;  // k per segment (4 lanes x 16 bytes)

// The two 16-bit weight registers of mma step w (bytes 0, 1 -> first, 2, 3 -> second), and the offset they carry.
template <bool BF16>
__device__ __forceinline__ void w8_pairs(uint32_t word, uint32_t& p01, uint32_t& p23) {
  const uint32_t u = word ^ 0x80808080u;  // q + 128 per byte
  if constexpr (BF16) {  // 2^23 + byte b, minus 2^23: the byte as an exact float
    p01 = pack2<__nv_bfloat16>(magic_byte(u, 0) - kMagic, magic_byte(u, 1) - kMagic);
    p23 = pack2<__nv_bfloat16>(magic_byte(u, 2) - kMagic, magic_byte(u, 3) - kMagic);
  } else {
    p01 = __byte_perm(u, 0x64646464u, 0x5140u);  // bytes [u0, 0x64, u1, 0x64]
    p23 = __byte_perm(u, 0x64646464u, 0x5342u);
  }
}

// The dynamic shared memory w8_mma_kernel needs (its lane ring: 16 bytes per row and segment).
constexpr int w8_mma_smem_bytes() { return mmadec::LaneRing<16, false>::kBytes; }

// partial: null with gridDim.y == 1; else (gridDim.y, M, N) float32 sums (before the scale), finished by
// w8_mma_finish_kernel. Needs K % 64 == 0, 16-byte aligned qweight and x, x_stride % 8 == 0 (or M == 1), and
// w8_mma_smem_bytes() bytes of dynamic shared memory.
template <typename T, bool BF16, int MT>
__global__ void __launch_bounds__(kThreads, 2) w8_mma_kernel(QuantLinearParams p, float* partial) {
  using Ring = mmadec::LaneRing<16, false>;
  constexpr float offset = BF16 ? 128.0f : 1024.0f + 128.0f;
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  const int64_t K = p.K, N = p.N, n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int M = static_cast<int>(p.M);
  const int nseg = static_cast<int>(K / kSeg);
  const mmadec::LaneRows rows = mmadec::lane_rows(n0, N);
  const int8_t* wrow = static_cast<const int8_t*>(p.qweight);
  const int8_t* const q[2] = {wrow + rows.row[0] * K + 16 * t, wrow + rows.row[1] * K + 16 * t};
  const T* x = static_cast<const T*>(p.x);

  float c[MT][4], xsum[MT];
  for (int mt = 0; mt < MT; ++mt) {
    xsum[mt] = 0.0f;
    for (int e = 0; e < 4; ++e) c[mt][e] = 0.0f;
  }
  const mmadec::WarpSegments segs(mmadec::segment_walk(), nseg);
  const auto issue = [&](int b, const Ring& ring) {  // the b-th segment's 16 weight bytes of both rows
#pragma unroll
    for (int r = 0; r < 2; ++r) cp_async<16>(ring.weights(b, r), q[r] + static_cast<int64_t>(segs[b]) * kSeg);
  };
  const auto compute = [&](int b, const Ring& ring) {
    const int seg = segs[b];
    const uint4 v0 = *reinterpret_cast<const uint4*>(ring.weights(b, 0));
    const uint4 v1 = *reinterpret_cast<const uint4*>(ring.weights(b, 1));
    const uint32_t w0[4] = {v0.x, v0.y, v0.z, v0.w};
    const uint32_t w1[4] = {v1.x, v1.y, v1.z, v1.w};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // x values 8h .. 8h + 7 of the lane's 16: weight words 2h, 2h + 1
      uint4 xv[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = 8 * mt + g;
        const T* xr = x + static_cast<int64_t>(m) * p.x_stride + static_cast<int64_t>(seg) * kSeg + 16 * t + 8 * h;
        xv[mt] = m < M ? __ldg(reinterpret_cast<const uint4*>(xr)) : uint4{0u, 0u, 0u, 0u};
        w4mma::add_x8<T>(xv[mt], xsum[mt]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {  // mma step: weight word 2h + s, x words 2s, 2s + 1
        uint32_t a[4];
        w8_pairs<BF16>(w0[2 * h + s], a[0], a[2]);
        w8_pairs<BF16>(w1[2 * h + s], a[1], a[3]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          mma16816<T>(c[mt], a, s == 0 ? xv[mt].x : xv[mt].z, s == 0 ? xv[mt].y : xv[mt].w);
      }
    }
  };
  mmadec::stream_segments<16, false>(segs, issue, compute);
  // acc = C - offset * sum x (this warp's segments), in the C layout: this lane's outputs are m = 2t, 2t + 1.
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float sum = xsum[mt];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);  // lanes of quad g: row m = 8 mt + g
    const float xa = __shfl_sync(0xffffffffu, sum, 8 * t), xb = __shfl_sync(0xffffffffu, sum, 8 * t + 4);
    acc[mt][0] = fmaf(-offset, xa, c[mt][0]);
    acc[mt][1] = fmaf(-offset, xb, c[mt][1]);
    acc[mt][2] = fmaf(-offset, xa, c[mt][2]);
    acc[mt][3] = fmaf(-offset, xb, c[mt][3]);
  }
  mmadec::block_store<MT>(acc, n0, M, N, partial, [&](int64_t m, int64_t n, float sum) {
    static_cast<T*>(p.y)[m * N + n] = from_float<T>(fmaf(p.scales[n], sum, bias_at(p, n)));
  });
}

// y[m, n] = T(s[n] * (sum over the splits of partial[s][m][n]) + bias[n]); one thread per output.
template <typename T>
__global__ void __launch_bounds__(256) w8_mma_finish_kernel(QuantLinearParams p, const float* partial, int splits) {
  mmadec::finish_splits(p.M, p.N, partial, splits, [&](int64_t m, int64_t n, float sum) {
    static_cast<T*>(p.y)[m * p.N + n] = from_float<T>(fmaf(p.scales[n], sum, bias_at(p, n)));
  });
}

}  // namespace thrifty::cuda::w8mma
