#include "moe/kernels/gemm_bf16.hpp"

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/kernels/x86.hpp"
#include "moe/kernels/gemm_common.hpp"

#define MOE_ALWAYS_INLINE inline __attribute__((always_inline))
#ifdef MOE_X86
#define MOE_TARGET_BF16 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")))
#endif

namespace moe {

uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0) return uint16_t((u >> 16) & 0x8000u);               // zero, denormal
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);      // NaN, quieted
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                         // nearest even
}

float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

namespace {

// The tile is MR x NR (two 16-float registers a row, 24 accumulators); a task is a block of
// at most MC rows against one panel of NR columns of B.
constexpr int64_t MR = 12, NR = 32, MC = 96;
static_assert(MC % MR == 0, "a row block is whole tiles");

using gemm_common::at;

// The packed form of an operand X seen as [R, K] (op(A), or op(B) transposed): for each tile
// of W rows, ceil(K/2) pairs of W words, word (p, r) holding row r's bf16 of k = 2p (low half)
// and k = 2p + 1 (high half), zeros past R and K. X(r, k) is X[r·ld + k] when along_k, else
// X[k·ld + r]. Packs tiles [t0, t1) at dst (tile t0 first).
using PackFn = void (*)(const float* X, int64_t ld, bool along_k, int64_t R, int64_t K, int64_t W, int64_t t0,
                        int64_t t1, uint32_t* dst);

void pack_scalar(const float* X, int64_t ld, bool along_k, int64_t R, int64_t K, int64_t W, int64_t t0, int64_t t1,
                 uint32_t* dst) {
  const int64_t Kp = (K + 1) / 2;
  for (int64_t t = t0; t < t1; ++t) {
    uint32_t* d = dst + (t - t0) * W * Kp;
    for (int64_t r = 0; r < W; ++r) {
      const int64_t row = t * W + r;
      for (int64_t p = 0; p < Kp; ++p) {
        uint32_t w = 0;
        if (row < R) {
          w = to_bf16(at(X, !along_k, ld, row, 2 * p));
          if (2 * p + 1 < K) w |= uint32_t(to_bf16(at(X, !along_k, ld, row, 2 * p + 1))) << 16;
        }
        d[p * W + r] = w;
      }
    }
  }
}

// c after one step of VDPBF16PS: a result below 2^-126 becomes a zero of its sign.
MOE_ALWAYS_INLINE float ftz(float c) { return std::fabs(c) < FLT_MIN ? std::copysign(0.f, c) : c; }
MOE_ALWAYS_INLINE float low_bf16(uint32_t w) {
  const uint32_t u = w << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
MOE_ALWAYS_INLINE float high_bf16(uint32_t w) {
  const uint32_t u = w & 0xffff0000u;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// A tile of mr x nr: c = ftz(init or C), then the pairs' two fused steps, odd k first, then
// relu. Row by row, so that a row's NR sums stay in registers (each element's order is the
// instruction's whatever the loop order).
MOE_ALWAYS_INLINE void micro_emulated_body(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc,
                                           int64_t mr, int64_t nr, const float* init, bool relu) {
  for (int64_t r = 0; r < mr; ++r) {
    float acc[NR];
    const float* src = init ? init : C + r * ldc;
    for (int64_t j = 0; j < NR; ++j) acc[j] = j < nr ? ftz(src[j]) : 0.f;
    for (int64_t p = 0; p < Kp; ++p) {
      const uint32_t a = Ap[p * MR + r];
      const float a_lo = low_bf16(a), a_hi = high_bf16(a);
      const uint32_t* b = Bp + p * NR;
      for (int64_t j = 0; j < NR; ++j) {
        const float c = ftz(std::fma(a_hi, high_bf16(b[j]), acc[j]));
        acc[j] = ftz(std::fma(a_lo, low_bf16(b[j]), c));
      }
    }
    float* c = C + r * ldc;
    for (int64_t j = 0; j < nr; ++j) c[j] = relu ? (acc[j] > 0.f ? acc[j] : 0.f) : acc[j];
  }
}

using MicroFn = void (*)(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, int64_t mr,
                        int64_t nr, const float* init, bool relu);

// The tiles of a task: mb rows (from the packed tile at Ap) against one packed panel Bp.
template <MicroFn Micro>
MOE_ALWAYS_INLINE void task_body(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc,
                                 int64_t mb, int64_t nr, const float* init, bool relu) {
  for (int64_t g = 0; g < mb; g += MR)
    Micro(Kp, Ap + g * Kp, Bp, C + g * ldc, ldc, std::min(MR, mb - g), nr, init, relu);
}
using TaskFn = void (*)(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, int64_t mb,
                        int64_t nr, const float* init, bool relu);

void micro_emulated_portable(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, int64_t mr,
                             int64_t nr, const float* init, bool relu) {
  micro_emulated_body(Kp, Ap, Bp, C, ldc, mr, nr, init, relu);
}
__attribute__((flatten)) void task_emulated_portable(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C,
                                                     int64_t ldc, int64_t mb, int64_t nr, const float* init,
                                                     bool relu) {
  task_body<micro_emulated_portable>(Kp, Ap, Bp, C, ldc, mb, nr, init, relu);
}

#ifdef MOE_X86
MOE_TARGET_AVX2 void micro_emulated_avx2(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc,
                                         int64_t mr, int64_t nr, const float* init, bool relu) {
  micro_emulated_body(Kp, Ap, Bp, C, ldc, mr, nr, init, relu);
}
MOE_TARGET_AVX2 __attribute__((flatten)) void task_emulated_avx2(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp,
                                                                 float* C, int64_t ldc, int64_t mb, int64_t nr,
                                                                 const float* init, bool relu) {
  task_body<micro_emulated_avx2>(Kp, Ap, Bp, C, ldc, mb, nr, init, relu);
}

// v[j][i] = v[i][j] for a 16x16 matrix of words, one row a register.
MOE_TARGET_BF16 MOE_ALWAYS_INLINE void transpose16(__m512i v[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {  // within 128-bit lanes: pairs of rows interleaved
    t[2 * k] = _mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c], lane l: column 4l + c of rows 4g .. 4g + 3
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4l + c: lane l of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512i x_lo = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), x_hi = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y_lo = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44),
                  y_hi = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    v[c] = _mm512_shuffle_i32x4(x_lo, y_lo, 0x88);
    v[4 + c] = _mm512_shuffle_i32x4(x_lo, y_lo, 0xDD);
    v[8 + c] = _mm512_shuffle_i32x4(x_hi, y_hi, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(x_hi, y_hi, 0xDD);
  }
}

// GCC 12's masked unpacks pass an undefined operand that -Wmaybe-uninitialized reports (GCC bug
// 105593; see gemm.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The packer with VCVTNE2PS2BF16 (the same bits as to_bf16).
MOE_TARGET_BF16 void pack_avx512bf16(const float* X, int64_t ld, bool along_k, int64_t R, int64_t K, int64_t W,
                                     int64_t t0, int64_t t1, uint32_t* dst) {
  const int64_t Kp = (K + 1) / 2;
  const auto mask = [](int64_t n) -> __mmask16 {
    return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
  };
  // Word i of the result: bf16 i (from the low register) below bf16 16 + i (from the high one).
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t t = t0; t < t1; ++t) {
    uint32_t* d = dst + (t - t0) * W * Kp;
    const int64_t r0 = t * W, rows = std::min(W, R - r0);
    if (!along_k) {  // rows k and k + 1 of X, each W contiguous values: one pair per lane
      for (int64_t p = 0; p < Kp; ++p) {
        const float* x = X + 2 * p * ld + r0;
        const bool odd = 2 * p + 1 < K;
        for (int64_t c = 0; c < W; c += 16) {
          const __mmask16 m = mask(std::min<int64_t>(rows, W) - c);
          const __m512 lo = _mm512_maskz_loadu_ps(m, x + c);
          const __m512 hi = odd ? _mm512_maskz_loadu_ps(m, x + ld + c) : _mm512_setzero_ps();
          const __m512i words = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          _mm512_mask_storeu_epi32(d + p * W + c, mask(W - c), words);
        }
      }
      continue;
    }
    // Each row contiguous along k: 32 values give a row's 16 pairs in order; 16 rows of them
    // are transposed in registers into 16 pairs of 16 rows, stored W words apart.
    for (int64_t g0 = 0; g0 < W; g0 += 16) {
      const __mmask16 store = mask(W - g0);
      for (int64_t p0 = 0; p0 < Kp; p0 += 16) {
        const int64_t n = K - 2 * p0;
        __m512i v[16];
        for (int64_t i = 0; i < 16; ++i) {
          if (g0 + i >= rows) {
            v[i] = _mm512_setzero_si512();
            continue;
          }
          const float* x = X + (r0 + g0 + i) * ld + 2 * p0;
          const __m512 lo = _mm512_maskz_loadu_ps(mask(n), x);
          const __m512 hi = _mm512_maskz_loadu_ps(mask(n - 16), x + 16);
          v[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        }
        transpose16(v);
        const int64_t np = std::min<int64_t>(16, Kp - p0);
        for (int64_t q = 0; q < np; ++q) _mm512_mask_storeu_epi32(d + (p0 + q) * W + g0, store, v[q]);
      }
    }
  }
}
#pragma GCC diagnostic pop

// ftz: a value below 2^-126 becomes a zero of its sign (VDPBF16PS reads its sums so).
MOE_TARGET_BF16 MOE_ALWAYS_INLINE __m512 flushed(__m512 v) {
  const __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ);
  return _mm512_mask_and_ps(v, small, v, _mm512_castsi512_ps(_mm512_set1_epi32(int(0x80000000u))));
}

// The tile with VDPBF16PS, ROWS register rows (4, 8 or 12) for the mr <= ROWS valid ones.
template <int64_t ROWS>
MOE_TARGET_BF16 MOE_ALWAYS_INLINE void micro_avx512bf16_rows(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp,
                                                             float* C, int64_t ldc, int64_t mr, int64_t nr,
                                                             const float* init, bool relu) {
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xffff) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xffff) : nr <= 16 ? __mmask16(0) : __mmask16((1u << (nr - 16)) - 1);
  __m512 acc[ROWS][2];
