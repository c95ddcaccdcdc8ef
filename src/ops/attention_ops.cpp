// Fused causal multi-head attention: one parallel loop over (batch, head) forward and backward.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// 8 lanes (one AVX register with the build's x86-64-v3 flags; GCC splits it elsewhere).
typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

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

// out[s] = Σ_d a[d] · xt[d][s] for s in [0, n), eight positions at a time: each product
// rounded, then added in order of d, never fused into an fma (fp-contract off here). That is
// what GCC made of the scalar loop `dot += a[d] * x[d]` for D a multiple of 4 with the
// x86-64-v3 flags (products in vmulps, an in-order sum), and what every build computes when
// there is no FMA. xt holds n rounded up to 8 columns; out as many.
__attribute__((optimize("fp-contract=off")))
void dots(const float* a, const float* xt, int64_t ld, int64_t D, int64_t n, float* out) {
  for (int64_t s0 = 0; s0 < n; s0 += kLanes) {
    v8 acc = {};
    for (int64_t d = 0; d < D; ++d) {
      acc += a[d] * load8(xt + d * ld + s0);
    }
    __builtin_memcpy(out + s0, &acc, sizeof acc);
  }
}

// out[d] += Σ_{s<n} c[s] · x[s·ldx + d] for d < D: one multiply-add a position in order of s
// for each element, 8 columns held in a register (two independent chains where D allows).
void add_weighted_rows(const float* c, int64_t n, const float* x, int64_t ldx, int64_t D, float* out) {
  int64_t d0 = 0;
  for (; d0 + 2 * kLanes <= D; d0 += 2 * kLanes) {
    v8 acc0 = load8(out + d0), acc1 = load8(out + d0 + kLanes);
    for (int64_t s = 0; s < n; ++s) {
      acc0 += c[s] * load8(x + s * ldx + d0);
      acc1 += c[s] * load8(x + s * ldx + d0 + kLanes);
    }
    __builtin_memcpy(out + d0, &acc0, sizeof acc0);
    __builtin_memcpy(out + d0 + kLanes, &acc1, sizeof acc1);
  }
  for (; d0 + kLanes <= D; d0 += kLanes) {
    v8 acc = load8(out + d0);
    for (int64_t s = 0; s < n; ++s) acc += c[s] * load8(x + s * ldx + d0);
    __builtin_memcpy(out + d0, &acc, sizeof acc);
  }
  for (int64_t d = d0; d < D; ++d)
    for (int64_t s = 0; s < n; ++s) out[d] += c[s] * x[s * ldx + d];
}

}  // namespace

