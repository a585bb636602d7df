// Runs the W4A16 and W8A16 tensor-core kernels (csrc/cuda/quant/w4_mma.cuh, w8_mma.cuh) on the CPU with the warp
// emulator of warp_emulator.h (mma.sync m16n8k16 per csrc/cuda/mma.cuh). It checks the kernels' lane/k-slot
// mapping, the in-register conversion of the codes, the zero-point / offset corrections and the K splits
// against a float64 reference on odd shapes, without a GPU; mma's own rounding is modelled as float32 sums.
// Run by tests/test_quant.py::test_quant_mma_kernels_in_warp_emulator; by hand:
//   g++ -std=c++20 -O1 -pthread -mf16c -Icsrc tests/cuda_emulated/quant_mma_emulate.cpp -o /tmp/qme && /tmp/qme
#include "warp_emulator.h"

namespace thrifty::cuda {
template <typename T> inline float2 to_float2(uint32_t w) {
  return {elem<T>(static_cast<uint16_t>(w)), elem<T>(static_cast<uint16_t>(w >> 16))};
}
template <typename T> inline T from_float(float x);
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return {float_to_bf16(x)}; }
template <> inline __half from_float<__half>(float x) { return {static_cast<uint16_t>(_cvtss_sh(x, 0))}; }

template <typename T> inline uint32_t pack2(float lo, float hi);
template <> inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return float_to_bf16(lo) | (uint32_t{float_to_bf16(hi)} << 16);
}

inline float bias_at(const QuantLinearParams& p, int64_t n) {
  if (p.bias == nullptr) return 0.0f;
  switch (p.bias_dtype) {
    case DType::f32: return static_cast<const float*>(p.bias)[n];
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(p.bias)[n]);
    default: return half_to_float(static_cast<const uint16_t*>(p.bias)[n]);
  }
}

}  // namespace thrifty::cuda

#include "cuda/quant/w4_mma.cuh"
#include "cuda/quant/w8_mma.cuh"

using namespace thrifty;

// The launches of quant_linear.cu's launch_w4_mma_s / launch_w8_mma_t.
template <typename T, bool BF16, int S, int MT>
void run_grid(const QuantLinearParams& p, int splits) {
  run_decode_grid<float>(p.M, p.N, splits, cuda::mmadec::kRowsPerBlock, cuda::mmadec::kThreads,
                         [&](float* part) { cuda::w4mma::w4_mma_kernel<T, BF16, S, MT>(p, part); },
                         [&](float* part) { cuda::w4mma::w4_mma_finish_kernel<T>(p, part, splits); });
}
template <typename T, bool BF16, int MT>
void run_grid8(const QuantLinearParams& p, int splits) {
  run_decode_grid<float>(p.M, p.N, splits, cuda::mmadec::kRowsPerBlock, cuda::mmadec::kThreads,
                         [&](float* part) { cuda::w8mma::w8_mma_kernel<T, BF16, MT>(p, part); },
                         [&](float* part) { cuda::w8mma::w8_mma_finish_kernel<T>(p, part, splits); });
}

// y (M x N, 16-bit T) against the float64 reference sum_k x[m, k] w(n, k) + bias[n]: the error may be one
// rounding of the output to T plus rel_sum x sum_k |x term(n, k)| (the float32 sums' terms) + 1e-6. Prints the
// first failure ("FAIL <what>m=...") and returns false; worst: the largest error / tolerance.
template <bool BF16, typename W, typename Term>
bool compare(const char* what, int64_t M, int64_t K, int64_t N, const std::vector<uint16_t>& x, int64_t xs,
             const std::vector<uint16_t>& y, const float* bias, W w, Term term, double rel_sum, double& worst) {
  const auto val = [](uint16_t v) { return BF16 ? bf16_to_float(v) : half_to_float(v); };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = bias ? bias[n] : 0.0, mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double xv = val(x[m * xs + k]);
        ref += xv * w(n, k);
        mag += std::fabs(xv * term(n, k));
      }
      const double got = val(y[m * N + n]);
      const double tol = std::fabs(ref) * (BF16 ? 0x1p-8 : 0x1p-11) + mag * rel_sum + 1e-6;
      const double err = std::fabs(got - ref);
      if (!(err <= tol)) {
        std::printf("  FAIL %sm=%lld n=%lld got %.6g ref %.6g (tol %.3g)\n", what, (long long)m, (long long)n, got,
                    ref, tol);
        return false;
      }
      worst = std::max(worst, err / tol);
    }
  return true;
}

