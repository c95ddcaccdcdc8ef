// Fused causal multi-head attention: one parallel loop over (batch, key/value head) forward and
// backward, the query heads of a group (grouped-query attention) one after the other.
#include <omp.h>

#include <algorithm>
#include <cmath>
#if defined(__FMA__)
#include <immintrin.h>
#endif

#include "moe/kernels/bits.hpp"
#include "moe/kernels/expf.hpp"
#include "moe/kernels/flash_attention.hpp"
#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// 8 lanes (one AVX register with the build's x86-64-v3 flags; GCC splits it elsewhere).
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));  // lane masks and indices
constexpr int64_t kLanes = 8;
const v8i kIota = {0, 1, 2, 3, 4, 5, 6, 7};  // each lane's index

// The lanes of positions s0 .. s0+7 that row t sees (s <= t): all bits set, 0 past t.
inline v8i seen8(int64_t s0, int64_t t) { return kIota + int32_t(s0) <= int32_t(t); }

inline v8 load8(const float* p) {
  v8 x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}

// dst[d * ld + s] = src[s * lds + d] for s < rows, d < D: the keys or values of one
// (batch, head) with positions along the lanes.
void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t D, float* dst, int64_t ld) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t d = 0; d < D; ++d) dst[d * ld + s] = src[s * lds + d];
}

// out[r * ldo + s] = Σ_d a[r * lda + d] · xt[d][s] for r < R and s < n rounded up to 8, eight
// positions at a time: each product rounded, then added in order of d, never fused into an fma
// (fp-contract off here). That is what GCC made of the scalar loop `dot += a[d] * x[d]` for D
// a multiple of 4 with the x86-64-v3 flags (products in vmulps, an in-order sum), and what
// every build computes when there is no FMA. The R rows run side by side, so their sums do
// not wait on each other. xt holds n rounded up to 8 columns; each out row as many.
template <int64_t R>
__attribute__((optimize("fp-contract=off"))) void dots(const float* a, int64_t lda, const float* xt, int64_t ld,
                                                        int64_t D, int64_t n, float* out, int64_t ldo) {
  for (int64_t s0 = 0; s0 < n; s0 += kLanes) {
    v8 acc[R] = {};
    for (int64_t d = 0; d < D; ++d) {
      const v8 x = load8(xt + d * ld + s0);
#pragma GCC unroll 8
      for (int64_t r = 0; r < R; ++r) acc[r] += a[r * lda + d] * x;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) __builtin_memcpy(out + r * ldo + s0, &acc[r], sizeof acc[r]);
  }
}

// The dot products of rows t0 .. t0+R-1 (R <= kRows) with the positions they see, s <= t:
// eight rows side by side, the rest one by one (the same sums either way).
constexpr int64_t kRows = 8;
void dots_block(const float* a, int64_t lda, int64_t t0, int64_t R, const float* xt, int64_t ld, int64_t D,
                float* out, int64_t ldo) {
  if (R == kRows) return dots<kRows>(a, lda, xt, ld, D, t0 + R, out, ldo);
  for (int64_t r = 0; r < R; ++r) dots<1>(a + r * lda, lda, xt, ld, D, t0 + r + 1, out + r * ldo, ldo);
}

// out[r * ldo + d] += Σ_{s<n} c[r * ldc + s] · x[s·ldx + d] for r < R, d < D: one multiply-add
// a position in order of s for each element, 8 columns held in a register, the R rows (and
// two column chunks where D allows) side by side as independent chains.
template <int64_t R>
void add_weighted_rows(const float* c, int64_t ldc, int64_t n, const float* x, int64_t ldx, int64_t D, float* out,
                       int64_t ldo) {
  int64_t d0 = 0;
  for (; d0 + 2 * kLanes <= D; d0 += 2 * kLanes) {
    v8 acc[R][2];
#pragma GCC unroll 4
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < 2; ++h) acc[r][h] = load8(out + r * ldo + d0 + h * kLanes);
    for (int64_t s = 0; s < n; ++s) {
      const v8 x0 = load8(x + s * ldx + d0), x1 = load8(x + s * ldx + d0 + kLanes);
#pragma GCC unroll 4
      for (int64_t r = 0; r < R; ++r) {
        acc[r][0] += c[r * ldc + s] * x0;
        acc[r][1] += c[r * ldc + s] * x1;
      }
    }
#pragma GCC unroll 4
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < 2; ++h) __builtin_memcpy(out + r * ldo + d0 + h * kLanes, &acc[r][h], sizeof(v8));
  }
  for (; d0 + kLanes <= D; d0 += kLanes) {
    v8 acc[R];
#pragma GCC unroll 4
    for (int64_t r = 0; r < R; ++r) acc[r] = load8(out + r * ldo + d0);
    for (int64_t s = 0; s < n; ++s) {
      const v8 x0 = load8(x + s * ldx + d0);
#pragma GCC unroll 4
      for (int64_t r = 0; r < R; ++r) acc[r] += c[r * ldc + s] * x0;
    }
#pragma GCC unroll 4
    for (int64_t r = 0; r < R; ++r) __builtin_memcpy(out + r * ldo + d0, &acc[r], sizeof(v8));
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = d0; d < D; ++d)
      for (int64_t s = 0; s < n; ++s) out[r * ldo + d] += c[r * ldc + s] * x[s * ldx + d];
}

