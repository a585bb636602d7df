// Torch-free masking helpers for the attention kernels (CPU and CUDA: plain inline
// functions, callable from device code through THRIFTY_HD). They spell out the rule of
// common/attention_params.h once:
//
//   offset = seqlen_k - seqlen_q  (of the sequence at hand: bottom-right-aligned diagonal)
//   query i sees key j  iff  (wl < 0 || j >= i + offset - wl) && (wr < 0 || j <= i + offset + wr)
//
// and a query row that sees no key gets out = 0, lse = -inf.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define THRIFTY_HD __host__ __device__ __forceinline__
#else
#define THRIFTY_HD inline
#endif

namespace thrifty {

// The visible keys of query row i form one interval [lo, hi) (empty when lo >= hi).
struct KeyRange {
  int64_t lo, hi;
};

THRIFTY_HD KeyRange attention_key_range(int64_t i, int64_t seqlen_q, int64_t seqlen_k, int window_left,
                                        int window_right) {
  const int64_t diag = i + seqlen_k - seqlen_q;
  int64_t lo = window_left < 0 ? 0 : diag - window_left;
  int64_t hi = window_right < 0 ? seqlen_k : diag + window_right + 1;
  if (lo < 0) lo = 0;
  if (hi > seqlen_k) hi = seqlen_k;
  return KeyRange{lo, hi};
}

// Union of the visible key ranges of query rows [i0, i1) (rows of one tile); {0, 0} when
// none is visible. Both bounds move monotonically with i, so the first and last row decide.
THRIFTY_HD KeyRange attention_tile_key_range(int64_t i0, int64_t i1, int64_t seqlen_q, int64_t seqlen_k,
                                             int window_left, int window_right) {
  if (i1 <= i0) return KeyRange{0, 0};
  const KeyRange a = attention_key_range(i0, seqlen_q, seqlen_k, window_left, window_right);
  const KeyRange b = attention_key_range(i1 - 1, seqlen_q, seqlen_k, window_left, window_right);
  int64_t lo = a.lo, hi = b.hi;
  if (lo >= hi) return KeyRange{0, 0};
  return KeyRange{lo, hi};
}

// The query rows that see key j form one interval too (for the backward over key tiles).
struct QueryRange {
  int64_t lo, hi;
};

THRIFTY_HD QueryRange attention_query_range(int64_t j, int64_t seqlen_q, int64_t seqlen_k, int window_left,
                                            int window_right) {
  // j >= i + off - wl  <=> i <= j - off + wl ;  j <= i + off + wr  <=> i >= j - off - wr
  const int64_t off = seqlen_k - seqlen_q;
  int64_t lo = window_right < 0 ? 0 : j - off - window_right;
  int64_t hi = window_left < 0 ? seqlen_q : j - off + window_left + 1;
  if (lo < 0) lo = 0;
  if (hi > seqlen_q) hi = seqlen_q;
  return QueryRange{lo, hi};
}

// True when every (i, j) with i in [i0, i1), j in [j0, j1) is visible: such a tile needs no
// per-element mask.
THRIFTY_HD bool attention_tile_unmasked(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t seqlen_q,
                                        int64_t seqlen_k, int window_left, int window_right) {
  const int64_t off = seqlen_k - seqlen_q;
  // the tightest constraints come from the corners
  if (window_left >= 0 && j0 < (i1 - 1) + off - window_left) return false;
  if (window_right >= 0 && j1 - 1 > i0 + off + window_right) return false;
  return true;
}

}  // namespace thrifty
