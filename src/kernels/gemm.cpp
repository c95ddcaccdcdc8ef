#include "moe/kernels/gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/kernels/activations.hpp"
#include "moe/kernels/gemm_common.hpp"

// The avx2 and avx512 kernels are compiled for their instructions with target attributes,
// whatever the build's flags, and run only when the CPU has them (gemm_kernel).
#include "moe/kernels/x86.hpp"
// The loops each kernel compiles for its own instruction set are written once, as bodies
// forced inline into a copy per kernel.
#define MOE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace moe {

namespace {

// The micro-tile is MR x NR: 6x16 (portable, avx2: two 8-float registers a row) or 12x32
// (avx512: two 16-float registers a row). Every kernel sums each C element over k the same
// way (one fma a step, in order, from 0 within each KC block, then added to C), so the tile
// shape does not change the bits.
constexpr int64_t KC = 256;  // depth of a packed block
constexpr int64_t MC = 96;   // rows of A packed at a time (a multiple of every MR)
constexpr int64_t kMaxMR = 12, kMaxNR = 32;  // the largest tile of any kernel

using gemm_common::at;

// dst[c * ldd + r] = alpha · src[r * lds + c] for r < rows, c < cols: the packers' gathers
// (each value is moved, or multiplied by alpha, alone, so every kernel packs the same bits).
using TransposeFn = void (*)(const float* src, int64_t lds, int64_t rows, int64_t cols, float alpha, float* dst,
                             int64_t ldd);

void transpose_portable(const float* src, int64_t lds, int64_t rows, int64_t cols, float alpha, float* dst,
                        int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = alpha * src[r * lds + c];
}

#ifdef MOE_X86
// The same in 8x8 blocks transposed in AVX registers; a block of fewer than 8 rows loads
// zeros for the missing ones and stores only the valid lanes, the last columns go one by one.
MOE_TARGET_AVX2 void transpose_avx2(const float* src, int64_t lds, int64_t rows, int64_t cols, float alpha,
                                    float* dst, int64_t ldd) {
  const int64_t c8 = cols / 8 * 8;
  const __m256 scale = _mm256_set1_ps(alpha);
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int64_t n = std::min<int64_t>(8, rows - r0);
    if (n == 4) {  // the last four rows of a 12-row tile: 4x8 blocks, each column's four in a half
      for (int64_t c0 = 0; c0 < c8; c0 += 8) {
        __m256 x[4];
        for (int64_t i = 0; i < 4; ++i) {
          x[i] = _mm256_loadu_ps(src + (r0 + i) * lds + c0);
          if (alpha != 1.f) x[i] = _mm256_mul_ps(scale, x[i]);
        }
        const __m256 t0 = _mm256_unpacklo_ps(x[0], x[1]), t1 = _mm256_unpackhi_ps(x[0], x[1]);
        const __m256 t2 = _mm256_unpacklo_ps(x[2], x[3]), t3 = _mm256_unpackhi_ps(x[2], x[3]);
        // Columns c, c+4 in the low and high halves of y[c].
        const __m256 y[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
        float* d = dst + c0 * ldd + r0;
        for (int64_t c = 0; c < 4; ++c) {
          _mm_storeu_ps(d + c * ldd, _mm256_castps256_ps128(y[c]));
          _mm_storeu_ps(d + (c + 4) * ldd, _mm256_extractf128_ps(y[c], 1));
        }
      }
      for (int64_t r = r0; r < r0 + n; ++r)
        for (int64_t c = c8; c < cols; ++c) dst[c * ldd + r] = alpha * src[r * lds + c];
      continue;
    }
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      __m256 x[8];
      for (int64_t i = 0; i < 8; ++i) {
        x[i] = i < n ? _mm256_loadu_ps(src + (r0 + i) * lds + c0) : _mm256_setzero_ps();
        if (alpha != 1.f) x[i] = _mm256_mul_ps(scale, x[i]);
      }
      const __m256 t0 = _mm256_unpacklo_ps(x[0], x[1]), t1 = _mm256_unpackhi_ps(x[0], x[1]);
      const __m256 t2 = _mm256_unpacklo_ps(x[2], x[3]), t3 = _mm256_unpackhi_ps(x[2], x[3]);
      const __m256 t4 = _mm256_unpacklo_ps(x[4], x[5]), t5 = _mm256_unpackhi_ps(x[4], x[5]);
      const __m256 t6 = _mm256_unpacklo_ps(x[6], x[7]), t7 = _mm256_unpackhi_ps(x[6], x[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 y[8] = {_mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
                           _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
                           _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
                           _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
      float* d = dst + c0 * ldd + r0;
      if (n == 8)
        for (int64_t c = 0; c < 8; ++c) _mm256_storeu_ps(d + c * ldd, y[c]);
      else
        for (int64_t c = 0; c < 8; ++c) _mm256_maskstore_ps(d + c * ldd, lanes, y[c]);
    }
    for (int64_t r = r0; r < r0 + n; ++r)
      for (int64_t c = c8; c < cols; ++c) dst[c * ldd + r] = alpha * src[r * lds + c];
  }
}
#endif

// Panels [p_begin, p_end) of B for rows k0 .. k0+kb-1, panel p at dst + (p - p_begin)·kb·NR:
// kb rows of NR floats for columns p*NR.. (zero padded past N).
template <int64_t NR>
void pack_b_panels(TransposeFn transpose, bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kb,
                   int64_t N, int64_t p_begin, int64_t p_end, float* dst) {
  if (!trans_b) {
    // Row by row of B, each row's part of every panel: B streams through once, in order (panel
    // by panel, each row's NR floats a whole row of B apart, the loads waited on the cache).
    for (int64_t k = 0; k < kb; ++k) {
      const float* src = B + (k0 + k) * ldb;
      for (int64_t p = p_begin; p < p_end; ++p) {
        const int64_t j0 = p * NR, nr = std::min(NR, N - j0);
        float* row = dst + (p - p_begin) * kb * NR + k * NR;
        if (nr == NR) {
          std::memcpy(row, src + j0, sizeof(float) * NR);
        } else {
          for (int64_t j = 0; j < nr; ++j) row[j] = src[j0 + j];
          for (int64_t j = nr; j < NR; ++j) row[j] = 0.f;
        }
      }
    }
    return;
  }
  // Bᵀ stored: column j of a panel is contiguous in B; read it along k.
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t j0 = p * NR, nr = std::min(NR, N - j0);
    float* panel = dst + (p - p_begin) * kb * NR;
    transpose(B + j0 * ldb + k0, ldb, nr, kb, 1.f, panel, NR);
    for (int64_t j = nr; j < NR; ++j)
      for (int64_t k = 0; k < kb; ++k) panel[k * NR + j] = 0.f;
  }
}

// C[i][j] *= beta (0: set to 0) for rows [i0, i1) and columns [j0, j1).
void scale_rows(float* C, int64_t ldc, int64_t i0, int64_t i1, int64_t j0, int64_t j1, float beta) {
  if (beta == 1.f) return;
  for (int64_t i = i0; i < i1; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f)
      std::memset(c + j0, 0, sizeof(float) * size_t(j1 - j0));
    else
      for (int64_t j = j0; j < j1; ++j) c[j] *= beta;
  }
}

// Ap: for each group of MR rows, kb columns of MR floats (scaled by alpha, zero padded).
template <int64_t MR>
void pack_a(TransposeFn transpose, bool trans_a, const float* A, int64_t lda, int64_t i0, int64_t mb, int64_t k0,
            int64_t kb, float alpha, float* Ap) {
  for (int64_t g = 0; g < mb; g += MR) {
    float* dst = Ap + g * kb;
    const int64_t mr = std::min(MR, mb - g);
    if (trans_a) {  // Aᵀ stored: the MR rows of one k are contiguous
      for (int64_t k = 0; k < kb; ++k) {
        const float* src = A + (k0 + k) * lda + i0 + g;
        for (int64_t r = 0; r < mr; ++r) dst[k * MR + r] = alpha * src[r];
        for (int64_t r = mr; r < MR; ++r) dst[k * MR + r] = 0.f;
      }
    } else {  // each row is contiguous along k
      transpose(A + (i0 + g) * lda + k0, lda, mr, kb, alpha, dst, MR);
      for (int64_t r = mr; r < MR; ++r)
        for (int64_t k = 0; k < kb; ++k) dst[k * MR + r] = 0.f;
    }
  }
}

// Where a micro-kernel reads B's panels: packed (panel p at packed + p·kb·NR, rows of NR
// floats), or, for B stored [K, N] and a product of at most kDirectTiles row tiles, its
// panels of NR whole columns from B itself (direct, the k block's first row, rows ldb apart;
// the last panel, short of NR columns, is packed with zeros). The same values, so the same
// bits. Packing pays when many tiles reread a panel: B read in place from the last-level
// cache slowed the training step (dY·W) by 1-3%; for the decoder's few rows (a re-encoded
// context) it was a pass over weights used once, and generation ran 5% faster without it.
constexpr int64_t kDirectTiles = 2;
struct BSrc {
  const float* direct;
  int64_t ldb;
  const float* packed;  // panel p at packed + (p - first)·kb·NR
  int64_t first;
};

constexpr int64_t kGemvCols = 512;  // columns of one one-row call (its accumulators)

// C[j] = alpha · acc[j - j0] + beta · C[j] (beta 0: not reading C), j in [j0, j1): the end
// of every one-row loop, the same expression in each.
MOE_ALWAYS_INLINE void gemv_store(int64_t j0, int64_t j1, float alpha, const float* acc, float beta, float* C) {
  for (int64_t j = j0; j < j1; ++j) C[j] = alpha * acc[j - j0] + (beta == 0.f ? 0.f : beta * C[j]);
}

// a·b + c: one fma where the kernel's target has it (explicit, so that an unoptimised build,
// which does not contract a·b + c, still gives the bits of the intrinsic kernels), else a
// product and a sum.
template <bool Fused>
MOE_ALWAYS_INLINE float madd(float a, float b, float c) {
  if constexpr (Fused) return std::fma(a, b, c);
  else return a * b + c;
}

// One row, B stored [K, N], for j in [j0, j1), j1 - j0 <= kGemvCols: each C element summed
// over k in order, one fma a step from 0 (the rows of B accumulated in order), then stored.
// With ks, over the K values k = ks[0], ks[1].. only (gemv_skip_zeros).
template <bool Fused>
MOE_ALWAYS_INLINE void gemv_axpy_body(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a,
                                      const float* B, int64_t ldb, float beta, float* C,
                                      const int32_t* ks = nullptr) {
  float acc[kGemvCols];
  std::fill(acc, acc + (j1 - j0), 0.f);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t k = ks ? ks[i] : i;
    const float ak = a[k];
    const float* b = B + k * ldb;
    for (int64_t j = j0; j < j1; ++j) acc[j - j0] = madd<Fused>(ak, b[j], acc[j - j0]);
  }
  gemv_store(j0, j1, alpha, acc, beta, C);
}