Tensor causal_attention(Graph& g, const Tensor& qkv, int64_t H, float scale, float p, bool training, Rng& rng) {
  MOE_CHECK(qkv.ndim() == 3 && qkv.size(2) % 3 == 0, "causal_attention",
        "qkv must be [B, T, 3C], got " + qkv.shape.str());
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  MOE_CHECK(H >= 1 && C % H == 0, "causal_attention",
        "C=" + std::to_string(C) + " must be divisible by H=" + std::to_string(H));
  MOE_CHECK(p >= 0.f && p < 1.f, "causal_attention", "dropout probability must be in [0, 1), got " + std::to_string(p));
  const int64_t D = C / H, C3 = 3 * C, TT = T * T;
  Tensor y = g.output({B, T, C}, qkv);
  // Attention weights before dropout, kept for the backward; masked entries are 0.
  float* probs = g.arena().alloc_floats(B * H * TT);
  // 0 or 1/(1-p) per weight, exactly as dropout() on the [B, H, T, T] weights would draw it.
  const uint8_t* mask = training && p > 0.f ? dropout_mask(g, B * H * TT, p, rng) : nullptr;
  const float keep = dropout_scale(p);
  // Per thread: the keys (forward) or values (backward) of one (batch, head) transposed, and
  // one row of dot products, T rounded up to the lanes.
  const int64_t Tp = (T + kLanes - 1) / kLanes * kLanes, slot = D * Tp + Tp;
  // Zeroed once: the transposes fill columns [0, T) and the padding lanes stay 0.
  const int64_t work_floats = omp_get_max_threads() * slot;
  float* work = g.arena().alloc_floats(work_floats);
  std::fill(work, work + work_floats, 0.f);

#pragma omp parallel for schedule(static) if (B * H * TT * D > kParallelMinWork)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* base = qkv.data + b * T * C3 + h * D;  // q at +0, k at +C, v at +2C per row
    float* P = probs + bh * TT;
    const uint8_t* M = mask ? mask + bh * TT : nullptr;
    float* kt = work + omp_get_thread_num() * slot;
    float* dot = kt + D * Tp;
    transpose_rows(base + C, C3, T, D, kt, Tp);
    for (int64_t t = 0; t < T; ++t) {
      const float* q = base + t * C3;
      float* row = P + t * T;
      dots(q, kt, Tp, D, t + 1, dot);
      float mx = -INFINITY;
      for (int64_t s = 0; s <= t; ++s) {
        row[s] = dot[s] * scale;
        mx = std::max(mx, row[s]);
      }
      float z = 0.f;
      for (int64_t s = 0; s <= t; ++s) z += (row[s] = std::exp(row[s] - mx));
      const float inv = 1.f / z;
      for (int64_t s = 0; s <= t; ++s) row[s] *= inv;
      for (int64_t s = t + 1; s < T; ++s) row[s] = 0.f;
      // out = Σ_s w[s] v[s], w the weights through the dropout mask (into the scores' row).
      for (int64_t s = 0; s <= t; ++s) dot[s] = M ? row[s] * dropout_factor(M[t * T + s], keep) : row[s];
      float* out = y.data + (b * T + t) * C + h * D;
      std::fill(out, out + D, 0.f);
      add_weighted_rows(dot, t + 1, base + 2 * C, C3, D, out);
    }
  }

  if (y.requires_grad()) {
    g.record([=] {
#pragma omp parallel for schedule(static) if (B * H * TT * D > kParallelMinWork)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const float* base = qkv.data + b * T * C3 + h * D;
        float* gbase = qkv.grad + b * T * C3 + h * D;
        const float* P = probs + bh * TT;
        const uint8_t* M = mask ? mask + bh * TT : nullptr;
        float* vt = work + omp_get_thread_num() * slot;
        float* dp = vt + D * Tp;
        transpose_rows(base + 2 * C, C3, T, D, vt, Tp);
        for (int64_t t = 0; t < T; ++t) {
          const float* dy = y.grad + (b * T + t) * C + h * D;
          const float* row = P + t * T;
          // dP[s] = dy · v[s] (through the dropout mask); dv[s] += P'[t, s] dy.
          dots(dy, vt, Tp, D, t + 1, dp);
          float dot_pdp = 0.f;
          for (int64_t s = 0; s <= t; ++s) {
            float* dv = gbase + s * C3 + 2 * C;
            const float m = M ? dropout_factor(M[t * T + s], keep) : 1.f;
            const float d_pd = dp[s];
            const float w = row[s] * m;
            for (int64_t d = 0; d < D; ++d) dv[d] += w * dy[d];
            dp[s] = d_pd * m;
            dot_pdp += row[s] * dp[s];
          }
          // dS = P (dP - Σ P dP) scale, into dp; dk[s] += dS q[t]; dq[t] += Σ_s dS k[s].
          const float* q = base + t * C3;
          for (int64_t s = 0; s <= t; ++s) dp[s] = row[s] * (dp[s] - dot_pdp) * scale;  // dS
          for (int64_t s = 0; s <= t; ++s) {
            float* dk = gbase + s * C3 + C;
            for (int64_t d = 0; d < D; ++d) dk[d] += dp[s] * q[d];
          }
          add_weighted_rows(dp, t + 1, base + C, C3, D, gbase + t * C3);
        }
      }
    });
  }
  return y;
}

}  // namespace moe
