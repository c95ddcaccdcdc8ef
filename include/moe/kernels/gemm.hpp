// GEMM: C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, row-major, leading dimensions.
// op(A) = A (A is [M,K], lda >= K) or Aᵀ when trans_a (A is [K,M], lda >= M); same for B.
// beta == 0 overwrites C without reading it.
//
// gemm packs panels of A and B and runs a 6x16 AVX2/FMA micro-kernel (scalar fallback when
// built without AVX2). Threads split the rows of C, never the sum over k, so every element is
// accumulated in the same order for any thread count. Inside an OpenMP parallel region it
// runs serially. gemm_reference is the plain triple loop with the same signature, for tests.
#pragma once

#include <cstdint>

namespace moe {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                    int64_t ldc);

}  // namespace moe
