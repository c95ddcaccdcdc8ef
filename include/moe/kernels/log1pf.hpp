// log1p for floats, eight at a time, with the bits of this project's C library: glibc 2.36's
// log1pf (the fdlibm algorithm in float arithmetic, without fused multiply-adds) written out
// in AVX2 lanes for 0 <= x < 2^53, the range softplus gives it (log1p of an exp); other
// values go to std::log1p one by one. Checked against std::log1p on every float (a
// throwaway program) and by tests/test_ops.cpp on a sample.
#pragma once

#include <cstdint>

namespace moe {

// y[i] = std::log1p(x[i]) for i < n; y may be x.
void log1p_floats(const float* x, float* y, int64_t n);

// y[i] = act::softplus(x[i]) = x > 20 ? x : log1p(exp(x)), through exp_floats and
// log1p_floats; y may be x.
void softplus_floats(const float* x, float* y, int64_t n);

}  // namespace moe
