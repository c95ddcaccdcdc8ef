#include "moe/kernels/vmath.hpp"

namespace moe {

#if defined(__AVX2__)
bool vmath_vectorized() { return true; }
void log_doubles(const double* u, double* out, int64_t n) {
  for (int64_t i = 0; i + 4 <= n; i += 4) _mm256_storeu_pd(out + i, log_doubles4(_mm256_loadu_pd(u + i)));
}
void cos_doubles(const double* a, double* out, int64_t n) {
  for (int64_t i = 0; i + 4 <= n; i += 4) _mm256_storeu_pd(out + i, cos_doubles4(_mm256_loadu_pd(a + i)));
}
#else
bool vmath_vectorized() { return false; }
void log_doubles(const double*, double*, int64_t) {}
void cos_doubles(const double*, double*, int64_t) {}
#endif

}  // namespace moe
