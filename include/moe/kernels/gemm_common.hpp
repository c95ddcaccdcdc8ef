// Pieces the fp32 and bf16 GEMMs (src/kernels/gemm.cpp, gemm_bf16.cpp) share.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/kernels/activations.hpp"

namespace moe::gemm_common {

// Element (r, c) of op(X): X stored [rows, ld] (or transposed when `trans`).
inline float at(const float* X, bool trans, int64_t ld, int64_t r, int64_t c) {
  return trans ? X[c * ld + r] : X[r * ld + c];
}

// v's storage, grown to at least n elements (never shrunk: a thread's scratch).
template <class T>
T* grown(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

// A product over K = 0 with a bias: each of C's M rows is the bias (relu'd when asked).
inline void bias_rows(float* C, int64_t ldc, int64_t M, int64_t N, const float* bias, bool relu) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = relu ? act::relu(bias[j]) : bias[j];
}

}  // namespace moe::gemm_common
