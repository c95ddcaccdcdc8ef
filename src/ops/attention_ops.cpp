// Fused causal multi-head attention: one parallel loop over (batch, head) forward and backward.
#include <algorithm>
#include <cmath>

#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

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
  const float* mask = training && p > 0.f ? dropout_mask(g, B * H * TT, p, rng) : nullptr;

#pragma omp parallel for schedule(static) if (B * H * TT * D > kParallelMinWork)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* base = qkv.data + b * T * C3 + h * D;  // q at +0, k at +C, v at +2C per row
    float* P = probs + bh * TT;
    const float* M = mask ? mask + bh * TT : nullptr;
    for (int64_t t = 0; t < T; ++t) {
      const float* q = base + t * C3;
      float* row = P + t * T;
      float mx = -INFINITY;
      for (int64_t s = 0; s <= t; ++s) {
        const float* k = base + s * C3 + C;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
        row[s] = dot * scale;
        mx = std::max(mx, row[s]);
      }
      float z = 0.f;
      for (int64_t s = 0; s <= t; ++s) z += (row[s] = std::exp(row[s] - mx));
      const float inv = 1.f / z;
      for (int64_t s = 0; s <= t; ++s) row[s] *= inv;
      for (int64_t s = t + 1; s < T; ++s) row[s] = 0.f;
      float* out = y.data + (b * T + t) * C + h * D;
      for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
      for (int64_t s = 0; s <= t; ++s) {
        const float w = M ? row[s] * M[t * T + s] : row[s];
        const float* v = base + s * C3 + 2 * C;
        for (int64_t d = 0; d < D; ++d) out[d] += w * v[d];
      }
    }
  }

  if (y.requires_grad()) {
    float* scratch = g.arena().alloc_floats(B * H * T);  // dP of one row per (batch, head)
    g.record([=] {
#pragma omp parallel for schedule(static) if (B * H * TT * D > kParallelMinWork)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const float* base = qkv.data + b * T * C3 + h * D;
        float* gbase = qkv.grad + b * T * C3 + h * D;
        const float* P = probs + bh * TT;
        const float* M = mask ? mask + bh * TT : nullptr;
        for (int64_t t = 0; t < T; ++t) {
          const float* dy = y.grad + (b * T + t) * C + h * D;
          const float* row = P + t * T;
          // dP[s] = dy · v[s] (through the dropout mask); dv[s] += P'[t, s] dy.
          float* dp = scratch + bh * T;
          float dot_pdp = 0.f;
          for (int64_t s = 0; s <= t; ++s) {
            const float* v = base + s * C3 + 2 * C;
            float* dv = gbase + s * C3 + 2 * C;
            const float m = M ? M[t * T + s] : 1.f;
            float d_pd = 0.f;
            for (int64_t d = 0; d < D; ++d) d_pd += dy[d] * v[d];
            const float w = row[s] * m;
            for (int64_t d = 0; d < D; ++d) dv[d] += w * dy[d];
            dp[s] = d_pd * m;
            dot_pdp += row[s] * dp[s];
          }
          // dS = P (dP - Σ P dP); dq[t] += scale Σ_s dS k[s]; dk[s] += scale dS q[t].
          const float* q = base + t * C3;
          float* dq = gbase + t * C3;
          for (int64_t s = 0; s <= t; ++s) {
            const float ds = row[s] * (dp[s] - dot_pdp) * scale;
            const float* k = base + s * C3 + C;
            float* dk = gbase + s * C3 + C;
            for (int64_t d = 0; d < D; ++d) {
              dq[d] += ds * k[d];
              dk[d] += ds * q[d];
            }
          }
        }
      }
    });
  }
  return y;
}

}  // namespace moe
