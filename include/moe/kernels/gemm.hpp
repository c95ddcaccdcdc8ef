// GEMM: C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, row-major, leading dimensions.
// op(A) = A (A is [M,K], lda >= K) or Aᵀ when trans_a (A is [K,M], lda >= M); same for B.
// beta == 0 overwrites C without reading it.
//
// gemm packs panels of A and B and runs a micro-kernel. Three kernels exist in every x86
// build: "avx512" (a 12x32 tile, AVX-512 intrinsics), "avx2" (6x16, AVX2/FMA intrinsics),
// each compiled for its instructions whatever the build's flags, and "portable" (6x16,
// plain C++, the build's flags; the only one elsewhere). One is chosen once, at run time:
// the widest the CPU has (avx512 needs AVX-512 F/VL/BW/DQ, avx2 needs AVX2 and FMA), unless
// MOE_GEMM_KERNEL=portable|avx2|avx512 forces one. avx512 and avx2 give the same bits: each
// C element is summed over k by one fma a step, in the same order and k blocks.
// Threads split the rows or the column panels of C, never the sum over k, so every element
// is accumulated in the same order for any thread count, and each row of C the same way
// whatever M is. Inside an OpenMP parallel region it runs serially. gemm_reference is the
// plain triple loop with the same signature, for tests.
#pragma once

#include <cstdint>

namespace moe {

enum class GemmKernel { portable, avx2, avx512 };

// The kernel gemm uses, chosen on the first call. Throws std::runtime_error when
// MOE_GEMM_KERNEL holds another value than portable, avx2 or avx512, or names a kernel this
// CPU cannot run.
GemmKernel gemm_kernel();
const char* gemm_kernel_name(GemmKernel k);
inline const char* gemm_kernel_name() { return gemm_kernel_name(gemm_kernel()); }
// Whether this CPU runs the avx2 kernel (AVX2 and FMA).
bool gemm_cpu_has_avx2();
// Whether this CPU runs the avx512 kernel (AVX-512 F, VL, BW and DQ, and the avx2 kernel).
bool gemm_cpu_has_avx512();
// The choice gemm_kernel makes for MOE_GEMM_KERNEL's value (null or empty: not set).
GemmKernel choose_gemm_kernel(const char* env_value, bool cpu_has_avx2, bool cpu_has_avx512 = false);

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// gemm with the given kernel (tests and benchmarks); the caller checks gemm_cpu_has_avx2 /
// gemm_cpu_has_avx512.
void gemm(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// C = bias + op(A)·op(B), bias [N] the same for every row of C (a linear layer's forward;
// null: zeros), then relu(C) = C > 0 ? C : 0 when relu is set: the bits of gemm with beta 1
// on C filled with the bias rows (and relu after), without those passes over C.
void gemm_bias(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc, bool relu = false);
void gemm_bias(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
               int64_t lda, const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc,
               bool relu = false);

// Grows the calling thread's packing scratch to what any product with at most max_n columns
// needs. Each thread of a parallel region whose threads take products by timing (a dynamic
// schedule over experts) calls it first, so that what a step allocates does not depend on
// which thread drew which product.
void gemm_reserve_thread(int64_t max_n);

// One row, without packing (token-by-token decoding, where packing would cost as much as the
// product): c[0, N] = alpha · a[0, K] · op(B) + beta · c, beta == 0 not reading c. Each
// element is summed over k in order by one fma a step, from 0, then stored as
// alpha · sum + beta · c: the same bits whichever way B is stored (Bᵀ, a Linear's [out, in]
// weight, runs in tiles transposed in registers), avx512's as avx2's; not gemm's k blocks,
// so its bits can differ from the same row computed by gemm when K > 256.
void gemv(bool trans_b, int64_t N, int64_t K, float alpha, const float* a, const float* B, int64_t ldb, float beta,
          float* c);
void gemv(GemmKernel kernel, bool trans_b, int64_t N, int64_t K, float alpha, const float* a, const float* B,
          int64_t ldb, float beta, float* c);

// gemv with B stored [K, N] (trans_b false) over the k where a[k] != 0 only: the rows of B that
// a zero of a multiplies are not read (a relu's output, mostly zeros, times the next layer's
// weight [in, out]). The same bits as gemv(false, ...) when B is finite: each sum starts at
// +0, and an fma of a zero product leaves a sum as it was unless the sum is -0 (a sum can
// only be -0 after a product rounded to it, below 2^-150 in magnitude, and its -0 then
// survives into C only if nothing else is added and beta·c is -0 too).
void gemv_skip_zeros(int64_t N, int64_t K, float alpha, const float* a, const float* B, int64_t ldb, float beta,
                     float* c);
void gemv_skip_zeros(GemmKernel kernel, int64_t N, int64_t K, float alpha, const float* a, const float* B,
                     int64_t ldb, float beta, float* c);

void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                    int64_t ldc);

}  // namespace moe