template <typename T, bool BF16>
bool check(int64_t M, int64_t K, int64_t N, int64_t G, bool bias, int splits, std::mt19937& rng) {
  const int64_t xs = K + 8;  // padded rows: x_stride != K
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> nib(0, 15);
  std::vector<uint16_t> x(M * xs);
  for (auto& v : x) v = BF16 ? float_to_bf16(nd(rng)) : static_cast<uint16_t>(_cvtss_sh(nd(rng), 0));
  std::vector<uint8_t> qw(N * K / 2);
  std::vector<int> q(N * K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; k += 2) {
      const int lo = nib(rng), hi = nib(rng);
      q[n * K + k] = lo, q[n * K + k + 1] = hi;
      qw[n * (K / 2) + k / 2] = static_cast<uint8_t>(lo | (hi << 4));
    }
  const int64_t ng = K / G;
  std::vector<float> sc(N * ng), zr(N * ng), bs(N);
  for (auto& v : sc) v = 0.01f + 0.02f * std::fabs(nd(rng));
  for (auto& v : zr) v = 7.5f + 3.0f * nd(rng);  // fractional zero points, as RTN produces
  for (auto& v : bs) v = nd(rng);
  std::vector<uint16_t> y(M * N, 0xFFFF);

  QuantLinearParams p;
  p.M = M, p.K = K, p.N = N, p.bits = 4, p.group_size = G;
  p.dtype = BF16 ? DType::bf16 : DType::f16;
  p.x = x.data(), p.x_stride = xs, p.qweight = qw.data(), p.scales = sc.data(), p.zeros = zr.data();
  p.bias = bias ? bs.data() : nullptr, p.bias_dtype = DType::f32, p.y = y.data();
  const int S = G % 128 == 0 ? 128 : G % 64 == 0 ? 64 : 32;
  auto go = [&](auto s_tag) {
    constexpr int SS = decltype(s_tag)::value;
    if (M <= 8) run_grid<T, BF16, SS, 1>(p, splits);
    else if (M <= 16) run_grid<T, BF16, SS, 2>(p, splits);
    else run_grid<T, BF16, SS, 4>(p, splits);
  };
  if (S == 128) go(std::integral_constant<int, 128>{});
  else if (S == 64) go(std::integral_constant<int, 64>{});
  else go(std::integral_constant<int, 32>{});

  double worst = 0.0;
  const auto w = [&](int64_t n, int64_t k) {
    return (q[n * K + k] - static_cast<double>(zr[n * ng + k / G])) * sc[n * ng + k / G];
  };
  // float32 sums of terms up to (offset + 15) |x| s: |x w| bounds them closely enough at 2e-5
  if (!compare<BF16>("", M, K, N, x, xs, y, bias ? bs.data() : nullptr, w, w, 2e-5, worst)) return false;
  std::printf("  ok  %s M=%lld K=%lld N=%lld G=%lld S=%d bias=%d splits=%d  worst err/tol %.3f\n",
              BF16 ? "bf16" : "f16 ", (long long)M, (long long)K, (long long)N, (long long)G, S, bias, splits, worst);
  return true;
}

