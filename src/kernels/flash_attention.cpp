// Tiled causal attention (see moe/kernels/flash_attention.hpp): blocks of kTile queries against
// blocks of kTile keys, the weights of a block made (and, in the backward, made again) in a
// kTile × kTile buffer.
#include "moe/kernels/flash_attention.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "moe/kernels/bits.hpp"
#include "moe/kernels/expf.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
const v8i kIota = {0, 1, 2, 3, 4, 5, 6, 7};  // each lane's index
constexpr int64_t kLanes = 8;
constexpr int64_t kTile = 16;  // queries and keys per block: two registers of lanes

inline v8 load8(const float* p) {
  v8 x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
inline void store8(float* p, v8 x) { __builtin_memcpy(p, &x, sizeof x); }

// T rounded up to the tile: the row length of the transposed keys and values.
inline int64_t padded(int64_t T) { return (T + kTile - 1) / kTile * kTile; }

// dst[d * ld + s] = src[s * lds + d] for s < rows, d < D, and 0 for rows <= s < ld.
void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t D, float* dst, int64_t ld) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t d = 0; d < D; ++d) dst[d * ld + s] = src[s * lds + d];
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + rows, dst + (d + 1) * ld, 0.f);
}

// S[r * kTile + c] = Σ_d a[r * lda + d] · xt[d * ld + c] for r < kTile, c < kTile: four rows side
// by side. Rows r >= R repeat row R - 1 (so they read only rows that exist); callers ignore them.
// Columns past the data come from xt's zero padding; callers mask them.
void block_dots(const float* a, int64_t lda, int64_t R, const float* xt, int64_t ld, int64_t D, float* S) {
  for (int64_t r0 = 0; r0 < kTile; r0 += 4) {
    const float* row[4];
    for (int64_t i = 0; i < 4; ++i) row[i] = a + std::min(r0 + i, R - 1) * lda;
    v8 acc[4][2] = {};
    for (int64_t d = 0; d < D; ++d) {
      const v8 x0 = load8(xt + d * ld), x1 = load8(xt + d * ld + kLanes);
#pragma GCC unroll 4
      for (int64_t i = 0; i < 4; ++i) {
        acc[i][0] += row[i][d] * x0;
        acc[i][1] += row[i][d] * x1;
      }
    }
    for (int64_t i = 0; i < 4; ++i) {
      store8(S + (r0 + i) * kTile, acc[i][0]);
      store8(S + (r0 + i) * kTile + kLanes, acc[i][1]);
    }
  }
}

// out[r * ldo + d] += Σ_{s<n} c[r * ldc + s] · x[s * ldx + d] for r < R, d < D, in order of s.
void weighted_rows(const float* c, int64_t ldc, int64_t R, int64_t n, const float* x, int64_t ldx, int64_t D,
                   float* out, int64_t ldo) {
  for (int64_t r = 0; r < R; ++r) {
    const float* cr = c + r * ldc;
    float* o = out + r * ldo;
    int64_t d0 = 0;
    for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) {
      v8 acc[4];
      for (int64_t i = 0; i < 4; ++i) acc[i] = load8(o + d0 + i * kLanes);
      for (int64_t s = 0; s < n; ++s) {
        const float w = cr[s];
#pragma GCC unroll 4
        for (int64_t i = 0; i < 4; ++i) acc[i] += w * load8(x + s * ldx + d0 + i * kLanes);
      }
      for (int64_t i = 0; i < 4; ++i) store8(o + d0 + i * kLanes, acc[i]);
    }
    for (; d0 + kLanes <= D; d0 += kLanes) {
      v8 acc = load8(o + d0);
      for (int64_t s = 0; s < n; ++s) acc += cr[s] * load8(x + s * ldx + d0);
      store8(o + d0, acc);
    }
    for (; d0 < D; ++d0) {
      float acc = o[d0];
      for (int64_t s = 0; s < n; ++s) acc += cr[s] * x[s * ldx + d0];
      o[d0] = acc;
    }
  }
}

