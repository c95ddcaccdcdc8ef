#include "moe/nn/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/kernels/expf.hpp"
#include "moe/kernels/nn.hpp"
#include "moe/nn/norm.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

Attention Attention::make(ParamBuilder& pb, const std::string& prefix, const Config& cfg) {
  Attention a;
  a.C = cfg.model.n_embed, a.H = cfg.model.n_head, a.H_kv = cfg.kv_heads(), a.D = cfg.head_size();
  a.scale = cfg.attention_scale();
  a.use_rope = cfg.model.position == PositionKind::kRope;
  a.rope_theta = cfg.model.rope_theta;
  a.tiled = cfg.model.attention_kernel == AttentionKernel::kTiled;
  a.qkv = Linear::make(pb, prefix + "qkv", a.C, a.C + 2 * a.H_kv * a.D, false);
  if (cfg.model.qk_norm) {
    a.q_norm = pb.add(prefix + "q_norm.weight", {a.D}, false, {ParamRole::kNormWeight});
    a.k_norm = pb.add(prefix + "k_norm.weight", {a.D}, false, {ParamRole::kNormWeight});
  }
  a.proj = Linear::make(pb, prefix + "proj", a.C, a.C, true);
  return a;
}

Tensor Attention::forward(Graph& g, const ParamStore& ps, const Tensor& h, float p, bool training, Rng& rng,
                          Remake& mem) const {
  PartScope part(Part::Attention);
  Tensor q_k_v = qkv.forward(g, ps, h, mem.next());  // (B, T, C + 2·H_kv·D)
  if (q_norm >= 0) q_k_v = qk_rmsnorm(g, q_k_v, ps.get(q_norm), ps.get(k_norm), H, H_kv);
  if (use_rope) q_k_v = rope(g, q_k_v, H, H_kv, rope_theta);
  const auto attend = tiled ? tiled_causal_attention : causal_attention;
  const Tensor a = attend(g, q_k_v, H, H_kv, scale, p, training, rng, mem.next());  // (B, T, C)
  return proj.forward(g, ps, a, mem.next());
}

void Attention::decode(const ParamStore& ps, KVCache& cache, int64_t layer, int64_t n) const {
  KVCache::Work& w = cache.work;
  const int64_t W = C + 2 * H_kv * D, KC = H_kv * D, G = H / H_kv;
  float* q_k_v = w.qkv.data();
  qkv.decode(ps, w.normed.data(), n, q_k_v);  // (n, W)
  const int64_t T_max = int64_t(w.scores.size());  // new_cache sizes the scores by block_size
  float* kc = cache.k.data() + layer * T_max * KC;  // (T_max, H_kv·D)
  float* vc = cache.v.data() + layer * T_max * KC;  // (T_max, H_kv·D)
  const int64_t p0 = cache.len, half = D / 2;
  if (q_norm >= 0) {
    float* rstd = w.rstd.data();  // free here: the block's norm has run
    for (int64_t i = 0; i < n; ++i) {
      rmsnorm_forward(q_k_v + i * W, rstd, q_k_v + i * W, ps.get(q_norm).data, H, D, Norm::kEps);
      rmsnorm_forward(q_k_v + i * W + C, rstd, q_k_v + i * W + C, ps.get(k_norm).data, H_kv, D, Norm::kEps);
    }
  }
  if (use_rope) {
    if (layer == 0) rope_tables(w.rope_cos.data(), w.rope_sin.data(), p0, n, D, rope_theta);
    for (int64_t i = 0; i < n; ++i)
      rope_forward(q_k_v + i * W, q_k_v + i * W, w.rope_cos.data() + i * half, w.rope_sin.data() + i * half, H + H_kv,
                   D);
  }
  float* y = w.heads.data();
  std::fill(y, y + n * C, 0.f);
  float* s = w.scores.data();
  for (int64_t i = 0; i < n; ++i) {
    // Position p's key and value into slot p % T_max (with learned positions p < T_max), before
    // its query reads them: a later row of a prefill may overwrite a key an earlier row saw.
    const int64_t p = p0 + i, first = std::max<int64_t>(0, p - T_max + 1), len = p - first + 1;
    // The slot of the window's j-th key, oldest first (no division in the loops).
    const int64_t slot0 = first % T_max;
    const auto slot = [&](int64_t j) { return slot0 + j < T_max ? slot0 + j : slot0 + j - T_max; };
    std::memcpy(kc + p % T_max * KC, q_k_v + i * W + C, sizeof(float) * size_t(KC));
    std::memcpy(vc + p % T_max * KC, q_k_v + i * W + C + KC, sizeof(float) * size_t(KC));
    const float* q = q_k_v + i * W;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kv = h / G * D;  // the head's key and value columns
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        const float* k = kc + slot(j) * KC + kv;
        float dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += q[h * D + d] * k[d];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      float z = 0;
      for (int64_t j = 0; j < len; ++j) s[j] -= mx;
      exp_floats(s, s, len);
      for (int64_t j = 0; j < len; ++j) z += s[j];
      float* out = y + i * C + h * D;
      for (int64_t j = 0; j < len; ++j) {
        const float* v = vc + slot(j) * KC + kv;
        for (int64_t d = 0; d < D; ++d) out[d] += s[j] / z * v[d];
      }
    }
  }
  proj.decode(ps, y, n, w.sub.data());
}

}  // namespace moe