// One row, B stored [N, K] (a Linear's weight): the same sums, by the same loop on tiles of
// 16 k steps of Bᵀ copied out (the same expression, so the same fma contraction, as
// gemv_axpy_body; a dot product along k would leave the compiler free to vectorise it by
// multiplying first and summing the products in order, other bits).
template <bool Fused>
MOE_ALWAYS_INLINE void gemv_rows_body(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a,
                                      const float* B, int64_t ldb, float beta, float* C) {
  constexpr int64_t kKb = 16;
  const int64_t n = j1 - j0;
  float acc[kGemvCols], bt[kKb * kGemvCols];
  std::fill(acc, acc + n, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kKb) {
    const int64_t kb = std::min(kKb, K - k0);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < kb; ++k) bt[k * n + j] = B[(j0 + j) * ldb + k0 + k];
    for (int64_t k = 0; k < kb; ++k) {
      const float ak = a[k0 + k];
      const float* b = bt + k * n;
      for (int64_t j = 0; j < n; ++j) acc[j] = madd<Fused>(ak, b[j], acc[j]);
    }
  }
  gemv_store(j0, j1, alpha, acc, beta, C);
}

#ifdef MOE_X86
// GCC 12's avx512fintrin.h passes _mm512_undefined_ps() as the unused operand of the masked
// unpacks and shuffles, which -Wmaybe-uninitialized reports wherever they inline (GCC bug
// 105593): silenced for the 16x16 transposes and the gemv they inline into.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// r[i] (row i, 16 columns) -> r[c] (column c, 16 rows): 16x16 floats transposed in registers.
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void transpose16_avx512(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // lane l: rows 2i, 2i+1 of columns 4l, 4l+1 (t[2i]) and 4l+2, 4l+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + m], lane l: rows 4i..4i+3 of column 4l + m
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {  // column 4l + m: lane l of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512 a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), b = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88), d = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    t[m] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// s (16 rows' sums) + the products of 16 rows of B, rows ldb apart, over kn <= 16 values of
// a: the tile transposed, then one fma a k. FULL: 16 rows and 16 values; else the first
// `rows` rows and kn values (masked loads, zeros past them, no fma past kn).
template <bool FULL>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE __m512 rows_tile_avx512(const float* b, int64_t ldb, int64_t rows, int64_t kn,
                                                           const float* a, __m512 s) {
  __m512 r[16];
  if (FULL) {
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(b + i * ldb);
  } else {
    const __mmask16 m = __mmask16((1u << kn) - 1);
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(m, b + i * ldb) : _mm512_setzero_ps();
  }
  transpose16_avx512(r);
  if (FULL) {
    for (int k = 0; k < 16; ++k) s = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), r[k], s);
  } else {
    for (int k = 0; k < kn; ++k) s = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), r[k], s);
  }
  return s;
}