// A thread's slot of the work buffer.
struct Work {
  float *kt, *vt;         // D × Tp: the (batch, key/value head)'s keys and values transposed
  float *S, *P, *dP;      // kTile × kTile blocks
  float *PT, *dST;        // kTile × kTile: P' and dS transposed (row c: key c's column)
  float *O, *m, *l;       // kTile × D accumulator, the rows' running maximum and denominator
  float *dK, *dV;         // kTile × D
  float* Dt;              // Tp: dy·y per row
  static int64_t floats(int64_t T, int64_t D) {
    const int64_t Tp = padded(T);
    return 2 * D * Tp + 5 * kTile * kTile + 3 * kTile * D + 2 * kTile + Tp;
  }
  Work(float* w, int64_t T, int64_t D) {
    const int64_t Tp = padded(T);
    kt = w, vt = kt + D * Tp, S = vt + D * Tp, P = S + kTile * kTile, dP = P + kTile * kTile;
    PT = dP + kTile * kTile, dST = PT + kTile * kTile, O = dST + kTile * kTile, m = O + kTile * D;
    l = m + kTile, dK = l + kTile, dV = dK + kTile * D, Dt = dV + kTile * D;
  }
};

// The keep bits of row t's keys s0 .. s0+15 (bit c: key s0+c; those past the row are
// garbage) from (batch, head) bh's bits, which start at bit `first`.
inline uint32_t keep_word(const uint16_t* mask, int64_t first, int64_t t, int64_t s0) {
  return bits_from(mask, first + t * (t + 1) / 2 + s0);
}

// f[c] = keep if bit c of `bits` is set, else 0, for c < kTile.
inline void keep_factors(uint32_t bits, float keep, float* f) {
  for (int64_t c0 = 0; c0 < kTile; c0 += kLanes) {
    const v8i on = (v8i{} + int32_t(bits >> c0)) >> kIota & 1;
    store8(f + c0, on != 0 ? v8{} + keep : v8{});
  }
}

// The largest of S[c]·scale over c < lim, and m.
inline float row_max(const float* S, int64_t lim, float scale, float m) {
  v8 mx = v8{} + m;
  for (int64_t c0 = 0; c0 < kTile; c0 += kLanes) {
    const v8 x = load8(S + c0) * scale;
    mx = kIota + int32_t(c0) < int32_t(lim) && x > mx ? x : mx;
  }
  float r = mx[0];
  for (int64_t j = 1; j < kLanes; ++j) r = std::max(r, mx[j]);
  return r;
}

// P[r][c] = exp(S[r][c]·scale - sub[r]) for the keys row t0+r sees in the block from s0 (c <
// lim_r = min(nc, t0 + r - s0 + 1)), 0 past them. With mx non-null, sub[r] is first raised to the
// row's maximum (the online softmax) and mx[r] gets it. Masked lanes enter exp as 0, so that none
// takes its slow path, and leave as 0.
void block_exp(const float* S, int64_t R, int64_t t0, int64_t s0, int64_t nc, float scale, float* sub, float* P) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t lim = std::min(nc, t0 + r - s0 + 1);
    const float* x = S + r * kTile;
    float* p = P + r * kTile;
    for (int64_t c = 0; c < kTile; ++c) p[c] = c < lim ? x[c] * scale - sub[r] : 0.f;
  }
  exp_floats(P, P, R * kTile);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t lim = std::min(nc, t0 + r - s0 + 1);
    std::fill(P + r * kTile + lim, P + (r + 1) * kTile, 0.f);
  }
}

}  // namespace

int64_t flash_attention_work_floats(const FlashAttentionShape& s) { return Work::floats(s.T, s.D); }

