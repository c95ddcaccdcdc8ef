// When a loop is worth an OpenMP team: one threshold for every elementwise and row loop, so
// the trade-off (a parallel region costs a few microseconds) is tuned in one place.
#pragma once

#include <cstdint>

namespace moe {

// Loops over fewer elements than this run on the calling thread.
constexpr int64_t kParallelMinWork = 16384;

// True when rows[0..n) is strictly increasing: the rows are distinct, so per-row updates
// may run in parallel without changing any sum's order.
inline bool strictly_increasing(const int32_t* rows, int64_t n) {
  for (int64_t i = 1; i < n; ++i)
    if (rows[i] <= rows[i - 1]) return false;
  return true;
}

}  // namespace moe