// The same with 16 rows of B at a time, two tiles of rows in flight (their fma chains
// overlap), 16 k steps a tile transposed in registers.
MOE_TARGET_AVX512 void gemv_rows_avx512(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a,
                                        const float* B, int64_t ldb, float beta, float* C) {
  alignas(64) float acc[kGemvCols];
  const int64_t K16 = K / 16 * 16;
  for (int64_t j = j0; j < j1; j += 32) {
    const int64_t n0 = std::min<int64_t>(16, j1 - j), n1 = std::min<int64_t>(16, j1 - j - n0);
    const float* b0 = B + j * ldb;
    const float* b1 = b0 + 16 * ldb;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    if (n0 == 16 && n1 == 16) {
      // The next 32 rows, asked for ahead (a cache line of each row per 16 k steps, when the
      // rows are contiguous): the weights stream from memory, one matrix once a token.
      const bool ahead = ldb == K && j + 64 <= j1;
      const char* next = reinterpret_cast<const char*>(b0 + 32 * ldb);
      for (int64_t k = 0; k < K16; k += 16) {
        if (ahead)
          for (int64_t r = 0; r < 32; ++r) _mm_prefetch(next + (r * ldb + k) * int64_t(sizeof(float)), _MM_HINT_T0);
        s0 = rows_tile_avx512<true>(b0 + k, ldb, 16, 16, a + k, s0);
        s1 = rows_tile_avx512<true>(b1 + k, ldb, 16, 16, a + k, s1);
      }
    } else {
      for (int64_t k = 0; k < K16; k += 16) {
        s0 = rows_tile_avx512<false>(b0 + k, ldb, n0, 16, a + k, s0);
        if (n1 > 0) s1 = rows_tile_avx512<false>(b1 + k, ldb, n1, 16, a + k, s1);
      }
    }
    if (K16 < K) {
      s0 = rows_tile_avx512<false>(b0 + K16, ldb, n0, K - K16, a + K16, s0);
      if (n1 > 0) s1 = rows_tile_avx512<false>(b1 + K16, ldb, n1, K - K16, a + K16, s1);
    }
    _mm512_store_ps(acc + (j - j0), s0);
    if (n1 > 0) _mm512_store_ps(acc + (j - j0) + 16, s1);
  }
  gemv_store(j0, j1, alpha, acc, beta, C);
}
#pragma GCC diagnostic pop

