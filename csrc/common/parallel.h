// Torch-free parallel loop for the kernel cores, run on ATen's thread pool
// (so torch.set_num_threads is respected). Implemented in parallel.cpp with
// at::parallel_for.
//
// The interface is a plain function pointer + context on purpose: kernel cores are
// compiled once per ISA level, and any out-of-line std:: template they instantiate
// (std::function, say) could be emitted with AVX-512 code and then picked by the
// linker for a scalar caller. A lambda wrapped by parallel_for() below stays inside
// the caller's ISA namespace.
#pragma once
#include <cstdint>

namespace thrifty {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
// Splits [begin, end) into chunks of at least `grain` and calls fn on each, in parallel.
void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx);
int parallel_num_threads();
// How many distinct threads a parallel_for over `items` equal items ran on: the check
// that the kernels really use ATen's pool (tests, `thrifty info`).
int parallel_threads_used(int64_t items);

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_raw(
      begin, end, grain,
      [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace thrifty