// Row t of the attention weights before normalising, in place: row[s] = exp(x[s] - max) for
// s <= t and 0 past t up to t+1 rounded up to 8, where x[s] = row[s] · scale (row holds that
// many finite values). Eight positions at a time; the lanes past t enter exp as 0 (so that no
// lane takes its slow path) and leave as 0.
void softmax_numerators(float* row, int64_t t, float scale) {
  const int64_t n8 = (t + kLanes) / kLanes * kLanes;
  v8 mxv = -INFINITY - v8{};
  for (int64_t s0 = 0; s0 < n8; s0 += kLanes) {
    const v8 x = load8(row + s0) * scale;
    __builtin_memcpy(row + s0, &x, sizeof x);
    const v8i seen = seen8(s0, t);
    mxv = seen && x > mxv ? x : mxv;
  }
  float mx = mxv[0];
  for (int64_t j = 1; j < kLanes; ++j) mx = std::max(mx, mxv[j]);
  for (int64_t s0 = 0; s0 < n8; s0 += kLanes) {
    const v8i seen = seen8(s0, t);
    const v8 x = seen ? load8(row + s0) - mx : v8{};
    __builtin_memcpy(row + s0, &x, sizeof x);
  }
  exp_floats(row, row, n8);
  const int64_t s0 = n8 - kLanes;  // exp(0) = 1 past t: only the last eight hold such lanes
  const v8 e = seen8(s0, t) ? load8(row + s0) : v8{};
  __builtin_memcpy(row + s0, &e, sizeof e);
}

// The weighted sums of rows t0 .. t0+R-1, row t over the positions s <= t: in groups of four
// rows, side by side over the positions all four see, then each row alone over the rest of
// its own. Each element still adds its terms in order of s.
void add_weighted_block(const float* c, int64_t ldc, int64_t t0, int64_t R, const float* x, int64_t ldx,
                        int64_t D, float* out, int64_t ldo) {
  constexpr int64_t G = 4;
  int64_t r0 = 0;
  for (; r0 + G <= R; r0 += G) {
    const int64_t common = t0 + r0 + 1;
    add_weighted_rows<G>(c + r0 * ldc, ldc, common, x, ldx, D, out + r0 * ldo, ldo);
    for (int64_t r = r0 + 1; r < r0 + G; ++r)
      add_weighted_rows<1>(c + r * ldc + common, ldc, t0 + r + 1 - common, x + common * ldx, ldx, D,
                           out + r * ldo, ldo);
  }
  for (int64_t r = r0; r < R; ++r) add_weighted_rows<1>(c + r * ldc, ldc, t0 + r + 1, x, ldx, D, out + r * ldo, ldo);
}