// One row, B stored [K, N] (a weight in the decoder's layout, [in, out]), NV vectors of 16
// columns from B (the last one's valid lanes in `last`): the sums stay in registers, each
// summed over k in order by one fma a step from 0, gemv_axpy_body's sums. List: over the k
// in ks[0..K) only, the rows a few ahead asked for (they do not follow each other).
template <int NV, bool List>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void axpy_block_avx512(int64_t K, const int32_t* ks, const float* a,
                                                          const float* B, int64_t ldb, __mmask16 last, float* acc) {
  constexpr int64_t kAhead = 4;
  __m512 s[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) s[v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; ++i) {
    const int64_t k = List ? ks[i] : i;
    if (List && i + kAhead < K) {
      const char* next = reinterpret_cast<const char*>(B + ks[i + kAhead] * ldb);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) _mm_prefetch(next + 64 * v, _MM_HINT_T0);
    }
    const __m512 ak = _mm512_set1_ps(a[k]);
    const float* b = B + k * ldb;
#pragma GCC unroll 16
    for (int v = 0; v < NV - 1; ++v) s[v] = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 16 * v), s[v]);
    s[NV - 1] = _mm512_fmadd_ps(ak, _mm512_maskz_loadu_ps(last, b + 16 * (NV - 1)), s[NV - 1]);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm512_store_ps(acc + 16 * v, s[v]);
}

// Columns [j0, j1) in blocks of up to 256 (16 accumulators).
template <bool List>
MOE_TARGET_AVX512 void gemv_axpy_blocks_avx512(int64_t j0, int64_t j1, int64_t K, const int32_t* ks, float alpha,
                                               const float* a, const float* B, int64_t ldb, float beta, float* C) {
  constexpr int64_t kBlock = 256;
  alignas(64) float acc[kBlock];
  for (int64_t j = j0; j < j1; j += kBlock) {
    const int64_t w = std::min(kBlock, j1 - j), nv = (w + 15) / 16, tail = w - 16 * (nv - 1);
    const __mmask16 last = tail == 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
    const float* b = B + j;
    switch (nv) {
#define MOE_AXPY_CASE(NV) \
  case NV: axpy_block_avx512<NV, List>(K, ks, a, b, ldb, last, acc); break;
      MOE_AXPY_CASE(1) MOE_AXPY_CASE(2) MOE_AXPY_CASE(3) MOE_AXPY_CASE(4) MOE_AXPY_CASE(5) MOE_AXPY_CASE(6)
      MOE_AXPY_CASE(7) MOE_AXPY_CASE(8) MOE_AXPY_CASE(9) MOE_AXPY_CASE(10) MOE_AXPY_CASE(11) MOE_AXPY_CASE(12)
      MOE_AXPY_CASE(13) MOE_AXPY_CASE(14) MOE_AXPY_CASE(15) MOE_AXPY_CASE(16)
#undef MOE_AXPY_CASE
    }
    gemv_store(j, j + w, alpha, acc, beta, C);
  }
}
#endif

// The 6x16 tile of the portable and avx2 kernels.
constexpr int64_t kMR16 = 6, kNR16 = 16;
static_assert(kMR16 <= kMaxMR && kNR16 <= kMaxNR, "gemm_reserve_thread reserves for the largest tile");

// acc[6][16] = Σ_k Ap[k][r] · Bp[k·bs + c], then C += acc on the valid mr x nr part. GCC/Clang
// vector types of 8 floats: the compiler maps them to whatever vectors the build targets.
void micro_portable(int64_t kb, const float* Ap, const float* Bp, int64_t bs, float* C, int64_t ldc, int64_t mr,
                    int64_t nr, const float* init, bool relu) {
  constexpr int64_t MR = kMR16;
  typedef float v8 __attribute__((vector_size(32)));
  v8 acc[MR][2] = {};
  for (int64_t k = 0; k < kb; ++k) {
    v8 b0, b1;
    std::memcpy(&b0, Bp + k * bs, sizeof b0);
    std::memcpy(&b1, Bp + k * bs + 8, sizeof b1);
    for (int64_t r = 0; r < MR; ++r) {
      const float a = Ap[k * MR + r];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nr; ++c) {
      const float v = (init ? init[c] : C[r * ldc + c]) + acc[r][c / 8][c % 8];
      C[r * ldc + c] = relu ? act::relu(v) : v;
    }
}

#ifdef MOE_X86
MOE_TARGET_AVX2 void micro_avx2(int64_t kb, const float* Ap, const float* Bp, int64_t bs, float* C, int64_t ldc,
                                int64_t mr, int64_t nr, const float* init, bool relu) {
  constexpr int64_t MR = kMR16, NR = kNR16;
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kb; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + k * bs), b1 = _mm256_loadu_ps(Bp + k * bs + 8);
    const float* a = Ap + k * MR;
    __m256 a0 = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(a0, b0, c00);
    c01 = _mm256_fmadd_ps(a0, b1, c01);
    __m256 a1 = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(a1, b0, c10);
    c11 = _mm256_fmadd_ps(a1, b1, c11);
    __m256 a2 = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(a2, b0, c20);
    c21 = _mm256_fmadd_ps(a2, b1, c21);
    __m256 a3 = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(a3, b0, c30);
    c31 = _mm256_fmadd_ps(a3, b1, c31);
    __m256 a4 = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(a4, b0, c40);
    c41 = _mm256_fmadd_ps(a4, b1, c41);
    __m256 a5 = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(a5, b0, c50);
    c51 = _mm256_fmadd_ps(a5, b1, c51);
  }
  if (mr == MR && nr == NR) {  // a full tile: C += acc in vectors (the same sums as below)
    const __m256 acc_regs[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int64_t r = 0; r < MR; ++r)
      for (int64_t h = 0; h < 2; ++h) {
        float* c = C + r * ldc + h * 8;
        const __m256 v = _mm256_add_ps(_mm256_loadu_ps(init ? init + h * 8 : c), acc_regs[r][h]);
        // max(v, 0) returns its second operand, 0, for NaN and -0: v > 0 ? v : 0.
        _mm256_storeu_ps(c, relu ? _mm256_max_ps(v, _mm256_setzero_ps()) : v);
      }
    return;
  }
  alignas(32) float acc[MR][NR];
  _mm256_store_ps(acc[0], c00);
  _mm256_store_ps(acc[0] + 8, c01);
  _mm256_store_ps(acc[1], c10);
  _mm256_store_ps(acc[1] + 8, c11);
  _mm256_store_ps(acc[2], c20);
  _mm256_store_ps(acc[2] + 8, c21);
  _mm256_store_ps(acc[3], c30);
  _mm256_store_ps(acc[3] + 8, c31);
  _mm256_store_ps(acc[4], c40);
  _mm256_store_ps(acc[4] + 8, c41);
  _mm256_store_ps(acc[5], c50);
  _mm256_store_ps(acc[5] + 8, c51);
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nr; ++c) {
      const float v = (init ? init[c] : C[r * ldc + c]) + acc[r][c];
      C[r * ldc + c] = relu ? act::relu(v) : v;
    }
}

