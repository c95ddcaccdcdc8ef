#include "moe/nn/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/kernels/expf.hpp"

namespace moe {

Attention Attention::make(ParamBuilder& pb, const std::string& prefix, int64_t C, int64_t H, float scale) {
  Attention a;
  a.C = C, a.H = H, a.D = C / H, a.scale = scale;
  a.qkv = Linear::make(pb, prefix + "qkv", C, 3 * C, false);
  a.proj = Linear::make(pb, prefix + "proj", C, C, true);
  return a;
}

Tensor Attention::forward(Graph& g, const ParamStore& ps, const Tensor& h, float p, bool training, Rng& rng,
                          Remake& mem) const {
  const Tensor q_k_v = qkv.forward(g, ps, h, mem.next());  // (B, T, 3C)
  const Tensor a = causal_attention(g, q_k_v, H, scale, p, training, rng, mem.next());  // (B, T, C)
  return proj.forward(g, ps, a, mem.next());
}

void Attention::decode(const ParamStore& ps, KVCache& cache, int64_t layer, int64_t n) const {
  KVCache::Work& w = cache.work;
  qkv.decode(ps, w.normed.data(), n, w.qkv.data());  // (n, 3C)
  const int64_t T_max = int64_t(w.scores.size());  // new_cache sizes the scores by block_size
  const float* q_k_v = w.qkv.data();
  float* kc = cache.k.data() + layer * T_max * C;  // (T_max, C)
  float* vc = cache.v.data() + layer * T_max * C;  // (T_max, C)
  const int64_t p0 = cache.len;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kc + (p0 + i) * C, q_k_v + i * 3 * C + C, sizeof(float) * size_t(C));
    std::memcpy(vc + (p0 + i) * C, q_k_v + i * 3 * C + 2 * C, sizeof(float) * size_t(C));
  }
  float* y = w.heads.data();
  std::fill(y, y + n * C, 0.f);
  float* s = w.scores.data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = p0 + i + 1;  // causal: positions 0..p0+i
    const float* q = q_k_v + i * 3 * C;
    for (int64_t h = 0; h < H; ++h) {
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        float dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += q[h * D + d] * kc[j * C + h * D + d];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      float z = 0;
      for (int64_t j = 0; j < len; ++j) s[j] -= mx;
      exp_floats(s, s, len);
      for (int64_t j = 0; j < len; ++j) z += s[j];
      float* out = y + i * C + h * D;
      for (int64_t j = 0; j < len; ++j)
        for (int64_t d = 0; d < D; ++d) out[d] += s[j] / z * vc[j * C + h * D + d];
    }
  }
  proj.decode(ps, y, n, w.sub.data());
}

}  // namespace moe