// The same sums for rows s0 .. s0+R-1 of out, row s over the positions t >= s up to n (c's
// row r holds the weights of row s0+r at every position t; x's row t the vector of position
// t): each row alone over its first positions, then in groups of four rows side by side over
// the positions all four see. Each element adds its terms in order of t.
void add_weighted_block_from_diagonal(const float* c, int64_t ldc, int64_t s0, int64_t R, int64_t n,
                                      const float* x, int64_t ldx, int64_t D, float* out, int64_t ldo) {
  constexpr int64_t G = 4;
  int64_t r0 = 0;
  for (; r0 + G <= R; r0 += G) {
    const int64_t common = s0 + r0 + G - 1;  // the first position all four rows see
    for (int64_t r = r0; r < r0 + G - 1; ++r) {
      const int64_t s = s0 + r;
      add_weighted_rows<1>(c + r * ldc + s, ldc, common - s, x + s * ldx, ldx, D, out + r * ldo, ldo);
    }
    if (n > common)
      add_weighted_rows<G>(c + r0 * ldc + common, ldc, n - common, x + common * ldx, ldx, D, out + r0 * ldo, ldo);
  }
  for (int64_t r = r0; r < R; ++r) {
    const int64_t s = s0 + r;
    add_weighted_rows<1>(c + r * ldc + s, ldc, n - s, x + s * ldx, ldx, D, out + r * ldo, ldo);
  }
}

// Rows t0 .. t0+R-1 of out (row stride ldo) = Σ_{s<=t} w[r][s] v[s] (w's row stride ldw).
void attend_rows(const float* w, int64_t ldw, int64_t t0, int64_t R, const float* v, int64_t ldv, int64_t D,
                 float* out, int64_t ldo) {
  for (int64_t r = 0; r < R; ++r) std::fill(out + r * ldo, out + r * ldo + D, 0.f);
  add_weighted_block(w, ldw, t0, R, v, ldv, D, out, ldo);
}

// The mask bits of a (batch, head), from entry `first` of the op's (row t's from
// first + t(t+1)/2).
struct MaskBits {
  const uint16_t* bits;  // null: no dropout
  int64_t first;
};