// The avx512 tile: kMR32 rows of 32 columns, two 16-float registers a row (24 accumulators
// of the 32 zmm registers). The same sums as the 6x16 kernels: one fma a k step, in order;
// C += acc by one add per element, masked to the valid columns of an edge tile. NV = 1
// computes only the first 16 columns, for an edge panel of at most 16 (lm_head's N = 65
// ends with a panel of 1 column); ROWS = 4 or 8 only the first rows, for an edge tile of at
// most that many (an expert's last rows; the decoder's few).
constexpr int64_t kMR32 = 12, kNR32 = 32;
static_assert(kMR32 <= kMaxMR && kNR32 <= kMaxNR, "gemm_reserve_thread reserves for the largest tile");

template <int NV, int64_t ROWS>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void micro_avx512_body(int64_t kb, const float* Ap, const float* Bp,
                                                           int64_t bs, float* C, int64_t ldc, int64_t mr, int64_t nr,
                                                           const float* init, bool relu) {
  constexpr int64_t MR = kMR32;  // the packed rows' stride; the tile computes the first ROWS
  __m512 acc[ROWS][NV];
#pragma GCC unroll 16
  for (int64_t r = 0; r < ROWS; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kb; ++k) {
    __m512 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(Bp + k * bs + 16 * v);
    const float* a = Ap + k * MR;
#pragma GCC unroll 16
    for (int64_t r = 0; r < ROWS; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, b[v], acc[r][v]);
    }
  }
  __mmask16 m[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const int64_t w = std::min<int64_t>(16, nr - 16 * v);  // valid columns of register v (> 0)
    m[v] = w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1);
  }
  __m512 first[NV];  // the row added to every row of the tile when init is given
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) first[v] = init ? _mm512_maskz_loadu_ps(m[v], init + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int64_t r = 0; r < ROWS; ++r) {
    if (r >= mr) break;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      const __m512 base = init ? first[v] : _mm512_maskz_loadu_ps(m[v], c);
      const __m512 sum = _mm512_add_ps(base, acc[r][v]);
      _mm512_mask_storeu_ps(c, m[v], relu ? _mm512_maskz_max_ps(__mmask16(0xFFFF), sum, _mm512_setzero_ps()) : sum);
    }
  }
}

template <int64_t ROWS>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void micro_avx512_rows(int64_t kb, const float* Ap, const float* Bp, int64_t bs,
                                                           float* C, int64_t ldc, int64_t mr, int64_t nr,
                                                           const float* init, bool relu) {
  if (nr > 16)
    micro_avx512_body<2, ROWS>(kb, Ap, Bp, bs, C, ldc, mr, nr, init, relu);
  else
    micro_avx512_body<1, ROWS>(kb, Ap, Bp, bs, C, ldc, mr, nr, init, relu);
}

MOE_TARGET_AVX512 void micro_avx512(int64_t kb, const float* Ap, const float* Bp, int64_t bs, float* C, int64_t ldc,
                                    int64_t mr, int64_t nr, const float* init, bool relu) {
  if (mr > 8)
    micro_avx512_rows<kMR32>(kb, Ap, Bp, bs, C, ldc, mr, nr, init, relu);
  else if (mr > 4)
    micro_avx512_rows<8>(kb, Ap, Bp, bs, C, ldc, mr, nr, init, relu);
  else
    micro_avx512_rows<4>(kb, Ap, Bp, bs, C, ldc, mr, nr, init, relu);
}
#endif

// A micro-kernel: C = base + acc on the valid mr x nr part of its tile, base being C itself, or
// when init is given the row init (the same for every row of the tile); then relu(C) when
// relu is set (the last k block of a product with a relu epilogue).
using MicroFn = void (*)(int64_t kb, const float* Ap, const float* Bp, int64_t bs, float* C, int64_t ldc, int64_t mr,
                        int64_t nr, const float* init, bool relu);

