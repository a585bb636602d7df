// Standalone, torch-free check of the CUDA FlashAttention kernels against a float64 CPU
// reference (forward out/lse, backward dq/dk/dv in atomic and deterministic modes, bitwise
// repeatability of the deterministic mode). Build and run on a GPU machine:
//   tests/cuda_standalone/build.sh && ./build/flash_check
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/attention/attention_launch.h"

using namespace thrifty;

#define CK(x)                                                                  \
  do {                                                                         \
    cudaError_t e_ = (x);                                                      \
    if (e_ != cudaSuccess) {                                                   \
      printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      exit(2);                                                                 \
    }                                                                          \
  } while (0)

static float round16(float x, bool bf) {
  if (bf) return __bfloat162float(__float2bfloat16_rn(x));
  return __half2float(__float2half_rn(x));
}
static uint16_t bits16(float x, bool bf) {
  uint16_t r;
  if (bf) { __nv_bfloat16 h = __float2bfloat16_rn(x); memcpy(&r, &h, 2); }
  else { __half h = __float2half_rn(x); memcpy(&r, &h, 2); }
  return r;
}
static float from16(uint16_t b, bool bf) {
  if (bf) { __nv_bfloat16 h; memcpy(&h, &b, 2); return __bfloat162float(h); }
  __half h; memcpy(&h, &b, 2); return __half2float(h);
}

struct Case {
  const char* name;
  bool bf;
  int batch, heads, kv_heads, head_dim, sq, sk;
  bool causal;
  int wl, wr;
  float softcap;
  std::vector<int> lens_q, lens_k;  // varlen when non-empty
};

static int failures = 0;

static void report(const char* what, const std::vector<double>& ref, const std::vector<float>& got, double tol_rel,
                   const std::vector<char>* valid = nullptr) {
  double maxref = 0, maxerr = 0;
  size_t bad = 0, nan = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (valid && !(*valid)[i]) continue;
    maxref = std::max(maxref, std::fabs(ref[i]));
  }
  for (size_t i = 0; i < ref.size(); ++i) {
    if (valid && !(*valid)[i]) continue;
    if (std::isnan(got[i])) ++nan;
    double e = std::fabs(ref[i] - got[i]);
    if (!(e <= maxerr)) maxerr = std::isnan(e) ? INFINITY : std::max(maxerr, e);
    if (!(e <= tol_rel * maxref + 1e-4)) ++bad;
  }
  const bool ok = bad == 0 && nan == 0;
  if (!ok) ++failures;
  printf("  %-4s %s max|ref| %.3e max err %.3e (rel %.2e) bad %zu nan %zu\n", what, ok ? "ok  " : "FAIL", maxref, maxerr,
         maxref > 0 ? maxerr / maxref : 0.0, bad, nan);
}

