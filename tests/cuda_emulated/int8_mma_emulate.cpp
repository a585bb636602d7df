// Runs the W8A8 decode kernel (csrc/cuda/quant/int8_mma.cuh) on the CPU with the warp emulator of
// warp_emulator.h (mma.sync m16n8k32 s8 per csrc/cuda/mma.cuh) and checks every output bit for bit against
// exact int64 dot products put through the same float32 epilogue: the lane / k-slot mapping, the warps' and
// K splits' int32 sums, rows and columns past M and N. Run by
// tests/test_quant.py::test_int8_mma_kernel_in_warp_emulator; by hand:
//   g++ -std=c++20 -O1 -pthread -mf16c -Icsrc tests/cuda_emulated/int8_mma_emulate.cpp -o /tmp/i8e && /tmp/i8e
#include "warp_emulator.h"

namespace thrifty::cuda {
inline float load_any(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return half_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_any(void* p, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(_cvtss_sh(v, 0)); break;
  }
}
}  // namespace thrifty::cuda

#include "cuda/quant/int8_mma.cuh"

using namespace thrifty;
namespace i8 = thrifty::cuda::i8mma;

// The launch of int8_linear.cu's launch_int8_mma.
template <int MT>
void run_grid(const Int8LinearParams& p, int splits) {
  run_decode_grid<int>(p.M, p.N, splits, cuda::mmadec::kRowsPerBlock, cuda::mmadec::kThreads,
                       [&](int* part) { i8::int8_mma_kernel<MT>(p, part); },
                       [&](int* part) { i8::int8_mma_finish_kernel(p, part, splits); });
}

bool check(int64_t M, int64_t K, int64_t N, DType out, bool bias, int splits, std::mt19937& rng) {
  std::uniform_int_distribution<int> i8v(-128, 127);
  std::uniform_real_distribution<float> sc(1e-4f, 2e-2f);
  std::normal_distribution<float> nd;
  std::vector<int8_t> xq(M * K), wq(N * K);
  for (auto& v : xq) v = static_cast<int8_t>(i8v(rng));
  for (auto& v : wq) v = static_cast<int8_t>(i8v(rng));
  for (int64_t k = 0; k < std::min<int64_t>(K, 64); ++k) xq[k] = wq[k] = -128;  // extremes in row 0
  std::vector<float> xs(M), ws(N), bs(N);
  for (auto& v : xs) v = sc(rng);
  for (auto& v : ws) v = sc(rng);
  for (auto& v : bs) v = nd(rng);
  const size_t esize = out == DType::f32 ? 4 : 2;
  std::vector<uint8_t> y(M * N * esize, 0xCD), want(M * N * esize, 0);

  Int8LinearParams p;
  p.M = M, p.K = K, p.N = N, p.xq = xq.data(), p.x_scales = xs.data(), p.wq = wq.data(), p.w_scales = ws.data();
  p.bias = bias ? bs.data() : nullptr, p.bias_dtype = DType::f32, p.out_dtype = out, p.y = y.data();
  if (M <= 8) run_grid<1>(p, splits);
  else if (M <= 16) run_grid<2>(p, splits);
  else run_grid<4>(p, splits);

  Int8LinearParams r = p;
  r.y = want.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int64_t{xq[m * K + k]} * wq[n * K + k];
      cuda::store_any(r.y, m * N + n, i8::int8_epilogue(r, m, n, static_cast<int>(acc)), out);
    }
  if (std::memcmp(y.data(), want.data(), y.size()) != 0) {
    std::printf("  FAIL M=%lld K=%lld N=%lld out=%d bias=%d splits=%d: outputs differ\n", (long long)M, (long long)K,
                (long long)N, static_cast<int>(out), bias, splits);
    return false;
  }
  std::printf("  ok  M=%lld K=%lld N=%lld out=%d bias=%d splits=%d (bit exact)\n", (long long)M, (long long)K,
              (long long)N, static_cast<int>(out), bias, splits);
  return true;
}

int main() {
  std::mt19937 rng(99);
  bool ok = true;
  struct Case { int64_t M, K, N; DType out; bool bias; int splits; };
  const Case cases[] = {
      {1, 64, 16, DType::f32, false, 1},      {1, 2368, 40, DType::bf16, true, 1},  // 37 segments: partial sweep
      {5, 640, 17, DType::f16, true, 1},      {8, 1024, 33, DType::f32, true, 1},
      {9, 704, 24, DType::bf16, false, 1},    {16, 1280, 8, DType::f32, true, 1},
      {17, 640, 20, DType::bf16, true, 1},    {32, 2048, 17, DType::f16, false, 1},
      {3, 4096, 40, DType::bf16, true, 2},    {12, 2560, 19, DType::f32, false, 3},
      {27, 2048, 24, DType::f16, true, 4},
      {2, 8192, 24, DType::bf16, true, 1},    {20, 6144, 17, DType::f32, false, 1},  // the lane ring wraps around
  };
  for (const Case& c : cases) ok = check(c.M, c.K, c.N, c.out, c.bias, c.splits, rng) && ok;
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}
