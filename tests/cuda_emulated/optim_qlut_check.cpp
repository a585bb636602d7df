// CPU check of the CUDA 8-bit optimizer's requantization lookup (csrc/cuda/optim/qlut.cuh, compiled here
// from the same source): the bucket table + walk gives the binary search's code for every non-NaN float,
// NaN a code in range. Maps: the files named on the command line (256 float32 values each: thrifty's
// dynamic maps, written by tests/test_optim.py::test_cuda_8bit_quantizer_lookup_on_cpu) and random sorted
// maps. Prints the longest walk per map.
//   g++ -std=c++20 -O1 -Icsrc tests/cuda_emulated/optim_qlut_check.cpp -o /tmp/qlut && /tmp/qlut map_m.bin map_v.bin
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#define __device__
#define __forceinline__ inline
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

#include "cuda/optim/qlut.cuh"

using namespace thrifty::cuda;

static bool check_map(const char* name, const std::vector<float>& q, std::mt19937& rng) {
  float mids[256];
  for (int i = 0; i < 256; ++i)  // as optim.cu: an unsigned map (q[0] = 0) has mid[0] = 0
    mids[i] = i == 0 && q[0] == 0.0f ? 0.0f : i < 255 ? (q[i] + q[i + 1]) * 0.5f : INFINITY;
  std::vector<uint8_t> lut(kQLutSize);
  for (uint32_t b = 0; b < static_cast<uint32_t>(kQLutSize); ++b)  // as build_qlut_kernel
    lut[b] = static_cast<uint8_t>(quantize_nearest(mids, qlut_bucket_floor(b)));
  int longest = 0;
  auto one = [&](float x) {
    const int want = quantize_nearest(mids, x), got = quantize_lut(lut.data(), mids, x);
    if (std::isnan(x)) return got >= 0 && got <= 255;
    int walk = got - lut[__float_as_uint(x) >> kQLutShift];
    longest = std::max(longest, walk);
    if (got != want)
      std::printf("  %s: x = %a (bits %08x): lut %d, search %d\n", name, x, __float_as_uint(x), got, want);
    return got == want;
  };
  bool ok = true;
  std::vector<float> xs = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, 1.0f, -1.0f, 1e-45f, -1e-45f, 1e-38f};
  for (int i = 0; i < 256; ++i) {
    for (float v : {q[i], mids[i]}) {
      if (!std::isfinite(v)) continue;
      xs.insert(xs.end(), {v, std::nextafter(v, INFINITY), std::nextafter(v, -INFINITY)});
    }
  }
  for (float x : xs) ok = one(x) && ok;
  std::uniform_int_distribution<uint32_t> bits;
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (int i = 0; i < 2000000 && ok; ++i) {
    ok = one(__uint_as_float(bits(rng))) && ok;                     // every float, NaN included
    ok = one(unit(rng) * std::ldexp(1.0f, -(i % 30))) && ok;        // the normalized range, all scales
  }
  std::printf("  %s %s: longest walk %d\n", ok ? "ok  " : "FAIL", name, longest);
  return ok;
}

int main(int argc, char** argv) {
  std::mt19937 rng(7);
  bool ok = true;
  for (int a = 1; a < argc; ++a) {
    std::vector<float> q(256);
    FILE* f = std::fopen(argv[a], "rb");
    if (f == nullptr || std::fread(q.data(), 4, 256, f) != 256) {
      std::printf("cannot read 256 floats from %s\n", argv[a]);
      return 2;
    }
    std::fclose(f);
    ok = check_map(argv[a], q, rng) && ok;
  }
  for (int r = 0; r < 4; ++r) {  // random sorted maps: dense near 0, spread over [-1, 1] or [0, 1]
    std::vector<float> q(256);
    std::uniform_real_distribution<float> u(r % 2 ? 0.0f : -1.0f, 1.0f);
    for (auto& v : q) v = u(rng) * (r >= 2 ? u(rng) * u(rng) : 1.0f);
    std::sort(q.begin(), q.end());
    q.erase(std::unique(q.begin(), q.end()), q.end());
    while (q.size() < 256) q.push_back(std::nextafter(q.back(), 2.0f));
    ok = check_map(r % 2 ? "random unsigned" : "random signed", q, rng) && ok;
  }
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}
