// Fused multi-tensor AdamW / 8-bit AdamW / Lion on CPU, and the multi-tensor L2 norm.
//
// thrifty::parallel_for runs over the chunks of all tensors at once; each chunk streams its
// elements once through Vec registers: read p (or the float32 master), g, m, v; write p
// (+ master), m, v. 8-bit AdamW works one 256-element block at a time: look m and v up from
// their codes, update, find the new block absmax, requantize to the nearest code by table lookup.
#include "cpu/optim/optim_kernels.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "cpu/optim/optim_vec.h"

namespace thrifty::cpu::THRIFTY_ISA_NS {
namespace {

template <bool kTail, typename T>
THRIFTY_INLINE Vec ld(const T* p, int n) {
  if constexpr (kTail) return Vec::load(p, n); else return Vec::load(p);
}
template <bool kTail, typename T>
THRIFTY_INLINE void st(Vec v, T* p, int n) {
  if constexpr (kTail) v.store(p, n); else v.store(p);
}

// Constants of one tensor's step.
struct StepConsts {
  Vec decay, coef, b1, omb1, b2, omb2, step_size, inv_bc2, eps, lr;
};

THRIFTY_INLINE StepConsts consts(const OptimStepParams& s, const OptimTensor& t) {
  StepConsts c;
  c.decay = Vec::set1(1.0f - s.lr * s.weight_decay);
  c.coef = Vec::set1(s.grad_coef);
  c.b1 = Vec::set1(s.beta1);
  c.omb1 = Vec::set1(s.one_minus_beta1);
  c.b2 = Vec::set1(s.beta2);
  c.omb2 = Vec::set1(s.one_minus_beta2);
  c.step_size = Vec::set1(s.lr / t.bias_c1);
  c.inv_bc2 = Vec::set1(1.0f / t.bias_c2_sqrt);
  c.eps = Vec::set1(s.eps);
  c.lr = Vec::set1(s.lr);
  return c;
}

// AdamW on W (or the n < W tail) elements in registers; m, v updated in place.
THRIFTY_INLINE Vec adamw_math(const StepConsts& c, Vec p, Vec g, Vec& m, Vec& v) {
  g = g * c.coef;
  p = p * c.decay;
  m = fma(c.omb1, g - m, m);  // lerp(m, g, 1 - beta1)
  v = fma(c.omb2 * g, g, v * c.b2);  // (1 - b2) g first, as torch: g * g overflows from |g| ~ 1.8e19
  Vec denom = fma(vsqrt(v), c.inv_bc2, c.eps);
  return p - c.step_size * (m / denom);
}

template <bool kTail, typename P, bool kMaster>
THRIFTY_INLINE void adamw_vec(const StepConsts& c, const OptimTensor& t, int64_t i, int n) {
  P* p = static_cast<P*>(t.param) + i;
  const P* g = static_cast<const P*>(t.grad) + i;
  float* m = static_cast<float*>(t.exp_avg) + i;
  float* v = static_cast<float*>(t.exp_avg_sq) + i;
  Vec pv = kMaster ? ld<kTail>(t.master + i, n) : ld<kTail>(p, n);
  Vec mv = ld<kTail>(m, n), vv = ld<kTail>(v, n);
  pv = adamw_math(c, pv, ld<kTail>(g, n), mv, vv);
  st<kTail>(mv, m, n);
  st<kTail>(vv, v, n);
  if constexpr (kMaster) st<kTail>(pv, t.master + i, n);
  st<kTail>(pv, p, n);
}

template <typename P, bool kMaster>
void adamw_chunk(const OptimStepParams& s, const OptimTensor& t, int64_t begin, int64_t end) {
  const StepConsts c = consts(s, t);
  int64_t i = begin;
  for (; i + Vec::W <= end; i += Vec::W) adamw_vec<false, P, kMaster>(c, t, i, Vec::W);
  if (i < end) adamw_vec<true, P, kMaster>(c, t, i, static_cast<int>(end - i));
}

// Lion: c = lerp(m, g, 1 - beta1); p = p * (1 - lr wd) - lr sign(c); m = lerp(m, g, 1 - beta2).
template <bool kTail, typename P, bool kMaster>
THRIFTY_INLINE void lion_vec(const StepConsts& c, const OptimTensor& t, int64_t i, int n) {
  P* p = static_cast<P*>(t.param) + i;
  const P* g = static_cast<const P*>(t.grad) + i;
  float* m = static_cast<float*>(t.exp_avg) + i;
  Vec pv = kMaster ? ld<kTail>(t.master + i, n) : ld<kTail>(p, n);
  Vec mv = ld<kTail>(m, n);
  Vec gv = ld<kTail>(g, n) * c.coef;
  Vec u = fma(c.omb1, gv - mv, mv);
  pv = pv * c.decay - c.lr * vsign(u);
  mv = fma(c.omb2, gv - mv, mv);
  st<kTail>(mv, m, n);
  if constexpr (kMaster) st<kTail>(pv, t.master + i, n);
  st<kTail>(pv, p, n);
}

template <typename P, bool kMaster>
void lion_chunk(const OptimStepParams& s, const OptimTensor& t, int64_t begin, int64_t end) {
  const StepConsts c = consts(s, t);
  int64_t i = begin;
  for (; i + Vec::W <= end; i += Vec::W) lion_vec<false, P, kMaster>(c, t, i, Vec::W);
  if (i < end) lion_vec<true, P, kMaster>(c, t, i, static_cast<int>(end - i));
}

// 8-bit AdamW on W (or the n < W tail) elements of one block: m and v come in dequantized (the
// full-W path looks them up from the codes in registers, the tail from the block buffers), the
// updated m and v go to the block buffers for the requantization pass, and the block maxima grow.
template <bool kTail, typename P, bool kMaster>
THRIFTY_INLINE void adamw8_vec(const StepConsts& c, const OptimTensor& t, int64_t i, int n, Vec mv, Vec vv,
                               float* mb, float* vb, Vec& mmax, Vec& vmax) {
  P* p = static_cast<P*>(t.param) + i;
  const P* g = static_cast<const P*>(t.grad) + i;
  Vec pv = kMaster ? ld<kTail>(t.master + i, n) : ld<kTail>(p, n);
  pv = adamw_math(c, pv, ld<kTail>(g, n), mv, vv);
  st<kTail>(mv, mb, n);
  st<kTail>(vv, vb, n);
  mmax = max(mmax, vabs(mv));  // tail lanes hold 0 (loaded as 0, lerp of zeros)
  vmax = max(vmax, vv);
  if constexpr (kMaster) st<kTail>(pv, t.master + i, n);
  st<kTail>(pv, p, n);
}

// One 256-element block per iteration, two passes over it, both in vector registers:
//  1. look m and v up from their codes (dequant8), AdamW, write p (+ master), keep the new m and v
//     in an L1 buffer and their block maxima in registers;
//  2. normalize by the new absmax (IEEE division, as the reference) and requantize with one table
//     lookup per lane, no search, no branch (quant8_store; the rule is in common/optim_quant.h).
// The buffer is needed because the codes depend on the block's absmax, known only after pass 1.
// Block tails (the last n % 256 elements of a tensor) take the same math with scalar lookups.
// kVbmi (avx512_bf16 level on a CPU with AVX512-VBMI): pass 1 first dequantizes the block's codes into
// the buffers 64 at a time with byte permutes instead of gathers (dequant64_vbmi), the same floats.
template <typename P, bool kMaster, bool kVbmi>
void adamw8bit_chunk(const OptimStepParams& s, const OptimTensor& t, int64_t begin, int64_t end) {
  const StepConsts c = consts(s, t);
  const float* qm = s.qmap_m;
  const float* qv = s.qmap_v;
  const QuantLut& lm = *s.lut_m;
  const QuantLut& lv = *s.lut_v;
  const QuantConsts qcm = quant_consts(lm), qcv = quant_consts(lv);
  alignas(64) float mb[kQuantBlock];
  alignas(64) float vb[kQuantBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kQuantBlock) {
    const int nb = static_cast<int>(end - b0 < kQuantBlock ? end - b0 : kQuantBlock);
    const int64_t blk = b0 / kQuantBlock;
    uint8_t* cm = static_cast<uint8_t*>(t.exp_avg) + b0;
    uint8_t* cv = static_cast<uint8_t*>(t.exp_avg_sq) + b0;
    const float am = t.absmax_m[blk], av = t.absmax_v[blk];
    const Vec amv = Vec::set1(am), avv = Vec::set1(av);
    Vec mmax = Vec::zero(), vmax = Vec::zero();
    const auto dequant_scalar = [&](int from) {  // the elements past the vector loops, into the buffers
      for (int k = from; k < nb; ++k) {
        mb[k] = qm[cm[k]] * am;
        vb[k] = qv[cv[k]] * av;
      }
    };
    int j = 0;
    if constexpr (kVbmi) {
#if defined(THRIFTY_AVX512_BF16)
      for (; j + 64 <= nb; j += 64) {
        dequant64_vbmi(cm + j, lm.planes, amv, mb + j);
        dequant64_vbmi(cv + j, lv.planes, avv, vb + j);
      }
#endif
      dequant_scalar(j);
      for (j = 0; j + Vec::W <= nb; j += Vec::W)
        adamw8_vec<false, P, kMaster>(c, t, b0 + j, Vec::W, Vec::load(mb + j), Vec::load(vb + j), mb + j, vb + j,
                                      mmax, vmax);
    } else {
      for (; j + Vec::W <= nb; j += Vec::W)
        adamw8_vec<false, P, kMaster>(c, t, b0 + j, Vec::W, dequant8(cm + j, qm, amv), dequant8(cv + j, qv, avv),
                                      mb + j, vb + j, mmax, vmax);
      dequant_scalar(j);
    }
    if (j < nb) {
      const int n = nb - j;
      adamw8_vec<true, P, kMaster>(c, t, b0 + j, n, Vec::load(mb + j, n), Vec::load(vb + j, n), mb + j, vb + j, mmax,
                                   vmax);
    }
    const float nam = mmax.reduce_max(), nav = vmax.reduce_max();
    t.absmax_m[blk] = nam;
    t.absmax_v[blk] = nav;
    // x / absmax, or 0 for an all-zero block (x * 0 / 1: the same zeros the reference gives)
    const float smf = nam > 0.0f ? nam : 1.0f, svf = nav > 0.0f ? nav : 1.0f;
    const float kmf = nam > 0.0f ? 1.0f : 0.0f, kvf = nav > 0.0f ? 1.0f : 0.0f;
    const Vec sm = Vec::set1(smf), sv = Vec::set1(svf), km = Vec::set1(kmf), kv = Vec::set1(kvf);
    int k = 0;
    for (; k + Vec::W <= nb; k += Vec::W) {
      quant8_store(qcm, (Vec::load(mb + k) * km) / sm, cm + k);
      quant8_store(qcv, (Vec::load(vb + k) * kv) / sv, cv + k);
    }
    for (; k < nb; ++k) {  // the same IEEE operations, one lane
      cm[k] = quant_code(lm, (mb[k] * kmf) / smf);
      cv[k] = quant_code(lv, (vb[k] * kvf) / svf);
    }
  }
}

using ChunkFn = void (*)(const OptimStepParams&, const OptimTensor&, int64_t, int64_t);

template <typename P>
ChunkFn pick_for(OptimKind kind, bool master) {
  switch (kind) {
    case OptimKind::adamw: return master ? &adamw_chunk<P, true> : &adamw_chunk<P, false>;
    case OptimKind::adamw8bit:
#if defined(THRIFTY_AVX512_BF16)
      if (cpu_has_avx512_vbmi()) return master ? &adamw8bit_chunk<P, true, true> : &adamw8bit_chunk<P, false, true>;
#endif
      return master ? &adamw8bit_chunk<P, true, false> : &adamw8bit_chunk<P, false, false>;
    default: return master ? &lion_chunk<P, true> : &lion_chunk<P, false>;
  }
}

template <typename T>
float sumsq(const T* x, int64_t n) {
  Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  int64_t i = 0;
  for (; i + 4 * Vec::W <= n; i += 4 * Vec::W) {
    Vec x0 = Vec::load(x + i), x1 = Vec::load(x + i + Vec::W);
    Vec x2 = Vec::load(x + i + 2 * Vec::W), x3 = Vec::load(x + i + 3 * Vec::W);
    a0 = fma(x0, x0, a0);
    a1 = fma(x1, x1, a1);
    a2 = fma(x2, x2, a2);
    a3 = fma(x3, x3, a3);
  }
  for (; i + Vec::W <= n; i += Vec::W) {
    Vec x0 = Vec::load(x + i);
    a0 = fma(x0, x0, a0);
  }
  if (i < n) {
    Vec x0 = Vec::load(x + i, static_cast<int>(n - i));
    a0 = fma(x0, x0, a0);
  }
  return ((a0 + a1) + (a2 + a3)).reduce_add();
}

}  // namespace

void optim_step(const OptimStepParams& s) {
  ChunkFn fn;
  switch (s.pdtype) {
    case DType::bf16: fn = pick_for<bf16_t>(s.kind, s.has_master); break;
    case DType::f16: fn = pick_for<f16_t>(s.kind, s.has_master); break;
    default: fn = pick_for<float>(s.kind, s.has_master); break;
  }
  parallel_for(0, s.total_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t ti = optim_find_tensor(s.chunk_offsets, s.num_tensors, c);
      const OptimTensor& t = s.tensors[ti];
      const int64_t begin = (c - s.chunk_offsets[ti]) * s.chunk_size;
      const int64_t end = begin + s.chunk_size < t.n ? begin + s.chunk_size : t.n;
      fn(s, t, begin, end);
    }
  });
}

void optim_l2norm_partials(const L2NormParams& p) {
  parallel_for(0, p.total_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t ti = optim_find_tensor(p.chunk_offsets, p.num_tensors, c);
      const OptimTensor& t = p.tensors[ti];
      const int64_t begin = (c - p.chunk_offsets[ti]) * p.chunk_size;
      const int64_t n = (begin + p.chunk_size < t.n ? begin + p.chunk_size : t.n) - begin;
      float s;
      switch (t.dtype) {
        case DType::bf16: s = sumsq(static_cast<const bf16_t*>(t.grad) + begin, n); break;
        case DType::f16: s = sumsq(static_cast<const f16_t*>(t.grad) + begin, n); break;
        default: s = sumsq(static_cast<const float*>(t.grad) + begin, n); break;
      }
      p.partial[c] = s;
    }
  });
}

}  // namespace thrifty::cpu::THRIFTY_ISA_NS