template <typename T, bool BF16>
bool check8(int64_t M, int64_t K, int64_t N, bool bias, int splits, std::mt19937& rng) {
  const int64_t xs = K + 24;  // padded rows
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> i8v(-128, 127);
  std::vector<uint16_t> x(M * xs);
  for (auto& v : x) v = BF16 ? float_to_bf16(nd(rng)) : static_cast<uint16_t>(_cvtss_sh(nd(rng), 0));
  std::vector<int8_t> qw(N * K);
  for (auto& v : qw) v = static_cast<int8_t>(i8v(rng));
  for (int64_t k = 0; k < std::min<int64_t>(K, 16); ++k) qw[k] = static_cast<int8_t>(k % 2 ? 127 : -128);  // extremes
  std::vector<float> sc(N), bs(N);
  for (auto& v : sc) v = 0.001f + 0.01f * std::fabs(nd(rng));
  for (auto& v : bs) v = nd(rng);
  std::vector<uint16_t> y(M * N, 0xFFFF);
  QuantLinearParams p;
  p.M = M, p.K = K, p.N = N, p.bits = 8, p.group_size = K;
  p.dtype = BF16 ? DType::bf16 : DType::f16;
  p.x = x.data(), p.x_stride = xs, p.qweight = qw.data(), p.scales = sc.data();
  p.bias = bias ? bs.data() : nullptr, p.bias_dtype = DType::f32, p.y = y.data();
  if (M <= 8) run_grid8<T, BF16, 1>(p, splits);
  else if (M <= 16) run_grid8<T, BF16, 2>(p, splits);
  else run_grid8<T, BF16, 4>(p, splits);
  double worst = 0.0;
  const auto w = [&](int64_t n, int64_t k) { return qw[n * K + k] * static_cast<double>(sc[n]); };
  const auto term = [&](int64_t n, int64_t k) { return (qw[n * K + k] + 1152.0) * sc[n]; };  // the offset's terms
  if (!compare<BF16>("W8 ", M, K, N, x, xs, y, bias ? bs.data() : nullptr, w, term, 2e-6, worst)) return false;
  std::printf("  ok  W8 %s M=%lld K=%lld N=%lld bias=%d splits=%d  worst err/tol %.3f\n", BF16 ? "bf16" : "f16 ",
              (long long)M, (long long)K, (long long)N, bias, splits, worst);
  return true;
}

int main() {
  std::mt19937 rng(1234);
  bool ok = true;
  struct Case { int64_t M, K, N, G; bool bias; int splits; };  // splits: blocks along K (gridDim.y)
  const Case cases[] = {
      {1, 640, 40, 128, true, 1},   {3, 4736, 24, 128, false, 1},  // 37 segments: partial second sweep of 8 x 4
      {8, 320, 17, 64, true, 1},    {9, 192, 40, 32, false, 1},   {16, 1152, 33, 96, true, 1},  // G 96 -> S 32
      {5, 512, 16, 256, false, 1},  {2, 2048, 8, 64, true, 1},    {13, 4096, 20, 128, true, 1},
      {27, 640, 24, 64, true, 1},   {32, 1152, 17, 128, false, 1},
      {1, 4736, 24, 128, true, 2},  {6, 2304, 33, 64, false, 3},  {20, 1152, 17, 32, true, 4},  // K split
      // more segments per warp than the lane ring has slots (mma_decode.cuh: 6): the ring wraps around
      {2, 8192, 24, 64, true, 1},   {17, 8192, 16, 128, false, 1}, {3, 3072, 17, 32, true, 2},
  };
  for (const Case& c : cases) {
    ok = check<__nv_bfloat16, true>(c.M, c.K, c.N, c.G, c.bias, c.splits, rng) && ok;
    ok = check<__half, false>(c.M, c.K, c.N, c.G, c.bias, c.splits, rng) && ok;
  }
  struct Case8 { int64_t M, K, N; bool bias; int splits; };
  const Case8 cases8[] = {
      {1, 64, 16, true, 1},   {3, 2368, 24, false, 1},  {8, 640, 17, true, 1},   {9, 1024, 40, false, 1},
      {16, 704, 33, true, 1}, {27, 1280, 20, true, 1},  {32, 640, 8, false, 1},
      {1, 4096, 24, true, 2}, {6, 2304, 33, false, 3},  {20, 2048, 17, true, 4},
      {1, 8192, 24, true, 1}, {12, 6144, 17, false, 1},  // the lane ring wraps around
  };
  for (const Case8& c : cases8) {
    ok = check8<__nv_bfloat16, true>(c.M, c.K, c.N, c.bias, c.splits, rng) && ok;
    ok = check8<__half, false>(c.M, c.K, c.N, c.bias, c.splits, rng) && ok;
  }
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}