#pragma GCC unroll 12
  for (int64_t r = 0; r < ROWS; ++r) {
    if (r < mr) {
      const float* src = init ? init : C + r * ldc;
      acc[r][0] = flushed(_mm512_maskz_loadu_ps(m0, src));
      acc[r][1] = flushed(_mm512_maskz_loadu_ps(m1, src + 16));
    } else {
      acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < Kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + p * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + p * NR + 16);
    const uint32_t* a = Ap + p * MR;
#pragma GCC unroll 12
    for (int64_t r = 0; r < ROWS; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(int(a[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
#pragma GCC unroll 12
  for (int64_t r = 0; r < ROWS; ++r) {
    if (r >= mr) break;
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (relu) {  // v > 0 ? v : 0
      v0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v0, _mm512_setzero_ps(), _CMP_GT_OQ), v0);
      v1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v1, _mm512_setzero_ps(), _CMP_GT_OQ), v1);
    }
    _mm512_mask_storeu_ps(C + r * ldc, m0, v0);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, v1);
  }
}

MOE_TARGET_BF16 void micro_avx512bf16(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc,
                                      int64_t mr, int64_t nr, const float* init, bool relu) {
  if (mr > 8)
    micro_avx512bf16_rows<12>(Kp, Ap, Bp, C, ldc, mr, nr, init, relu);
  else if (mr > 4)
    micro_avx512bf16_rows<8>(Kp, Ap, Bp, C, ldc, mr, nr, init, relu);
  else
    micro_avx512bf16_rows<4>(Kp, Ap, Bp, C, ldc, mr, nr, init, relu);
}
MOE_TARGET_BF16 __attribute__((flatten)) void task_avx512bf16(int64_t Kp, const uint32_t* Ap, const uint32_t* Bp,
                                                              float* C, int64_t ldc, int64_t mb, int64_t nr,
                                                              const float* init, bool relu) {
  task_body<micro_avx512bf16>(Kp, Ap, Bp, C, ldc, mb, nr, init, relu);
}
#endif

