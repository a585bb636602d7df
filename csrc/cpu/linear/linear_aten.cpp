// CPU glue of thrifty.linear: checks, then the ISA-dispatched GEMV core for few rows, or ATen's GEMM
// for many (float32 copies below avx512_bf16, where torch's own bf16/f16 GEMM is slow; bf16 directly at
// the avx512_bf16 level, whose GEMM has native bf16 dot products).
#include <torch/library.h>

#include "common/cpu_isa.h"
#include "common/linear_glue.h"
#include "cpu/linear/linear_kernels.h"

namespace thrifty {
namespace {

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  LinearParams p;
  auto r = linear_prepare("linear", x, weight, bias, p);
  if (p.M == 0 || p.N == 0) return r.y;
  if (p.K == 0) return r.bias.defined() ? r.y.copy_(r.bias.expand_as(r.y)) : r.y.zero_();
  if (p.M <= kLinearGemvMaxM) {
    p.xbuf_stride = (p.K + 31) / 32 * 32;
    auto xbuf = at::empty({p.M * p.xbuf_stride}, x.options().dtype(at::kFloat));
    p.xbuf = xbuf.data_ptr<float>();
    THRIFTY_CPU_DISPATCH(linear_gemv_fwd, p);
    return r.y;
  }
  auto y2 = r.y.view({p.M, p.N});
  const bool native = x.scalar_type() == at::kFloat ||
                      (x.scalar_type() == at::kBFloat16 && cpu_isa_current() == CpuIsa::avx512_bf16);
  if (native) {
    if (r.bias.defined()) at::addmm_out(y2, r.bias, r.x2, weight.t());
    else at::mm_out(y2, r.x2, weight.t());
    return r.y;
  }
  // float32 accumulation and one rounding of (x @ W.T + bias) to the output dtype
  auto wf = weight.to(at::kFloat);
  auto yf = r.bias.defined() ? at::addmm(r.bias.to(at::kFloat), r.x2.to(at::kFloat), wf.t())
                             : at::mm(r.x2.to(at::kFloat), wf.t());
  y2.copy_(yf);
  return r.y;
}

}  // namespace

TORCH_LIBRARY_IMPL(thrifty, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace thrifty