static void run_case(const Case& c) {
  const bool varlen = !c.lens_q.empty();
  const int B = varlen ? int(c.lens_q.size()) : c.batch;
  std::vector<int> cq(B + 1, 0), ck(B + 1, 0);
  int maxq = 0, maxk = 0;
  for (int b = 0; b < B; ++b) {
    const int lq = varlen ? c.lens_q[b] : c.sq, lk = varlen ? c.lens_k[b] : c.sk;
    cq[b + 1] = cq[b] + lq;
    ck[b + 1] = ck[b] + lk;
    maxq = std::max(maxq, lq);
    maxk = std::max(maxk, lk);
  }
  const int TQ = cq[B], TK = ck[B], H = c.heads, HK = c.kv_heads, D = c.head_dim, G = H / HK;
  printf("%s: %s B=%d H=%d Hk=%d D=%d sq=%d sk=%d causal=%d window=(%d,%d) softcap=%g%s\n", c.name,
         c.bf ? "bf16" : "f16", B, H, HK, D, varlen ? maxq : c.sq, varlen ? maxk : c.sk, c.causal, c.wl, c.wr,
         c.softcap, varlen ? " varlen" : "");
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](std::vector<float>& x, size_t n) {
    x.resize(n);
    for (auto& e : x) e = round16(nd(rng), c.bf);
  };
  std::vector<float> q, k, v, dout;
  fill(q, size_t(TQ) * H * D);
  fill(k, size_t(TK) * HK * D);
  fill(v, size_t(TK) * HK * D);
  fill(dout, size_t(TQ) * H * D);
  const double scale = 1.0 / std::sqrt(double(D));
  int wl = c.wl, wr = c.causal ? 0 : c.wr;

  // reference (rows laid out as (total, heads, D): batched = varlen with equal lengths)
  std::vector<double> ro(q.size(), 0), rlse(size_t(H) * TQ, 0), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0);
  std::vector<char> lse_valid(size_t(H) * TQ, 1);
  for (int b = 0; b < B; ++b) {
    const int lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b], off = lk - lq;
    for (int h = 0; h < H; ++h) {
      const int kh = h / G;
      std::vector<double> s(lk), pr(lk), dp(lk);
      for (int i = 0; i < lq; ++i) {
        const float* qi = &q[(size_t(cq[b] + i) * H + h) * D];
        double mx = -INFINITY;
        std::vector<char> vis(lk);
        for (int j = 0; j < lk; ++j) {
          vis[j] = (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr);
          const float* kj = &k[(size_t(ck[b] + j) * HK + kh) * D];
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += double(qi[d]) * kj[d];
          acc *= scale;
          if (c.softcap > 0) acc = c.softcap * std::tanh(acc / c.softcap);
          s[j] = acc;
          if (vis[j]) mx = std::max(mx, acc);
        }
        double sum = 0;
        for (int j = 0; j < lk; ++j) {
          pr[j] = vis[j] ? std::exp(s[j] - mx) : 0;
          sum += pr[j];
        }
        const size_t orow = (size_t(cq[b] + i) * H + h) * D;
        rlse[size_t(h) * TQ + cq[b] + i] = sum > 0 ? mx + std::log(sum) : -INFINITY;
        if (sum == 0) continue;
        for (int j = 0; j < lk; ++j) pr[j] /= sum;
        for (int j = 0; j < lk; ++j) {
          if (pr[j] == 0) continue;
          const float* vj = &v[(size_t(ck[b] + j) * HK + kh) * D];
          for (int d = 0; d < D; ++d) ro[orow + d] += pr[j] * vj[d];
        }
        const float* doi = &dout[orow];
        double Dsum = 0;
        for (int d = 0; d < D; ++d) Dsum += double(doi[d]) * ro[orow + d];
        for (int j = 0; j < lk; ++j) {
          if (pr[j] == 0) continue;
          const size_t kr = (size_t(ck[b] + j) * HK + kh) * D;
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += double(doi[d]) * v[kr + d];
          double ds = pr[j] * (acc - Dsum);
          if (c.softcap > 0) {
            const double th = s[j] / c.softcap;
            ds *= 1 - th * th;
          }
          ds *= scale;
          for (int d = 0; d < D; ++d) {
            rdq[orow + d] += ds * k[kr + d];
            rdk[kr + d] += ds * qi[d];
            rdv[kr + d] += pr[j] * doi[d];
          }
        }
      }
    }
  }

  // device buffers
  auto up = [&](const std::vector<float>& x) {
    std::vector<uint16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = bits16(x[i], c.bf);
    void* d = nullptr;
    CK(cudaMalloc(&d, std::max<size_t>(h.size() * 2, 16)));
    CK(cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    return d;
  };
  auto down = [&](const void* d, size_t n) {
    std::vector<uint16_t> h(n);
    CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> r(n);
    for (size_t i = 0; i < n; ++i) r[i] = from16(h[i], c.bf);
    return r;
  };
  void *dq_ = up(q), *dk_ = up(k), *dv_ = up(v), *ddo = up(dout);
  void *dO, *ddq, *ddk, *ddv;
  float* dlse;
  CK(cudaMalloc(&dO, q.size() * 2 + 16));
  CK(cudaMalloc(&ddq, q.size() * 2 + 16));
  CK(cudaMalloc(&ddk, k.size() * 2 + 16));
  CK(cudaMalloc(&ddv, v.size() * 2 + 16));
  CK(cudaMalloc(&dlse, size_t(H) * TQ * 4 + 16));
  int *dcq, *dck;
  CK(cudaMalloc(&dcq, (B + 1) * 4));
  CK(cudaMalloc(&dck, (B + 1) * 4));
  CK(cudaMemcpy(dcq, cq.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dck, ck.data(), (B + 1) * 4, cudaMemcpyHostToDevice));

  AttentionBwdParams p;
  p.dtype = c.bf ? DType::bf16 : DType::f16;
  p.batch = B;
  p.heads = H;
  p.kv_heads = HK;
  p.head_dim = D;
  p.seqlen_q = varlen ? maxq : c.sq;
  p.seqlen_k = varlen ? maxk : c.sk;
  p.varlen = varlen;
  p.cu_seqlens_q = varlen ? dcq : nullptr;
  p.cu_seqlens_k = varlen ? dck : nullptr;
  p.q = dq_; p.k = dk_; p.v = dv_; p.out = dO; p.lse = dlse;
  // batched: (B, S, H, D) row major == (total, H, D) rows; lse (B, H, S)
  const int64_t bq = varlen ? 0 : int64_t(c.sq) * H * D, bk = varlen ? 0 : int64_t(c.sk) * HK * D;
  p.q_batch_stride = bq; p.q_row_stride = H * D; p.q_head_stride = D;
  p.k_batch_stride = bk; p.k_row_stride = HK * D; p.k_head_stride = D;
  p.v_batch_stride = bk; p.v_row_stride = HK * D; p.v_head_stride = D;
  p.o_batch_stride = bq; p.o_row_stride = H * D; p.o_head_stride = D;
  p.lse_batch_stride = varlen ? 0 : int64_t(H) * c.sq;
  p.lse_head_stride = varlen ? TQ : c.sq;
  p.softmax_scale = float(scale);
  p.causal = c.causal;
  p.window_left = c.wl;
  p.window_right = c.causal ? 0 : c.wr;
  p.softcap = c.softcap;
  p.dout = ddo; p.dq = ddq; p.dk = ddk; p.dv = ddv;
  p.do_batch_stride = bq; p.do_row_stride = H * D; p.do_head_stride = D;
  p.dq_batch_stride = bq; p.dq_row_stride = H * D; p.dq_head_stride = D;
  p.dk_batch_stride = bk; p.dk_row_stride = HK * D; p.dk_head_stride = D;
  p.dv_batch_stride = bk; p.dv_row_stride = HK * D; p.dv_head_stride = D;

  cuda::launch_flash_attention_fwd(p, 0);
  CK(cudaDeviceSynchronize());
  std::vector<float> go = down(dO, q.size());
  std::vector<float> glse_raw(size_t(H) * TQ);
  CK(cudaMemcpy(glse_raw.data(), dlse, glse_raw.size() * 4, cudaMemcpyDeviceToHost));
  // reorder the device lse to (H, TQ)
  std::vector<float> glse(size_t(H) * TQ);
  std::vector<double> rl(size_t(H) * TQ);
  size_t ninf_mismatch = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < cq[b + 1] - cq[b]; ++i) {
        const size_t dst = size_t(h) * TQ + cq[b] + i;
        const size_t src = varlen ? dst : size_t(b) * H * c.sq + size_t(h) * c.sq + i;
        glse[dst] = glse_raw[src];
        const bool ri = std::isinf(rlse[dst]), gi = std::isinf(glse[dst]) && glse[dst] < 0;
        if (ri != gi) ++ninf_mismatch;
        lse_valid[dst] = !ri;
        rl[dst] = ri ? 0 : rlse[dst];
        if (ri) glse[dst] = 0;
      }
  const double tol = c.bf ? 2e-2 : 4e-3;
  report("out", ro, go, tol);
  report("lse", rl, glse, 1e-3, &lse_valid);
  if (ninf_mismatch) {
    printf("  lse -inf mismatch on %zu rows FAIL\n", ninf_mismatch);
    ++failures;
  }

  // recompute Dsum-consistent reference is the double one; backward with the device out/lse
  std::vector<float> det_dq;
  for (int det = 0; det < 2; ++det) {
    p.deterministic = det;
    const size_t ws = cuda::flash_attention_bwd_workspace_bytes(p);
    void* w;
    CK(cudaMalloc(&w, ws + 16));
    p.workspace = w;
    CK(cudaMemset(ddq, 0xff, q.size() * 2));
    CK(cudaMemset(ddk, 0xff, k.size() * 2));
    CK(cudaMemset(ddv, 0xff, v.size() * 2));
    cuda::launch_flash_attention_bwd(p, 0);
    CK(cudaDeviceSynchronize());
    std::vector<float> gdq = down(ddq, q.size()), gdk = down(ddk, k.size()), gdv = down(ddv, v.size());
    printf(" backward (%s):\n", det ? "deterministic" : "atomic dq");
    report("dq", rdq, gdq, tol * 1.5);
    report("dk", rdk, gdk, tol * 1.5);
    report("dv", rdv, gdv, tol);
    if (det) {
      // bitwise repeatability
      CK(cudaMemset(ddq, 0, q.size() * 2));
      CK(cudaMemset(ddk, 0, k.size() * 2));
      cuda::launch_flash_attention_bwd(p, 0);
      CK(cudaDeviceSynchronize());
      std::vector<float> gdq2 = down(ddq, q.size()), gdk2 = down(ddk, k.size());
      const bool same = memcmp(gdq.data(), gdq2.data(), gdq.size() * 4) == 0 &&
                        memcmp(gdk.data(), gdk2.data(), gdk.size() * 4) == 0;
      printf("  deterministic rerun bitwise identical: %s\n", same ? "ok" : "FAIL");
      if (!same) ++failures;
    }
    CK(cudaFree(w));
  }
  cudaFree(dq_); cudaFree(dk_); cudaFree(dv_); cudaFree(ddo); cudaFree(dO); cudaFree(ddq); cudaFree(ddk);
  cudaFree(ddv); cudaFree(dlse); cudaFree(dcq); cudaFree(dck);
}

