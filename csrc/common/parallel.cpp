#include "common/parallel.h"

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <thread>

namespace thrifty {

void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx) {
  if (begin >= end) return;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int parallel_num_threads() { return at::get_num_threads(); }

int parallel_threads_used(int64_t items) {
  // Each item spins briefly so one thread cannot drain the range before the others start.
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      volatile double acc = 0;
      for (int j = 0; j < 200000; ++j) acc = acc + j;
    }
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int>(ids.size());
}

}  // namespace thrifty