struct Kernel {
  PackFn pack;
  TaskFn task;
};

Kernel kernel_of(Bf16Kernel k) {
#ifdef MOE_X86
  if (k == Bf16Kernel::avx512bf16) return {pack_avx512bf16, task_avx512bf16};
  if (cpu_has_avx2()) return {pack_scalar, task_emulated_avx2};
#else
  if (k == Bf16Kernel::avx512bf16) throw std::logic_error("gemm_bf16: the avx512bf16 kernel exists on x86 only");
#endif
  return {pack_scalar, task_emulated_portable};
}

// The calling thread's packed operands (the team of one product shares them). Only grown.
struct Bf16Scratch {
  std::vector<uint32_t> a, b;
  std::vector<float> zeros;
};
thread_local Bf16Scratch t_scratch;

using gemm_common::grown;

// C = init + op(A)·op(B) (init: the row `init`, or C itself when null), relu when set. The
// team packs A's row tiles and B's panels once, split between the threads, then takes the
// tasks (a block of MC rows against one panel) in even contiguous shares: every element is
// computed whole by one thread, so the bits do not depend on the thread count.
void run(const Kernel& kern, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
         int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, const float* init, bool relu) {
  const int64_t Kp = (K + 1) / 2, tiles = (M + MR - 1) / MR, panels = (N + NR - 1) / NR;
  const int64_t blocks = (M + MC - 1) / MC, tasks = blocks * panels;
  uint32_t* const Ap = grown(t_scratch.a, tiles * MR * Kp);
  uint32_t* const Bp = grown(t_scratch.b, panels * NR * Kp);
  const bool parallel = !omp_in_parallel() && M * N * K >= 32768 && omp_get_max_threads() > 1;
  const auto body = [&](int64_t tid, int64_t nth) {
    const int64_t a0 = tiles * tid / nth, a1 = tiles * (tid + 1) / nth;
    const int64_t b0 = panels * tid / nth, b1 = panels * (tid + 1) / nth;
    kern.pack(A, lda, !trans_a, M, K, MR, a0, a1, Ap + a0 * MR * Kp);
    kern.pack(B, ldb, trans_b, N, K, NR, b0, b1, Bp + b0 * NR * Kp);
    if (nth > 1) {
#pragma omp barrier
    }
    for (int64_t task = tasks * tid / nth; task < tasks * (tid + 1) / nth; ++task) {
      const int64_t i0 = task / panels * MC, p = task % panels, j0 = p * NR;
      kern.task(Kp, Ap + i0 * Kp, Bp + p * NR * Kp, C + i0 * ldc + j0, ldc, std::min(MC, M - i0),
                std::min(NR, N - j0), init ? init + j0 : nullptr, relu);
    }
  };
  if (!parallel) {
    body(0, 1);
    return;
  }
#pragma omp parallel
  body(omp_get_thread_num(), omp_get_num_threads());
}

}  // namespace

