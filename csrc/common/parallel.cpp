#include "common/parallel.h"

#include <ATen/Parallel.h>

namespace thrifty {

void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx) {
  if (begin >= end) return;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int parallel_num_threads() { return at::get_num_threads(); }

}  // namespace thrifty