// The sizes of a call, and f(b, j, work) for every (batch b, key/value head j) in parallel, each on
// its thread's slot of the work buffer.
struct Dims {
  int64_t B, T, H, H_kv, D, C, W, G, Tp, tri, slot;
  explicit Dims(const FlashAttentionShape& s)
      : B(s.B), T(s.T), H(s.H), H_kv(s.H_kv), D(s.D), C(s.H * s.D), W(C + 2 * s.H_kv * s.D), G(s.H / s.H_kv),
        Tp(padded(s.T)), tri(s.T * (s.T + 1) / 2), slot(Work::floats(s.T, s.D)) {}
  template <class F>
  void for_each_kv_head(float* work, const F& f) const {
#pragma omp parallel for schedule(static) if (B * H * T * T * D > kParallelMinWork)
    for (int64_t bj = 0; bj < B * H_kv; ++bj) {
      Work w(work + omp_get_thread_num() * slot, T, D);
      f(bj / H_kv, bj % H_kv, w);
    }
  }
};

void flash_attention_forward(const float* qkv, const FlashAttentionShape& s, const uint16_t* mask, float keep,
                             float* y, float* lse, float* work) {
  const Dims n(s);
  const int64_t T = n.T, H = n.H, H_kv = n.H_kv, D = n.D, C = n.C, W = n.W, G = n.G, Tp = n.Tp, tri = n.tri;
  const float scale = s.scale;
  n.for_each_kv_head(work, [&](int64_t b, int64_t j, Work& w) {
    const float* kb = qkv + b * T * W + C + j * D;  // key head j; its values at + H_kv·D
    const float* vb = kb + H_kv * D;
    transpose_rows(kb, W, T, D, w.kt, Tp);
    for (int64_t h = j * G; h < (j + 1) * G; ++h) {
      const int64_t bh = b * H + h;
      const float* qb = qkv + b * T * W + h * D;
      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t R = std::min(kTile, T - t0);
        std::fill(w.O, w.O + kTile * D, 0.f);
        std::fill(w.m, w.m + kTile, -INFINITY);
        std::fill(w.l, w.l + kTile, 0.f);
        for (int64_t s0 = 0; s0 < t0 + R; s0 += kTile) {  // s0 <= t0: every row sees key s0
          const int64_t nc = std::min(kTile, T - s0);
          block_dots(qb + t0 * W, W, R, w.kt + s0, Tp, D, w.S);
          float mx[kTile];
          for (int64_t r = 0; r < R; ++r)
            mx[r] = row_max(w.S + r * kTile, std::min(nc, t0 + r - s0 + 1), scale, w.m[r]);
          block_exp(w.S, R, t0, s0, nc, scale, mx, w.P);
          for (int64_t r = 0; r < R; ++r) {
            const float alpha = w.m[r] == -INFINITY ? 0.f : exp_float(w.m[r] - mx[r]);
            float z = 0.f;
            for (int64_t c = 0; c < kTile; ++c) z += w.P[r * kTile + c];
            w.l[r] = w.l[r] * alpha + z;
            w.m[r] = mx[r];
            for (int64_t d = 0; d < D; ++d) w.O[r * D + d] *= alpha;
            if (mask) {  // P is 0 past the row's keys
              float f[kTile];
              keep_factors(keep_word(mask, bh * tri, t0 + r, s0), keep, f);
              for (int64_t c = 0; c < kTile; ++c) w.P[r * kTile + c] *= f[c];
            }
          }
          weighted_rows(w.P, kTile, R, nc, vb + s0 * W, W, D, w.O, D);
        }
        for (int64_t r = 0; r < R; ++r) {
          const int64_t t = t0 + r;
          const float inv = 1.f / w.l[r];
          for (int64_t d = 0; d < D; ++d) y[(b * T + t) * C + h * D + d] = w.O[r * D + d] * inv;
          lse[bh * T + t] = w.m[r] + std::log(w.l[r]);
        }
      }
    }
  });
}

