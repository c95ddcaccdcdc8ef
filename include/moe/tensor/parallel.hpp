// When a loop is worth an OpenMP team: one threshold for every elementwise and row loop, so
// the trade-off (a parallel region costs a few microseconds) is tuned in one place.
#pragma once

#include <omp.h>

#include <cstdint>

namespace moe {

// Loops over fewer elements than this run on the calling thread.
constexpr int64_t kParallelMinWork = 16384;

// body(i) for i in [0, n): shared among the threads by OpenMP's static schedule when
// `parallel` holds and a team can form (more than one thread, not inside a region), else a
// plain loop on the calling thread. Not `#pragma omp parallel for if (...)`: a region whose
// `if` fails still forms a team of one in libgomp and ends it with a futex system call, about
// a hundred of them per decoded character. The bits are the same either way (each i is one
// thread's whole work).
template <class Body>
inline void parallel_for(int64_t n, bool parallel, Body&& body) {
  if (parallel && n > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace moe
