// When a loop is worth an OpenMP team: one threshold for every elementwise and row loop, so
// the trade-off (a parallel region costs a few microseconds) is tuned in one place.
#pragma once

#include <cstdint>

namespace moe {

// Loops over fewer elements than this run on the calling thread.
constexpr int64_t kParallelMinWork = 16384;

}  // namespace moe