void flash_attention_backward(const float* qkv, const float* y, const float* dy, const float* lse,
                              const FlashAttentionShape& s, const uint16_t* mask, float keep, float* dqkv, float* work) {
  const Dims n(s);
  const int64_t T = n.T, H = n.H, H_kv = n.H_kv, D = n.D, C = n.C, W = n.W, G = n.G, Tp = n.Tp, tri = n.tri;
  const float scale = s.scale;
  n.for_each_kv_head(work, [&](int64_t b, int64_t j, Work& w) {
    const float* kb = qkv + b * T * W + C + j * D;
    const float* vb = kb + H_kv * D;
    float* gk = dqkv + b * T * W + C + j * D;
    float* gv = gk + H_kv * D;
    transpose_rows(kb, W, T, D, w.kt, Tp);
    transpose_rows(vb, W, T, D, w.vt, Tp);
    // The query heads of the group one after the other, each adding into the group's key and
    // value gradients after the previous one.
    for (int64_t h = j * G; h < (j + 1) * G; ++h) {
      const int64_t bh = b * H + h;
      const float* qb = qkv + b * T * W + h * D;
      float* gq = dqkv + b * T * W + h * D;
      const float* dyb = dy + b * T * C + h * D;  // row t at + t·C
      const float* yb = y + b * T * C + h * D;
      const float* L = lse + bh * T;
      for (int64_t t = 0; t < T; ++t) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += dyb[t * C + d] * yb[t * C + d];
        w.Dt[t] = acc;
      }
      for (int64_t s0 = 0; s0 < T; s0 += kTile) {
        const int64_t nc = std::min(kTile, T - s0);
        std::fill(w.dK, w.dK + kTile * D, 0.f);
        std::fill(w.dV, w.dV + kTile * D, 0.f);
        for (int64_t t0 = s0; t0 < T; t0 += kTile) {
          const int64_t R = std::min(kTile, T - t0);
          block_dots(qb + t0 * W, W, R, w.kt + s0, Tp, D, w.S);
          block_dots(dyb + t0 * C, C, R, w.vt + s0, Tp, D, w.dP);
          float sub[kTile];
          for (int64_t r = 0; r < R; ++r) sub[r] = L[t0 + r];
          block_exp(w.S, R, t0, s0, nc, scale, sub, w.P);
          std::fill(w.PT, w.PT + kTile * kTile, 0.f);
          std::fill(w.dST, w.dST + kTile * kTile, 0.f);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t t = t0 + r, lim = std::min(nc, t - s0 + 1);
            float f[kTile];
            if (mask)
              keep_factors(keep_word(mask, bh * tri, t, s0), keep, f);
            else
              std::fill(f, f + kTile, 1.f);
            float* p = w.P + r * kTile;
            float* dp = w.dP + r * kTile;
            for (int64_t c = 0; c < lim; ++c) {
              const float ds = p[c] * (dp[c] * f[c] - w.Dt[t]) * scale;
              w.PT[c * kTile + r] = p[c] * f[c];
              w.dST[c * kTile + r] = ds;
              dp[c] = ds;
            }
            std::fill(dp + lim, dp + kTile, 0.f);
          }
          weighted_rows(w.PT, kTile, nc, R, dyb + t0 * C, C, D, w.dV, D);  // dv[s] += Σ_t P'[t, s] dy[t]
          weighted_rows(w.dST, kTile, nc, R, qb + t0 * W, W, D, w.dK, D);  // dk[s] += Σ_t dS[t, s] q[t]
          weighted_rows(w.dP, kTile, R, nc, kb + s0 * W, W, D, gq + t0 * W, W);  // dq[t] += Σ_s dS[t, s] k[s]
        }
        for (int64_t c = 0; c < nc; ++c)
          for (int64_t d = 0; d < D; ++d) {
            gk[(s0 + c) * W + d] += w.dK[c * D + d];
            gv[(s0 + c) * W + d] += w.dV[c * D + d];
          }
      }
    }
  });
}

}  // namespace moe