bool cpu_has_avx512_bf16() {
#ifdef MOE_X86
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

Bf16Kernel choose_bf16_kernel(const char* env_value, bool cpu_has_bf16) {
  const std::string v = env_value ? env_value : "";
  if (v.empty()) return cpu_has_bf16 ? Bf16Kernel::avx512bf16 : Bf16Kernel::emulated;
  if (v == "emulated") return Bf16Kernel::emulated;
  if (v == "avx512bf16") {
    if (!cpu_has_bf16) throw std::runtime_error("MOE_BF16_KERNEL=avx512bf16, but this CPU lacks AVX512-BF16");
    return Bf16Kernel::avx512bf16;
  }
  throw std::runtime_error("MOE_BF16_KERNEL must be emulated or avx512bf16, got '" + v + "'");
}

Bf16Kernel bf16_kernel() {
  static const Bf16Kernel k = choose_bf16_kernel(std::getenv("MOE_BF16_KERNEL"), cpu_has_avx512_bf16());
  return k;
}

const char* bf16_kernel_name(Bf16Kernel k) { return k == Bf16Kernel::avx512bf16 ? "avx512bf16" : "emulated"; }

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_bf16(bf16_kernel(), trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

void gemm_bf16(Bf16Kernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const float* init = nullptr;
  if (beta == 0.f) {
    init = grown(t_scratch.zeros, N);
  } else if (beta != 1.f) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] *= beta;
  }
  if (K <= 0) {
    if (init)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  run(kernel_of(kernel), trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, init, false);
}

void gemm_bf16_bias(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc, bool relu) {
  gemm_bf16_bias(bf16_kernel(), trans_a, trans_b, M, N, K, A, lda, B, ldb, bias, C, ldc, relu);
}

void gemm_bf16_bias(Bf16Kernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                    int64_t lda, const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc, bool relu) {
  if (M <= 0 || N <= 0) return;
  if (!bias) bias = grown(t_scratch.zeros, N);
  if (K <= 0) {
    gemm_common::bias_rows(C, ldc, M, N, bias, relu);
    return;
  }
  run(kernel_of(kernel), trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, bias, relu);
}

void gemm_bf16_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += double(from_bf16(to_bf16(at(A, trans_a, lda, i, k)))) * double(from_bf16(to_bf16(at(B, trans_b, ldb, k, j))));
      float& c = C[i * ldc + j];
      c = float(s + (beta == 0.f ? 0.0 : double(beta) * double(c)));
    }
}

}  // namespace moe