// v[i] (row i, 8 columns) -> v[c] (column c, 8 rows).
inline void transpose8(v8 v[8]) {
  v8 t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // interleave rows 2i and 2i+1 within each half
    t[2 * i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * i + 1] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i)  // pairs of pairs: rows 4i..4i+3 of columns c, c+4 in u[4i + c]
    for (int j = 0; j < 2; ++j) {
      u[4 * i + 2 * j] = __builtin_shufflevector(t[4 * i + j], t[4 * i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * i + 2 * j + 1] = __builtin_shufflevector(t[4 * i + j], t[4 * i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int c = 0; c < 4; ++c) {  // the halves: column c from the low ones, c + 4 from the high
    v[c] = __builtin_shufflevector(u[c], u[4 + c], 0, 1, 2, 3, 8, 9, 10, 11);
    v[c + 4] = __builtin_shufflevector(u[c], u[4 + c], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// The dropout factors of row t at positions s0 .. s0+7: `keep` where kept (1 without dropout),
// 0 where dropped or past t.
inline v8 dropout_factors8(const MaskBits& M, float keep, int64_t t, int64_t s0) {
  const v8 zero = {};
  uint32_t valid = s0 + kLanes <= t + 1 ? 0xFFu : (1u << (t + 1 - s0)) - 1u;
  v8 on = 1.f - zero;
  if (M.bits) {
    valid &= bits_from(M.bits, M.first + t * (t + 1) / 2 + s0);
    on = keep - zero;
  }
  const v8i lane_on = (v8i{} + int32_t(valid)) >> kIota & 1;
  return lane_on != 0 ? on : zero;
}

// Row t's weights at positions s0 .. s0+7 (p, 0 past t) after dropout: p times the factors.
inline v8 dropped8(v8 p, const MaskBits& M, float keep, int64_t t, int64_t s0) {
  return M.bits ? p * dropout_factors8(M, keep, t, s0) : p;
}

// Positions s0 .. s0+7 of row t of a lower triangle P (row t from t(t+1)/2), 0 past t. The
// load may read past the row (P needs 8 floats of room after its last).
inline v8 triangle_row8(const float* P, int64_t t, int64_t s0) {
  const v8 x = load8(P + t * (t + 1) / 2 + s0);
  return seen8(s0, t) ? x : v8{};
}

// The forward's weights of rows t0 .. t0+R-1 (R <= kRows; fewer only in a last block) from
// their dot products in S's rows (positions s < t0 + 8): the softmax of each row over s <= t
// into P's triangle (row t from t(t+1)/2), and the weights after dropout into S's rows
// (positions s <= t0, rounded up to 8). Each row's exponentials, the sum z of them in order of
// s (in the lanes of transposed 8x8 tiles), the division and the dropout: eight positions at
// a time.
// Whole blocks (kWhole, R = kRows) are compiled apart, without the missing rows' zeros and
// bounds.
template <bool kWhole>
void forward_rows8(float* S, int64_t Tp, int64_t t0, int64_t rows, float scale, float* P, const MaskBits& M,
                   float keep) {
  const int64_t R = kWhole ? kRows : rows;
  const int64_t n8 = t0 + kLanes;  // t + 1 rounded up to 8, for every row of the block
  for (int64_t r = 0; r < R; ++r) softmax_numerators(S + r * Tp, t0 + r, scale);
  v8 z = {};  // z = Σ_s exp, in order of s, lane r for row t0 + r
  for (int64_t s0 = 0; s0 < n8; s0 += kLanes) {
    v8 c[kRows];
    for (int64_t r = R; r < kRows; ++r) c[r] = v8{};  // a last block's missing rows
    for (int64_t r = 0; r < R; ++r) c[r] = load8(S + r * Tp + s0);
    transpose8(c);
    for (int64_t j = 0; j < kLanes; ++j) z += c[j];
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = t0 + r;
    float* w = S + r * Tp;
    float* row = P + t * (t + 1) / 2;
    const float inv = 1.f / z[r];
    for (int64_t s0 = 0; s0 <= t0; s0 += kLanes) {
      const v8 pv = load8(w + s0) * inv;
      if (s0 < t0) {
        __builtin_memcpy(row + s0, &pv, sizeof pv);
      } else {
        for (int64_t j = 0; j <= r; ++j) row[s0 + j] = pv[j];
      }
      const v8 wv = dropped8(pv, M, keep, t, s0);
      __builtin_memcpy(w + s0, &wv, sizeof wv);
    }
  }
}

// c + a·b with the product rounded first (never an fma), and with one fma where the target has
// it (what GCC makes of `c += a * b` then, as it contracts it).
__attribute__((optimize("fp-contract=off"))) v8 add_rounded_product(v8 a, v8 b, v8 c) { return c + a * b; }
inline v8 add_fused_product(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
  return v8(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
  return c + a * b;
#endif
}

// The backward pass's work on the weights of rows t0 .. t0+R-1 (R <= kRows; fewer only in a
// last block): for each row t, over s <= t, with m the dropout factor (1 without dropout),
//   WT[s][t] = P[t, s] · m,  dp[s] = dP[t, s] · m,  Σ = Σ_s P[t, s] · dp[s] (in order of s),
//   dS[t, s] = P[t, s] · (dp[s] − Σ) · scale, into DP's row and ST[s][t];
// eight positions of the eight rows at a time (a block's missing rows as zeros), the tiles
// transposed in registers, the sums Σ running side by side in the lanes (a term past t is
// P = 0 times dp = ±0, which leaves a sum that starts at +0 as it is). Σ rounds as GCC 12 made
// the row-at-a-time loop this replaced, `dot += P[s] * dp[s]`, with the x86-64-v3 flags:
// with dropout, one fma a term; without, its vectorised form, each product rounded and then
// added, but for the last (t+1) mod 4 terms of the row (its scalar tail), one fma each.
// DP's rows hold dP[t, s] for s < t0 + 8 (and take dS); P is the lower triangle of the (batch,
// head), row t from t(t+1)/2; WT and ST have row stride Tp and a row for each position.
// Whole blocks compiled apart, as forward_rows8's.
template <bool kWhole>
void backward_rows8(const float* P, int64_t t0, int64_t rows, const MaskBits& M, float keep, float scale, float* DP,
                    int64_t Tp, float* WT, float* ST) {
  const int64_t R = kWhole ? kRows : rows;
  const v8 zero = {};
  v8 sum = {};
  for (int64_t s0 = 0; s0 <= t0; s0 += kLanes) {
    const int64_t positions = s0 < t0 ? kLanes : R;  // the rows s0 + j of WT and ST there are
    v8 w[kRows], p[kRows], d[kRows];
    for (int64_t r = R; r < kRows; ++r) w[r] = p[r] = d[r] = zero;  // a last block's missing rows
    for (int64_t r = 0; r < R; ++r) {
      const v8 m = dropout_factors8(M, keep, t0 + r, s0);
      p[r] = triangle_row8(P, t0 + r, s0);
      w[r] = p[r] * m;
      d[r] = load8(DP + r * Tp + s0) * m;
      __builtin_memcpy(DP + r * Tp + s0, &d[r], sizeof d[r]);
    }
    transpose8(w);
    for (int64_t j = 0; j < positions; ++j) __builtin_memcpy(WT + (s0 + j) * Tp + t0, &w[j], sizeof w[j]);
    transpose8(p);
    transpose8(d);
    if (M.bits) {
      for (int64_t j = 0; j < kLanes; ++j) sum = add_fused_product(p[j], d[j], sum);
    } else if (s0 < t0) {
      for (int64_t j = 0; j < kLanes; ++j) sum = add_rounded_product(p[j], d[j], sum);
    } else {  // the diagonal block: lane r's terms fused from j = (r + 1) rounded down to 4, row t0 + r's scalar tail
      const v8i first_fused = (kIota + 1) & ~3;
      for (int64_t j = 0; j < kLanes; ++j)
        sum = int32_t(j) >= first_fused ? add_fused_product(p[j], d[j], sum) : add_rounded_product(p[j], d[j], sum);
    }
  }
  for (int64_t s0 = 0; s0 <= t0; s0 += kLanes) {
    const int64_t positions = s0 < t0 ? kLanes : R;
    v8 ds[kRows];
    for (int64_t r = R; r < kRows; ++r) ds[r] = zero;
    for (int64_t r = 0; r < R; ++r) {
      ds[r] = triangle_row8(P, t0 + r, s0) * (load8(DP + r * Tp + s0) - sum[r]) * scale;
      __builtin_memcpy(DP + r * Tp + s0, &ds[r], sizeof ds[r]);
    }
    transpose8(ds);
    for (int64_t j = 0; j < positions; ++j) __builtin_memcpy(ST + (s0 + j) * Tp + t0, &ds[j], sizeof ds[j]);
  }
}

// causal_attention's output again, from the weights it kept (for its Regen).
struct AttentionOutput {
  float* y;
  const float *qkv, *probs;
  const uint16_t* mask;
  float* work;
  int64_t B, T, C, H, H_kv, Tp, slot;
  float keep;
  void operator()() const {
    const int64_t D = C / H, W = C + 2 * H_kv * D, tri = T * (T + 1) / 2;
#pragma omp parallel for schedule(static) if (B * H * T * T * D > kParallelMinWork)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, j = h / (H / H_kv);
      const float* P = probs + bh * tri;
      const MaskBits M{mask, bh * tri};
      float* S = work + omp_get_thread_num() * slot + D * Tp;
      for (int64_t t0 = 0; t0 < T; t0 += kRows) {
        const int64_t R = std::min(kRows, T - t0);
        for (int64_t r = 0; r < R; ++r) {  // the weights after dropout, as the forward made them
          const int64_t t = t0 + r;
          for (int64_t s0 = 0; s0 <= t0; s0 += kLanes) {
            const v8 wv = dropped8(triangle_row8(P, t, s0), M, keep, t, s0);
            __builtin_memcpy(S + r * Tp + s0, &wv, sizeof wv);
          }
        }
        attend_rows(S, Tp, t0, R, qkv + b * T * W + C + (H_kv + j) * D, W, D, y + (b * T + t0) * C + h * D, C);
      }
    }
  }
};

}  // namespace

Tensor causal_attention(Graph& g, const Tensor& qkv, int64_t H, int64_t H_kv, float scale, float p, bool training,
                        Rng& rng, Regen* regen) {
  MOE_CHECK(H >= 1 && H_kv >= 1 && H % H_kv == 0, "causal_attention",
            "H=" + std::to_string(H) + " must be a multiple of H_kv=" + std::to_string(H_kv));
  MOE_CHECK(qkv.ndim() == 3 && qkv.size(2) % (H + 2 * H_kv) == 0, "causal_attention",
            "qkv must be [B, T, (H + 2·H_kv)·D] for H=" + std::to_string(H) + ", H_kv=" + std::to_string(H_kv) +
                ", got " + qkv.shape.str());
  const int64_t B = qkv.size(0), T = qkv.size(1), W = qkv.size(2), D = W / (H + 2 * H_kv), C = H * D;
  const int64_t G = H / H_kv;  // query heads per key/value head
  MOE_CHECK(p >= 0.f && p < 1.f, "causal_attention", "dropout probability must be in [0, 1), got " + std::to_string(p));
  const int64_t TT = T * T, tri = T * (T + 1) / 2;
  Tensor y = regen ? g.scratch_output({B, T, C}, qkv) : g.output({B, T, C}, qkv);
  // Attention weights before dropout, kept for the backward: the lower triangles (row t of
  // (batch, head) bh from bh·tri + t(t+1)/2, t+1 weights), as the mask below.
  float* probs = g.arena().alloc_floats(B * H * tri + kLanes);  // room for eight-float loads past the last row
  // Kept or dropped per weight, exactly as dropout() on the [B, H, T, T] weights would draw it,
  // for the weights the causal mask lets through: row t of (batch, head) bh from bit
  // bh·tri + t(t+1)/2. Drawn as bytes, kept as bits.
  uint16_t* mask = nullptr;
  if (training && p > 0.f)  // 3 words of room past the last for bits_from's reads
    mask = keep_bits(g, B * H * tri, 3, [&](uint8_t* bytes) { rng.fill_keep_mask_causal(bytes, B * H, T, p); });
  const float keep = dropout_scale(p);
  // Per thread: the keys (forward) or values (backward) of one (batch, head) transposed, and
  // kRows rows of dot products (then of weights), T rounded up to the lanes; for the backward
  // also the weights after dropout and the score gradients of the (batch, head), transposed
  // (row s holds position s's weight in every row t >= s).
  const int64_t Tp = (T + kLanes - 1) / kLanes * kLanes, slot = D * Tp + kRows * Tp + 2 * T * Tp;
  // Zeroed once: the transposes fill columns [0, T) and the padding lanes stay 0.
  const int64_t work_floats = omp_get_max_threads() * slot;
  float* work = g.arena().alloc_floats(work_floats);
  std::fill(work, work + work_floats, 0.f);

#pragma omp parallel for schedule(static) if (B * H * TT * D > kParallelMinWork)
  for (int64_t bj = 0; bj < B * H_kv; ++bj) {
    const int64_t b = bj / H_kv, j = bj % H_kv;
    const float* kb = qkv.data + b * T * W + C + j * D;  // key head j; its values at + H_kv·D
    float* kt = work + omp_get_thread_num() * slot;
    float* S = kt + D * Tp;
    transpose_rows(kb, W, T, D, kt, Tp);
    for (int64_t h = j * G; h < (j + 1) * G; ++h) {
      const int64_t bh = b * H + h;
      const float* base = qkv.data + b * T * W + h * D;  // query head h
      float* P = probs + bh * tri;
      const MaskBits M{mask, bh * tri};
      // Rows t0 .. t0+R-1 at a time.
      for (int64_t t0 = 0; t0 < T; t0 += kRows) {
        const int64_t R = std::min(kRows, T - t0);
        dots_block(base + t0 * W, W, t0, R, kt, Tp, D, S, Tp);
        (R == kRows ? forward_rows8<true> : forward_rows8<false>)(S, Tp, t0, R, scale, P, M, keep);
        attend_rows(S, Tp, t0, R, kb + H_kv * D, W, D, y.data + (b * T + t0) * C + h * D, C);
      }
    }
  }
  if (regen)
    *regen = make_regen(g, AttentionOutput{y.data, qkv.data, probs, mask, work, B, T, C, H, H_kv, Tp, slot, keep});

  if (y.requires_grad()) {
    g.record([=] {
#pragma omp parallel for schedule(static) if (B * H * TT * D > kParallelMinWork)
      for (int64_t bj = 0; bj < B * H_kv; ++bj) {
        const int64_t b = bj / H_kv, j = bj % H_kv;
        const float* kb = qkv.data + b * T * W + C + j * D;  // key head j; its values at + H_kv·D
        float* gk = qkv.grad + b * T * W + C + j * D;
        float* vt = work + omp_get_thread_num() * slot;
        float* DP = vt + D * Tp;
        float* WT = DP + kRows * Tp;  // WT[s·Tp + t]: P'[t, s], the weight after dropout
        float* ST = WT + T * Tp;      // ST[s·Tp + t]: dS[t, s]
        transpose_rows(kb + H_kv * D, W, T, D, vt, Tp);
        // The query heads of the group one after the other: each adds its terms into the
        // group's key and value gradients after the previous one's.
        for (int64_t h = j * G; h < (j + 1) * G; ++h) {
          const int64_t bh = b * H + h;
          const float* base = qkv.data + b * T * W + h * D;
          float* gbase = qkv.grad + b * T * W + h * D;
          const float* P = probs + bh * tri;
          const MaskBits M{mask, bh * tri};
          const float* dy0 = y.grad + b * T * C + h * D;  // row t at + t·C
          for (int64_t t0 = 0; t0 < T; t0 += kRows) {
            const int64_t R = std::min(kRows, T - t0);
            // dP[s] = dy · v[s] for the block's rows.
            dots_block(dy0 + t0 * C, C, t0, R, vt, Tp, D, DP, Tp);
            (R == kRows ? backward_rows8<true> : backward_rows8<false>)(P, t0, R, M, keep, scale, DP, Tp, WT, ST);
            // dq[t] += Σ_s dS k[s].
            add_weighted_block(DP, Tp, t0, R, kb, W, D, gbase + t0 * W, W);
          }
          // dv[s] += Σ_{t>=s} P'[t, s] dy[t] and dk[s] += Σ_{t>=s} dS[t, s] q[t], each in order of
          // t (as adding row t's terms for t = 0, 1, ... did).
          for (int64_t s0 = 0; s0 < T; s0 += kRows) {
            const int64_t R = std::min(kRows, T - s0);
            add_weighted_block_from_diagonal(WT + s0 * Tp, Tp, s0, R, T, dy0, C, D, gk + H_kv * D + s0 * W, W);
            add_weighted_block_from_diagonal(ST + s0 * Tp, Tp, s0, R, T, base, W, D, gk + s0 * W, W);
          }
        }
      }
    });
  }
  return y;
}

namespace {

// tiled_causal_attention's output again (for its Regen): the same forward, the same bits.
struct TiledAttentionOutput {
  const float* qkv;
  FlashAttentionShape shape;
  const uint16_t* mask;
  float keep;
  float *y, *lse, *work;
  void operator()() const { flash_attention_forward(qkv, shape, mask, keep, y, lse, work); }
};

}  // namespace

Tensor tiled_causal_attention(Graph& g, const Tensor& qkv, int64_t H, int64_t H_kv, float scale, float p,
                              bool training, Rng& rng, Regen* regen) {
  MOE_CHECK(H >= 1 && H_kv >= 1 && H % H_kv == 0, "tiled_causal_attention",
            "H=" + std::to_string(H) + " must be a multiple of H_kv=" + std::to_string(H_kv));
  MOE_CHECK(qkv.ndim() == 3 && qkv.size(2) % (H + 2 * H_kv) == 0, "tiled_causal_attention",
            "qkv must be [B, T, (H + 2·H_kv)·D] for H=" + std::to_string(H) + ", H_kv=" + std::to_string(H_kv) +
                ", got " + qkv.shape.str());
  MOE_CHECK(p >= 0.f && p < 1.f, "tiled_causal_attention",
            "dropout probability must be in [0, 1), got " + std::to_string(p));
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(2) / (H + 2 * H_kv), C = H * D;
  const FlashAttentionShape shape{B, T, H, H_kv, D, scale};
  Tensor y = regen ? g.scratch_output({B, T, C}, qkv) : g.output({B, T, C}, qkv);
  float* lse = g.arena().alloc_floats(B * H * T);
  // The keep bits causal_attention draws, from the same rng draws.
  const int64_t tri = T * (T + 1) / 2;
  uint16_t* mask = nullptr;
  if (training && p > 0.f)
    mask = keep_bits(g, B * H * tri, 3, [&](uint8_t* bytes) { rng.fill_keep_mask_causal(bytes, B * H, T, p); });
  const float keep = dropout_scale(p);
  float* work = g.arena().alloc_floats(omp_get_max_threads() * flash_attention_work_floats(shape));
  flash_attention_forward(qkv.data, shape, mask, keep, y.data, lse, work);
  if (regen) *regen = make_regen(g, TiledAttentionOutput{qkv.data, shape, mask, keep, y.data, lse, work});
  if (y.requires_grad()) {
    g.record([=] { flash_attention_backward(qkv.data, y.data, y.grad, lse, shape, mask, keep, qkv.grad, work); });
  }
  return y;
}

}  // namespace moe