// The products of a row block: the packed rows Ap (mb of them) times the column panels [p0, p1)
// of B (b), added to C (whose row 0 is the block's first row).
template <int64_t MR, int64_t NR, MicroFn Micro>
MOE_ALWAYS_INLINE void tile_body(int64_t kb, const float* Ap, int64_t mb, BSrc b, int64_t p0, int64_t p1, int64_t N,
                                 float* C, int64_t ldc, const float* init, bool relu) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t j0 = p * NR, nr = std::min(NR, N - j0);
    const bool direct = b.direct && nr == NR;
    const float* bp = direct ? b.direct + j0 : b.packed + (p - b.first) * kb * NR;
    const int64_t bs = direct ? b.ldb : NR;
    for (int64_t g = 0; g < mb; g += MR)
      Micro(kb, Ap + g * kb, bp, bs, C + g * ldc + j0, ldc, std::min(MR, mb - g), nr,
            init ? init + j0 : nullptr, relu);
  }
}

using TileFn = void (*)(int64_t kb, const float* Ap, int64_t mb, BSrc b, int64_t p0, int64_t p1, int64_t N,
                        float* C, int64_t ldc, const float* init, bool relu);
using GemvFn = void (*)(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a, const float* B, int64_t ldb,
                        float beta, float* C);
using PackedFn = void (*)(TileFn tile, TransposeFn transpose, bool trans_a, bool trans_b, int64_t M, int64_t N,
                          int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                          float* C, int64_t ldc, const float* bias, bool relu);

// What differs between the kernels: the packed product for its tile shape (packing and
// task split, plain code), and, compiled for its instructions, its tile loop, the transposes
// the packers gather with and the one-row loops.
struct Kernel {
  PackedFn packed;
  TileFn tile;
  TransposeFn transpose;
  GemvFn gemv_rows, gemv_axpy;  // one row, B stored [N, K] or [K, N]
};

// Every kernel's tile loop, and the one-row loops of portable and avx2: the same bodies,
// compiled for the target given by the attributes ATTR.
#define MOE_GEMM_TILE_FN(NAME, ATTR, MR, NR, MICRO)                                                          \
  ATTR __attribute__((flatten)) void tile_##NAME(int64_t kb, const float* Ap, int64_t mb, BSrc b, int64_t p0,    \
                                                 int64_t p1, int64_t N, float* C, int64_t ldc, const float* init, \
                                                 bool relu) {                                                     \
    tile_body<MR, NR, MICRO>(kb, Ap, mb, b, p0, p1, N, C, ldc, init, relu);                                      \
  }
#define MOE_GEMM_GEMV_FNS(NAME, ATTR, FUSED)                                                                  \
  ATTR void gemv_rows_##NAME(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a, const float* B, \
                             int64_t ldb, float beta, float* C) {                                            \
    gemv_rows_body<FUSED>(j0, j1, K, alpha, a, B, ldb, beta, C);                                             \
  }                                                                                                          \
  ATTR void gemv_axpy_##NAME(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a, const float* B, \
                             int64_t ldb, float beta, float* C) {                                            \
    gemv_axpy_body<FUSED>(j0, j1, K, alpha, a, B, ldb, beta, C);                                             \
  }

MOE_GEMM_TILE_FN(portable, , kMR16, kNR16, micro_portable)
MOE_GEMM_GEMV_FNS(portable, , false)
#ifdef MOE_X86
MOE_GEMM_TILE_FN(avx2, MOE_TARGET_AVX2, kMR16, kNR16, micro_avx2)
MOE_GEMM_GEMV_FNS(avx2, MOE_TARGET_AVX2, true)
MOE_GEMM_TILE_FN(avx512, MOE_TARGET_AVX512, kMR32, kNR32, micro_avx512)
MOE_TARGET_AVX512 void gemv_axpy_avx512(int64_t j0, int64_t j1, int64_t K, float alpha, const float* a,
                                        const float* B, int64_t ldb, float beta, float* C) {
  gemv_axpy_blocks_avx512<false>(j0, j1, K, nullptr, alpha, a, B, ldb, beta, C);
}
#endif

// The one-row loops over a list of k (gemv_skip_zeros), for each kernel.
using GemvListFn = void (*)(int64_t j0, int64_t j1, int64_t nk, const int32_t* ks, float alpha, const float* a,
                            const float* B, int64_t ldb, float beta, float* C);
void gemv_list_portable(int64_t j0, int64_t j1, int64_t nk, const int32_t* ks, float alpha, const float* a,
                        const float* B, int64_t ldb, float beta, float* C) {
  gemv_axpy_body<false>(j0, j1, nk, alpha, a, B, ldb, beta, C, ks);
}
#ifdef MOE_X86
MOE_TARGET_AVX2 void gemv_list_avx2(int64_t j0, int64_t j1, int64_t nk, const int32_t* ks, float alpha, const float* a,
                                    const float* B, int64_t ldb, float beta, float* C) {
  gemv_axpy_body<true>(j0, j1, nk, alpha, a, B, ldb, beta, C, ks);
}
#endif

// A thread's packing scratch: a block of its rows of A and its panels of B. Only grown, so
// that a thread's first products decide its allocations; gemm_reserve_thread grows it ahead
// for threads that draw products by timing.
struct PackScratch {
  std::vector<float> a, b;
  std::vector<float> zeros;  // a row of zeros: the first write of C when beta is 0
};
thread_local PackScratch t_scratch;

using gemm_common::grown;

