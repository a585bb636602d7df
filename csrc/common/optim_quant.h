// 8-bit optimizer state quantizer shared by the CPU glue and kernels (torch-free).
//
// Rule (also the Python reference's and the CUDA kernel's): the code of a normalized value x
// (|x| <= 1) is the number of code midpoints mid[k] = (q[k] + q[k+1]) / 2 (float32) below x, i.e.
// the nearest code, ties to the lower one. On CPU a lookup table indexed by x's sign, exponent and
// top 8 mantissa bits gives it in two loads: every such bucket holds at most one midpoint t
// (checked when the table is built), so code = base + (x > t).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace thrifty {

constexpr int kQExpMin = 127 - 24;  // |x| < 2^-24: the "tiny" bucket (no midpoint there for the dynamic maps)
constexpr int kQExps = 128 - kQExpMin;
constexpr int kQTiny = 2 * kQExps * 256;
constexpr int kQLutSize = kQTiny + 1;

struct QuantLut {
  uint8_t code[kQLutSize];
  float thr[kQLutSize];
};

inline int quant_count_below(const float* mids, float x) {  // #{k < 255: mids[k] < x}
  int c = 0;
  for (int step = 128; step > 0; step >>= 1)
    if (c + step - 1 < 255 && mids[c + step - 1] < x) c += step;
  return c;
}

// Builds the table of the sorted 256-value map q. Returns false if a bucket holds two midpoints.
inline bool build_quant_lut(const float* q, QuantLut& lut) {
  float mids[255];
  for (int k = 0; k < 255; ++k) mids[k] = (q[k] + q[k + 1]) * 0.5f;
  auto bits_to_float = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  for (uint32_t s = 0; s < 2; ++s)
    for (int e = kQExpMin; e < 128; ++e)
      for (uint32_t m8 = 0; m8 < 256; ++m8) {
        const uint32_t lo = static_cast<uint32_t>(e) << 23 | m8 << 15, hi = lo | 0x7fffu;
        const float vmin = s ? -bits_to_float(hi) : bits_to_float(lo);
        const float vmax = s ? -bits_to_float(lo) : bits_to_float(hi);
        const int base = quant_count_below(mids, vmin);
        int upto = base;  // #{mids <= vmax}
        while (upto < 255 && mids[upto] <= vmax) ++upto;
        if (upto - base > 1) return false;
        const int idx = static_cast<int>((s * kQExps + static_cast<uint32_t>(e - kQExpMin)) * 256 + m8);
        lut.code[idx] = static_cast<uint8_t>(base);
        lut.thr[idx] = upto > base ? mids[base] : INFINITY;
      }
  const float tiny = std::ldexp(1.0f, kQExpMin - 127);
  const int base = quant_count_below(mids, -tiny);
  int upto = base;
  while (upto < 255 && mids[upto] <= tiny) ++upto;
  if (upto != base) return false;
  lut.code[kQTiny] = static_cast<uint8_t>(base);
  lut.thr[kQTiny] = INFINITY;
  return true;
}

// quant_lut_index / quant_lookup (the per-element lookup) live in the ISA-compiled kernel.

}  // namespace thrifty
