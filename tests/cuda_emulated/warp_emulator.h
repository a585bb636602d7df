// A CPU stand-in for the CUDA vocabulary of thrifty's lane-level kernels, so that their own sources (included
// after this header) run on the CPU: one std::thread per CUDA thread (run_block), warp shuffles and
// mma.sync (m16n8k16 bf16/f16 -> f32, m16n8k32 s8 -> s32; fragment layouts of csrc/cuda/mma.cuh) emulated with
// per-warp barriers, __syncthreads with a block barrier, __shared__ arrays as statics (blocks run one at a
// time), cp.async as copies deferred to the wait that covers them. Used by the *_emulate.cpp checks here; it
// says nothing about speed.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "common/quant_params.h"

// ---- the CUDA vocabulary the kernel uses
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one array per kernel instantiation, shared by the block's threads (blocks run one by one)

struct dim3 { unsigned x = 0, y = 0, z = 0; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };

thread_local dim3 threadIdx, blockIdx, gridDim, blockDim;

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
template <typename P> inline P __ldg(const P* p) { return *p; }
template <typename P> inline P __ldcs(const P* p) { return *p; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t v = (uint64_t{y} << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline float bf16_to_float(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

struct Warp {
  std::barrier<> bar{32};
  float f[32];
  uint32_t a[32][4], b[32][2];
};
thread_local Warp* this_warp;
thread_local std::barrier<>* this_block;
inline int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

inline float exchange(float v, int src) {
  this_warp->f[lane_id()] = v;
  this_warp->bar.arrive_and_wait();
  const float r = this_warp->f[src];
  this_warp->bar.arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int m) { return exchange(v, lane_id() ^ m); }
inline float __shfl_sync(unsigned, float v, int src) { return exchange(v, src & 31); }
inline void __syncthreads() { this_block->arrive_and_wait(); }

namespace thrifty::cuda {
// cp.async, deferred as on the GPU: a thread's copies wait in commit groups until cp_async_wait<N> leaves at most
// N groups open, so a kernel that reads its shared memory before the wait for that copy reads stale bytes (the
// dynamic shared memory starts poisoned for every block).
struct AsyncCopy { void* dst; const void* src; int bytes; };
inline thread_local std::vector<AsyncCopy> open_copies;
inline thread_local std::vector<std::vector<AsyncCopy>> copy_groups;
template <int B> inline void cp_async(void* dst, const void* src) { open_copies.push_back({dst, src, B}); }
inline void cp_async_commit() { copy_groups.push_back(std::move(open_copies)); open_copies.clear(); }
template <int N> inline void cp_async_wait() {
  while (copy_groups.size() > static_cast<size_t>(N)) {
    for (const AsyncCopy& c : copy_groups.front()) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
    copy_groups.erase(copy_groups.begin());
  }
}
// The block's dynamic shared memory (blocks run one at a time, so one buffer serves them all).
inline std::vector<unsigned char> dynamic_smem_buffer(256 * 1024);
inline unsigned char* dynamic_smem() { return dynamic_smem_buffer.data(); }

template <typename T> inline float elem(uint16_t v);
template <> inline float elem<__nv_bfloat16>(uint16_t v) { return bf16_to_float(v); }
template <> inline float elem<__half>(uint16_t v) { return half_to_float(v); }

// One warp's mma.sync m16n8kK (layouts of csrc/cuda/mma.cuh; g = lane / 4, t = lane % 4), E = K / 8 elements per
// 32-bit register, the lowest k in the low bits, decode(reg, i) = element i: A a0 (row g, k E t ..), a1 (row g + 8,
// same k), a2 (row g, k K/2 + E t ..), a3 (row g + 8, ..); B b0 (k E t .., col g), b1 (k K/2 + E t .., col g);
// C c0, c1 (row g, cols 2t, 2t + 1), c2, c3 (row g + 8, ..). Sums in Acc, k ascending.
template <int K, typename Acc, typename Decode>
inline void mma_emulate(Acc (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Decode decode) {
  constexpr int E = K / 8, H = K / 2;
  Warp& w = *this_warp;
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0, w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  const auto A = [&](int row, int k) {
    return decode(w.a[(row & 7) * 4 + (k % H) / E][(row >= 8 ? 1 : 0) + (k >= H ? 2 : 0)], k % E);
  };
  const auto B = [&](int k, int col) { return decode(w.b[col * 4 + (k % H) / E][k >= H ? 1 : 0], k % E); };
  Acc out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    Acc s = c[e];
    for (int k = 0; k < K; ++k) s += A(row, k) * B(k, col);
    out[e] = s;
  }
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// mma.sync.m16n8k16.row.col.f32 with bf16 / f16 inputs.
template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_emulate<16>(c, a, b0, b1, [](uint32_t r, int i) { return elem<T>(static_cast<uint16_t>(i ? r >> 16 : r)); });
}
// mma.sync.m16n8k32.row.col.s32.s8.s8.s32.
inline void mma16832_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_emulate<32>(c, a, b0, b1, [](uint32_t r, int i) { return static_cast<int>(static_cast<int8_t>(r >> (8 * i))); });
}
}  // namespace thrifty::cuda

// Runs `kernel()` as block (bx, by) of a (gx, gy) grid with `threads` threads, each its own std::thread.
inline void run_block(unsigned bx, unsigned by, unsigned gx, unsigned gy, int threads,
                      const std::function<void()>& kernel) {
  std::barrier<> block(threads);
  std::fill(thrifty::cuda::dynamic_smem_buffer.begin(), thrifty::cuda::dynamic_smem_buffer.end(), 0xA5);
  std::vector<std::unique_ptr<Warp>> warps;
  for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  std::vector<std::thread> th;
  for (int i = 0; i < threads; ++i)
    th.emplace_back([&, i] {
      threadIdx.x = static_cast<unsigned>(i);
      blockIdx.x = bx, blockIdx.y = by;
      gridDim.x = gx, gridDim.y = gy;
      blockDim.x = static_cast<unsigned>(threads);
      this_warp = warps[i / 32].get();
      this_block = &block;
      kernel();
    });
  for (auto& t : th) t.join();
}

// Runs a kernel with no barriers or shuffles over `blocks` blocks of `threads` threads, one thread at a time.
inline void run_serial(unsigned blocks, int threads, const std::function<void()>& kernel) {
  for (unsigned b = 0; b < blocks; ++b)
    for (int i = 0; i < threads; ++i) {
      threadIdx.x = static_cast<unsigned>(i), blockIdx.x = b, blockIdx.y = 0;
      blockDim.x = static_cast<unsigned>(threads);
      kernel();
    }
}

// The launch of the decode mma kernels (csrc/cuda/quant/mma_decode.cuh): a grid of ceil(N / rows) x splits blocks
// of `threads` threads running kernel(partial), then, with several splits, finish(partial) over M x N threads in
// blocks of 256; partial holds splits x M x N values of A (poisoned first), null with one split.
template <typename A, typename Kernel, typename Finish>
void run_decode_grid(int64_t M, int64_t N, int splits, int rows, int threads, Kernel kernel, Finish finish) {
  const unsigned blocks = static_cast<unsigned>((N + rows - 1) / rows);
  std::vector<A> partial(splits > 1 ? splits * M * N : 0, static_cast<A>(0x7eadbeef));
  A* part = splits > 1 ? partial.data() : nullptr;
  for (unsigned by = 0; by < static_cast<unsigned>(splits); ++by)
    for (unsigned b = 0; b < blocks; ++b)
      run_block(b, by, blocks, static_cast<unsigned>(splits), threads, [&] { kernel(part); });
  if (splits > 1) run_serial(static_cast<unsigned>((M * N + 255) / 256), 256, [&] { finish(part); });
}