// The packed product with an MR x NR tile. The threads share it by rows when B is the
// smaller operand (N <= M), each packing all of B's panels for itself, else by column panels,
// each packing all of A's rows: no thread reads what another packed. (With the B panels
// packed once by the team and read by every thread, the two cores passed each panel's cache
// lines back and forth: 2 threads ran 128x128x512 no faster than one.) Each thread then runs
// the k blocks of KC: it packs its B panels (unless BSrc reads them in place), then, for
// each block of at most MC of its rows, packs them and runs the tile loop. Each C element
// sums over k in the same order whoever computes it, so the bits do not depend on the thread
// count or the split.
template <int64_t MR, int64_t NR>
void gemm_packed(TileFn tile, TransposeFn transpose, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc, const float* bias, bool relu) {
  static_assert(MC % MR == 0, "a row block is whole tiles, but for the last");
  const int64_t panels = (N + NR - 1) / NR, tiles = (M + MR - 1) / MR;
  const bool by_rows = N <= M;
  const bool parallel = !omp_in_parallel() && M * N * K >= 32768;
  const int64_t parts = parallel ? std::min<int64_t>(omp_get_max_threads(), by_rows ? tiles : panels) : 1;
  // B read in place (BSrc): only a last panel short of NR columns is packed.
  const bool direct = !trans_b && tiles <= kDirectTiles;
  // Part `part`'s rows [r0, r1) (whole tiles) and column panels [p0, p1), even shares.
  const auto run_part = [&](int64_t part) {
    int64_t r0 = 0, r1 = M, p0 = 0, p1 = panels;
    if (by_rows)
      r0 = std::min(M, part * tiles / parts * MR), r1 = std::min(M, (part + 1) * tiles / parts * MR);
    else
      p0 = part * panels / parts, p1 = (part + 1) * panels / parts;
    float* const Bp = grown(t_scratch.b, (p1 - p0) * NR * std::min(KC, K));
    float* const Ap = grown(t_scratch.a, (MC + MR) * std::min(KC, K));
    const int64_t first_packed = direct ? std::max(p0, N / NR) : p0;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kb = std::min(KC, K - k0);
      pack_b_panels<NR>(transpose, trans_b, B, ldb, k0, kb, N, first_packed, p1, Bp + (first_packed - p0) * kb * NR);
      const BSrc b{direct ? B + k0 * ldb : nullptr, ldb, Bp, p0};
      for (int64_t i0 = r0; i0 < r1; i0 += MC) {
        const int64_t mb = std::min(MC, r1 - i0);
        // Rows i0.. take beta before their first accumulation, unless the first block's tiles
        // start from the bias rows.
        if (k0 == 0 && !bias) scale_rows(C, ldc, i0, i0 + mb, p0 * NR, std::min(N, p1 * NR), beta);
        pack_a<MR>(transpose, trans_a, A, lda, i0, mb, k0, kb, alpha, Ap);
        tile(kb, Ap, mb, b, p0, p1, N, C + i0 * ldc, ldc, k0 == 0 ? bias : nullptr, relu && k0 + kb == K);
      }
    }
  };
  if (parts == 1) {  // on the calling thread, without an OpenMP region (one costs a decoded token)
    run_part(0);
    return;
  }
#pragma omp parallel num_threads(parts)
  run_part(omp_get_thread_num());
}

constexpr Kernel kPortable{gemm_packed<kMR16, kNR16>, tile_portable, transpose_portable, gemv_rows_portable,
                           gemv_axpy_portable};
#ifdef MOE_X86
constexpr Kernel kAvx2{gemm_packed<kMR16, kNR16>, tile_avx2, transpose_avx2, gemv_rows_avx2, gemv_axpy_avx2};
// The one-row loops are one fma per element and k step at any width, so avx512's give avx2's
// bits: the accumulated rows compiled for AVX-512, and the rows of a Linear's weight (the
// decoder's products) in 16x16 tiles transposed in registers. The 8x8 transposes of avx2
// serve the packers.
constexpr Kernel kAvx512{gemm_packed<kMR32, kNR32>, tile_avx512, transpose_avx2, gemv_rows_avx512, gemv_axpy_avx512};
#endif

const Kernel& kernel_of(GemmKernel k) {
#ifdef MOE_X86
  if (k == GemmKernel::avx2) return kAvx2;
  if (k == GemmKernel::avx512) return kAvx512;
#else
  if (k != GemmKernel::portable) throw std::logic_error("gemm: the avx2 and avx512 kernels exist on x86 only");
#endif
  return kPortable;
}

}  // namespace

void gemm_reserve_thread(int64_t max_n) {
  grown(t_scratch.a, (MC + kMaxMR) * KC);
  grown(t_scratch.b, (max_n + kMaxNR - 1) / kMaxNR * kMaxNR * KC);
  grown(t_scratch.zeros, max_n);
}

namespace {
// run(j0, j1) over the column chunks of a one-row product, as even between the threads as
// 16-column steps allow (qkv's 384 columns went 256 + 128), each at most kGemvCols.
template <class Run>
void gemv_chunks(int64_t N, int64_t K, Run&& run) {
  const bool parallel = !omp_in_parallel() && N * K >= 32768;
  const int64_t threads = parallel ? std::max(1, omp_get_max_threads()) : 1;
  const int64_t cols = std::min(kGemvCols, ((N + threads - 1) / threads + 15) / 16 * 16);
  const int64_t chunks = (N + cols - 1) / cols;
  if (threads == 1) {  // no OpenMP region at all: entering one, even of one thread, costs a decoded token 8%
    for (int64_t ch = 0; ch < chunks; ++ch) run(ch * cols, std::min(N, (ch + 1) * cols));
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) run(ch * cols, std::min(N, (ch + 1) * cols));
}

thread_local std::vector<int32_t> t_nonzero;  // gemv_skip_zeros's list of k
}  // namespace

