// 8-bit optimizer state quantizer tables, built by the CPU glue and read by the CPU kernels (torch-free).
//
// Rule (also the Python reference's and the CUDA kernel's): the code of a normalized value x
// (|x| <= 1) is the number of code midpoints mid[k] = (q[k] + q[k+1]) / 2 (float32) below x, i.e.
// the nearest code, ties to the lower one; except that a map starting at 0 (an unsigned map: the
// second moment's) has mid[0] = 0, so a positive value never rounds to 0. A second moment stored as 0
// under a nonzero first moment made AdamW's next update m / eps: thousands of times lr for an element
// whose gradient was 1e-4 of its block's largest. Its smallest code over-estimates such a v instead
// (a smaller step than AdamW's, never a larger one).
//
// CPU: a table indexed by x's bits above bit `shift` — sign, exponent and the top mbits = 23 - shift
// mantissa bits, a "bucket" — gives the code in one 32-bit load, so a vector of codes is one table
// lookup per lane with no search and no branches. The build picks the largest shift (smallest
// table) at which no two midpoints share a bucket, so code = base + (x > t) with t the bucket's
// midpoint if it has one. Within a bucket x > t depends only on the bits below `shift`, so the
// entry packs base and t's position there:
//   entry = base << 24 | t_pos,   code = base + (pos(x) > t_pos),
//   pos(x) = x's bits below `shift`, flipped for negative x (so that pos grows with x);
//   t_pos = kQNoMid (above any pos) when the bucket holds no midpoint.
// The table covers every float, so the lookup needs no clamping: zeros, denormals and values
// beyond 1 follow the rule exactly. NaN takes the code of infinity of its sign (the last code for
// +NaN, the first for -NaN), as the earlier clamping lookup gave for any map with |codes| < 1.99.
// The dynamic maps need mbits = 6 (signed, 128 KB) and 7 (unsigned, 256 KB), of which the steps
// touch a few KB. The per-element lookup (scalar and vector) lives in the ISA-compiled kernel
// (cpu/optim/optim_vec.h); the build functions below are for the CPU glue only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace thrifty {

constexpr int kQMaxMantBits = 8;  // at most 2^(9 + 8) entries (512 KB) per table
constexpr uint32_t kQNoMid = 0xffffffu;

// What the kernels read: the bucket shift and the 2^(32 - shift) entries.
struct QuantLut {
  uint32_t shift = 23;
  const uint32_t* entry = nullptr;
  // The map's 256 float32 values split into byte planes: planes[p][c] = byte p of q[c] (the gather-free
  // dequantization of the avx512_bf16 level on VBMI CPUs looks codes up in them with byte permutes).
  const uint8_t (*planes)[256] = nullptr;
};

// static: each translation unit keeps its own copy, so no copy compiled for one ISA level can be
// picked by the linker for another (ARCHITECTURE.md); the kernels never call these.
static inline uint32_t quant_float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// The 255 midpoints of the 256-value map q (the rule above); false unless q is finite and the midpoints strictly increase.
static inline bool quant_mids(const float* q, float* mids) {
  for (int k = 0; k < 255; ++k) {
    if (!std::isfinite(q[k]) || !std::isfinite(q[k + 1])) return false;
    mids[k] = (k == 0 && q[0] == 0.0f) ? 0.0f : (q[k] + q[k + 1]) * 0.5f;  // unsigned map: see the rule above
    if (k > 0 && !(mids[k - 1] < mids[k])) return false;
  }
  return true;
}

// The largest bucket shift at which no two midpoints share a bucket, or -1 if that needs more than
// kQMaxMantBits mantissa bits. Buckets are intervals, so it suffices that neighbours differ above it.
static inline int quant_lut_shift(const float* mids) {
  int shift = 23;
  for (int k = 0; k + 1 < 255; ++k) {
    const uint32_t d = quant_float_bits(mids[k]) ^ quant_float_bits(mids[k + 1]);
    const int top = 31 - __builtin_clz(d);  // d != 0: the midpoints strictly increase
    if (top < shift) shift = top;
  }
  return shift < 23 - kQMaxMantBits ? -1 : shift;
}

static inline uint32_t quant_lut_size(int shift) { return 1u << (32 - shift); }

// planes[p][c] = byte p (little-endian) of q[c], for QuantLut::planes.
static inline void fill_quant_planes(const float* q, uint8_t (*planes)[256]) {
  for (int c = 0; c < 256; ++c) {
    const uint32_t u = quant_float_bits(q[c]);
    for (int p = 0; p < 4; ++p) planes[p][c] = static_cast<uint8_t>(u >> (8 * p));
  }
}

// Fills the quant_lut_size(shift) entries (layout above). Returns false if a bucket would hold two
// midpoints (cannot happen at quant_lut_shift's shift except for a midpoint at +0 next to a
// negative one within the same denormal bucket).
static inline bool fill_quant_lut(const float* mids, int shift, uint32_t* entry) {
  const uint32_t nkeys = 1u << (31 - shift), low = (1u << shift) - 1u;
  auto as_float = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  for (uint32_t s = 0; s < 2; ++s) {
    int c = 0;  // #{mids < vmin of the bucket}: buckets are visited by increasing value
    for (uint32_t i = 0; i < nkeys; ++i) {
      const uint32_t key = s ? nkeys - 1 - i : i;  // negative: descending magnitudes
      const uint32_t lo = key << shift, hi = lo | low;
      if ((lo >> 23) == 255) {  // inf and NaN: the code of +inf (255) or -inf (0)
        entry[s * nkeys + key] = (s ? 0u : 255u) << 24 | kQNoMid;
        continue;
      }
      const float vmin = s ? -as_float(hi) : as_float(lo);
      const float vmax = s ? -as_float(lo) : as_float(hi);
      while (c < 255 && mids[c] < vmin) ++c;
      int upto = c;  // #{mids <= vmax}
      while (upto < 255 && mids[upto] <= vmax) ++upto;
      if (upto - c > 1) return false;
      uint32_t tpos = kQNoMid;
      if (upto > c) tpos = (quant_float_bits(mids[c]) & low) ^ (s ? low : 0u);
      entry[s * nkeys + key] = static_cast<uint32_t>(c) << 24 | tpos;
    }
  }
  return true;
}

}  // namespace thrifty
