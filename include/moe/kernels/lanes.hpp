// The loop of the eight-lane kernels (exp_floats, log1p_floats): each chunk of eight values
// goes through the vector code, unless one of its lanes is special (outside what the vector
// code handles), then the chunk, like the last n % 8 values, goes through the scalar code one
// value at a time.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace moe {

// y[i] = f(x[i]) for i < n, y may be x: special(v) tells whether a chunk has a special lane,
// vec(v) computes a chunk, scalar(x) one value.
template <class Special, class Vec, class Scalar>
inline void map_floats8(const float* x, float* y, int64_t n, Special special, Vec vec, Scalar scalar) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    if (special(v)) {
      for (int64_t j = i; j < i + 8; ++j) y[j] = scalar(x[j]);
      continue;
    }
    _mm256_storeu_ps(y + i, vec(v));
  }
  for (; i < n; ++i) y[i] = scalar(x[i]);
}

}  // namespace moe
#endif