void gemv(GemmKernel kernel, bool trans_b, int64_t N, int64_t K, float alpha, const float* a, const float* B,
          int64_t ldb, float beta, float* C) {
  if (N <= 0) return;
  const Kernel& kern = kernel_of(kernel);
  // Rows of B (B stored [N, K]) or accumulated rows of B (B stored [K, N]).
  const auto fn = trans_b ? kern.gemv_rows : kern.gemv_axpy;
  gemv_chunks(N, K, [&](int64_t j0, int64_t j1) { fn(j0, j1, K, alpha, a, B, ldb, beta, C); });
}

void gemv(bool trans_b, int64_t N, int64_t K, float alpha, const float* a, const float* B, int64_t ldb, float beta,
          float* C) {
  gemv(gemm_kernel(), trans_b, N, K, alpha, a, B, ldb, beta, C);
}

void gemv_skip_zeros(GemmKernel kernel, int64_t N, int64_t K, float alpha, const float* a, const float* B, int64_t ldb,
                     float beta, float* C) {
  if (N <= 0) return;
  std::vector<int32_t>& ks = t_nonzero;
  if (int64_t(ks.size()) < K) ks.resize(size_t(K));
  int64_t nk = 0;
  for (int64_t k = 0; k < K; ++k) {  // without a branch: most of a relu's output is 0, in no pattern
    ks[size_t(nk)] = int32_t(k);
    nk += a[k] != 0.f;
  }
  GemvListFn fn = gemv_list_portable;
#ifdef MOE_X86
  if (kernel == GemmKernel::avx2) fn = gemv_list_avx2;
  if (kernel == GemmKernel::avx512) fn = gemv_axpy_blocks_avx512<true>;
#else
  kernel_of(kernel);  // throws for the x86 kernels
#endif
  gemv_chunks(N, nk, [&](int64_t j0, int64_t j1) { fn(j0, j1, nk, ks.data(), alpha, a, B, ldb, beta, C); });
}

void gemv_skip_zeros(int64_t N, int64_t K, float alpha, const float* a, const float* B, int64_t ldb, float beta,
                     float* C) {
  gemv_skip_zeros(gemm_kernel(), N, K, alpha, a, B, ldb, beta, C);
}

bool gemm_cpu_has_avx2() { return cpu_has_avx2(); }

bool gemm_cpu_has_avx512() { return cpu_has_avx512(); }

GemmKernel choose_gemm_kernel(const char* env_value, bool cpu_has_avx2, bool cpu_has_avx512) {
  const std::string v = env_value ? env_value : "";
  if (v.empty())
    return cpu_has_avx512 ? GemmKernel::avx512 : cpu_has_avx2 ? GemmKernel::avx2 : GemmKernel::portable;
  if (v == "portable") return GemmKernel::portable;
  if (v == "avx2") {
    if (!cpu_has_avx2) throw std::runtime_error("MOE_GEMM_KERNEL=avx2, but this CPU lacks AVX2 or FMA");
    return GemmKernel::avx2;
  }
  if (v == "avx512") {
    if (!cpu_has_avx512)
      throw std::runtime_error("MOE_GEMM_KERNEL=avx512, but this CPU lacks AVX-512 (F, VL, BW, DQ)");
    return GemmKernel::avx512;
  }
  throw std::runtime_error("MOE_GEMM_KERNEL must be portable, avx2 or avx512, got '" + v + "'");
}

GemmKernel gemm_kernel() {
  static const GemmKernel k =
      choose_gemm_kernel(std::getenv("MOE_GEMM_KERNEL"), gemm_cpu_has_avx2(), gemm_cpu_has_avx512());
  return k;
}

const char* gemm_kernel_name(GemmKernel k) {
  switch (k) {
    case GemmKernel::avx2: return "avx2";
    case GemmKernel::avx512: return "avx512";
    default: return "portable";
  }
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm(gemm_kernel(), trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const Kernel& kern = kernel_of(kernel);
  if (K <= 0 || alpha == 0.f) {
    scale_rows(C, ldc, 0, M, 0, N, beta);
    return;
  }
  // beta 0: the tiles of the first k block write 0 + acc (a row of zeros as the bias), which
  // is what adding to C set to 0 gives, without that pass over C.
  const float* zeros = beta == 0.f ? grown(t_scratch.zeros, N) : nullptr;
  kern.packed(kern.tile, kern.transpose, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, zeros, false);
}

void gemm_bias(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc, bool relu) {
  gemm_bias(gemm_kernel(), trans_a, trans_b, M, N, K, A, lda, B, ldb, bias, C, ldc, relu);
}

void gemm_bias(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
               int64_t lda, const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc, bool relu) {
  if (M <= 0 || N <= 0) return;
  if (!bias) bias = grown(t_scratch.zeros, N);
  if (K <= 0) {
    gemm_common::bias_rows(C, ldc, M, N, bias, relu);
    return;
  }
  const Kernel& kern = kernel_of(kernel);
  kern.packed(kern.tile, kern.transpose, trans_a, trans_b, M, N, K, 1.f, A, lda, B, ldb, 1.f, C, ldc, bias, relu);
}

void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                    int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(at(A, trans_a, lda, i, k)) * double(at(B, trans_b, ldb, k, j));
      float& c = C[i * ldc + j];
      c = float(alpha * s) + (beta == 0.f ? 0.f : beta * c);
    }
}

}  // namespace moe