static void bench(bool causal, int D, int S) {
  AttentionBwdParams p;
  const int B = 16384 / S > 0 ? 16384 / S : 1, H = 2048 / D;
  p.dtype = DType::bf16; p.batch = B; p.heads = H; p.kv_heads = H; p.head_dim = D; p.seqlen_q = S; p.seqlen_k = S;
  const size_t n = size_t(B) * S * H * D;
  void *q, *k, *v, *o, *dO, *dq, *dk, *dv; float* lse;
  CK(cudaMalloc(&q, n * 2)); CK(cudaMalloc(&k, n * 2)); CK(cudaMalloc(&v, n * 2)); CK(cudaMalloc(&o, n * 2));
  CK(cudaMalloc(&dO, n * 2)); CK(cudaMalloc(&dq, n * 2)); CK(cudaMalloc(&dk, n * 2)); CK(cudaMalloc(&dv, n * 2));
  CK(cudaMalloc(&lse, size_t(B) * H * S * 4));
  CK(cudaMemset(q, 0x3c, n * 2)); CK(cudaMemset(k, 0x3c, n * 2)); CK(cudaMemset(v, 0x3c, n * 2));
  CK(cudaMemset(dO, 0x3c, n * 2));
  p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse; p.dout = dO; p.dq = dq; p.dk = dk; p.dv = dv;
  const int64_t bs = int64_t(S) * H * D;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride =
      p.dk_batch_stride = p.dv_batch_stride = bs;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride =
      p.dk_row_stride = p.dv_row_stride = H * D;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride =
      p.dk_head_stride = p.dv_head_stride = D;
  p.lse_batch_stride = int64_t(H) * S; p.lse_head_stride = S;
  p.softmax_scale = 1.0f / std::sqrt(float(D)); p.causal = causal; p.window_right = causal ? 0 : -1;
  void* w; CK(cudaMalloc(&w, cuda::flash_attention_bwd_workspace_bytes(p)));
  p.workspace = w;
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  double flops = 4.0 * B * double(S) * S * H * D * (causal ? 0.5 : 1.0);
  float ms;
  for (int i = 0; i < 3; ++i) cuda::launch_flash_attention_fwd(p, 0);
  cudaEventRecord(e0); for (int i = 0; i < 10; ++i) cuda::launch_flash_attention_fwd(p, 0); cudaEventRecord(e1);
  CK(cudaEventSynchronize(e1)); cudaEventElapsedTime(&ms, e0, e1); ms /= 10;
  printf("bench fwd D=%d S=%d causal=%d B=%d H=%d: %.3f ms %.1f TFLOP/s\n", D, S, causal, B, H, ms, flops / ms / 1e9);
  for (int det = 0; det < 2; ++det) {
    p.deterministic = det;
    for (int i = 0; i < 2; ++i) cuda::launch_flash_attention_bwd(p, 0);
    cudaEventRecord(e0); for (int i = 0; i < 5; ++i) cuda::launch_flash_attention_bwd(p, 0); cudaEventRecord(e1);
    CK(cudaEventSynchronize(e1)); cudaEventElapsedTime(&ms, e0, e1); ms /= 5;
    printf("bench bwd%s D=%d S=%d causal=%d: %.3f ms %.1f TFLOP/s\n", det ? "(det)" : "", D, S, causal, ms,
           2.5 * flops / ms / 1e9);
  }
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(dO); cudaFree(dq); cudaFree(dk); cudaFree(dv);
  cudaFree(lse); cudaFree(w);
}

