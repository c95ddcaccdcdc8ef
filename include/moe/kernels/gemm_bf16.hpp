// bf16 GEMM (training.precision = "bf16"): C[M,N] = init + op(A)[M,K] · op(B)[K,N] with A and
// B rounded to bfloat16 and the products summed in fp32. Row-major with leading dimensions,
// op() as in gemm.hpp; init is beta · C (beta == 0: zeros, C not read) or a bias row.
//
// The sum each element gets (both kernels, the same bits): A and B rounded to bf16 by
// to_bf16 (round to nearest even, as VCVTNE2PS2BF16); then, over the pairs of k from 0
// (K odd: a last pair padded with zeros),
//     c = ftz(fma(a[k+1], b[k+1], c)); c = ftz(fma(a[k], b[k], c))
// starting from c = ftz(init), with ftz flushing a result below 2^-126 to a zero of its sign:
// the two fused steps of one VDPBF16PS lane (the odd product first, denormals as zero). The
// product of two bf16 is exact in fp32, so each step rounds once. The result does not depend
// on any blocking, thread count or split: threads take whole tiles of C.
//
// Two kernels, chosen once at run time:
// - "avx512bf16": VDPBF16PS (_mm512_dpbf16_ps) on operands packed once per product into
//   bf16 pairs (k, k+1) with _mm512_cvtne2ps_pbh, a 12x32 tile; needs AVX512-BF16 (and
//   AVX-512 F/VL/BW/DQ);
// - "emulated": the same packing in plain C++ and the two fmas above, compiled for AVX2/FMA
//   where the CPU has them: the same bits (tested against the instruction where it exists),
//   several times slower. MOE_BF16_KERNEL=emulated|avx512bf16 forces one.
#pragma once

#include <cstdint>

namespace moe {

enum class Bf16Kernel { emulated, avx512bf16 };

// Whether this CPU has AVX512-BF16 (and what the avx512 GEMM kernel needs).
bool cpu_has_avx512_bf16();
// The kernel gemm_bf16 uses, chosen on the first call: avx512bf16 where the CPU has it, else
// emulated. Throws std::runtime_error when MOE_BF16_KERNEL holds another value, or names
// avx512bf16 on a CPU without it.
Bf16Kernel bf16_kernel();
Bf16Kernel choose_bf16_kernel(const char* env_value, bool cpu_has_bf16);
const char* bf16_kernel_name(Bf16Kernel k);

// fp32 -> bf16, round to nearest even; zero and denormal inputs give a zero of their sign,
// NaN a quiet NaN (VCVTNE2PS2BF16's rules). from_bf16 is exact.
uint16_t to_bf16(float x);
float from_bf16(uint16_t h);

// C = beta · C + op(A) · op(B) (beta == 0: C not read), in bf16 as above.
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_bf16(Bf16Kernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// C = bias + op(A) · op(B) (bias [N] for every row; null: zeros), then relu when set.
void gemm_bf16_bias(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc, bool relu = false);
void gemm_bf16_bias(Bf16Kernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                    int64_t lda, const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc,
                    bool relu = false);

// The reference for tests: A and B rounded by to_bf16, the products summed in double, then
// C = beta · C + sum (beta == 0: C not read).
void gemm_bf16_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace moe