int main(int argc, char** argv) {
  std::vector<Case> cases = {
      {"basic", true, 2, 4, 2, 128, 255, 255, false, -1, -1, 0.f, {}, {}},
      {"causal sq<sk", true, 1, 4, 1, 128, 100, 300, true, -1, -1, 0.f, {}, {}},
      {"window fp16", false, 2, 2, 2, 64, 200, 200, false, 32, 8, 0.f, {}, {}},
      {"hd80 softcap gqa4", true, 1, 8, 2, 80, 129, 97, false, -1, -1, 5.f, {}, {}},
      {"hd256 causal", true, 1, 2, 1, 256, 130, 130, true, -1, -1, 0.f, {}, {}},
      {"hd96 fp16 gqa8", false, 1, 8, 1, 96, 17, 17, false, -1, -1, 0.f, {}, {}},
      {"seqlen 1", true, 2, 4, 4, 128, 1, 77, true, -1, -1, 0.f, {}, {}},
      {"hd40 sq>sk causal (empty rows)", true, 1, 2, 2, 40, 90, 40, true, -1, -1, 0.f, {}, {}},
      {"varlen causal", true, 0, 4, 2, 128, 0, 0, true, -1, -1, 0.f, {17, 0, 100, 1}, {17, 5, 130, 64}},
      {"varlen window fp16 hd256", false, 0, 2, 1, 256, 0, 0, false, 20, 3, 0.f, {33, 64}, {33, 80}},
  };
  for (auto& c : cases) run_case(c);
  printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
    for (int S : {1024, 4096, 16384})
      for (bool causal : {false, true}) bench(causal, 128, S);
  }
  return failures ? 1 : 0;
}
