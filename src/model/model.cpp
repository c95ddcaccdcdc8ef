#include "moe/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/kernels/routing.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

void RoutingStats::reset(int64_t layers, int64_t experts) {
  tokens_per_expert.assign(size_t(layers), std::vector<int64_t>(size_t(experts), 0));
}

Model::Model(const Config& cfg, int64_t vocab_size) : cfg_(cfg), V_(vocab_size) {
  validate(cfg_);
  check(V_ > 0, "Model", "vocabulary is empty");
  C_ = cfg.model.n_embed;
  H_ = cfg.model.n_head;
  D_ = C_ / H_;
  L_ = cfg.model.n_layer;
  E_ = cfg.router.num_experts;
  K_ = cfg.router.top_k;
  F_ = cfg.expert_hidden_size();
  T_max_ = cfg.model.block_size;

  tok_emb_ = add_param("tok_emb.weight", {V_, C_}, false, {Role::kEmbedding});
  pos_emb_ = add_param("pos_emb.weight", {T_max_, C_}, false, {Role::kEmbedding});
  for (int64_t l = 0; l < L_; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    BlockParams b;
    b.ln1 = add_norm(p + "ln1", C_);
    b.qkv = add_linear(p + "attn.qkv", C_, 3 * C_, false);
    b.proj = add_linear(p + "attn.proj", C_, C_, true);
    b.ln2 = add_norm(p + "ln2", C_);
    b.route = add_linear(p + "moe.router.route", C_, E_, true);
    b.noise = add_linear(p + "moe.router.noise", C_, E_, true);
    for (int64_t e = 0; e < E_; ++e) {
      const std::string q = p + "moe.experts." + std::to_string(e) + ".";
      b.experts.push_back({add_linear(q + "fc1", C_, F_, true), add_linear(q + "fc2", F_, C_, true)});
    }
    blocks_.push_back(std::move(b));
  }
  ln_f_ = add_norm("ln_f", C_);
  lm_head_ = add_linear("lm_head", C_, V_, true);
  params_.finalize();
}

int Model::add_param(const std::string& name, const Shape& shape, bool decay, RoleInfo role) {
  const int id = params_.add(name, shape, decay);
  roles_.push_back(role);
  return id;
}

LinearParams Model::add_linear(const std::string& name, int64_t in, int64_t out, bool bias) {
  LinearParams lp;
  lp.in = in;
  lp.out = out;
  lp.weight = add_param(name + ".weight", {out, in}, true, {Role::kLinearWeight, in, out});
  if (bias) lp.bias = add_param(name + ".bias", {out}, false, {Role::kLinearBias, in, out});
  return lp;
}

NormParams Model::add_norm(const std::string& name, int64_t C) {
  return {add_param(name + ".weight", {C}, false, {Role::kNormWeight}),
          add_param(name + ".bias", {C}, false, {Role::kNormBias})};
}

int64_t Model::active_param_count() const {
  int64_t expert = 0;
  for (const ParamInfo& p : params_.infos())
    if (p.name.find(".moe.experts.") != std::string::npos) expert += p.shape.numel();
  return params_.parameter_count() - expert + expert / E_ * K_;
}

void Model::init(Rng& rng) {
  const bool kaiming = cfg_.model.init == "kaiming_normal";
  const float std_dev = float(cfg_.model.init_std);
  for (int id = 0; id < params_.count(); ++id) {
    Tensor t = params_.get(id);
    const int64_t n = t.numel();
    const RoleInfo& r = roles_[size_t(id)];
    switch (r.role) {
      case Role::kNormWeight:
        std::fill(t.data, t.data + n, 1.f);
        break;
      case Role::kNormBias:
        std::fill(t.data, t.data + n, 0.f);
        break;
      case Role::kEmbedding:  // makeMoE keeps PyTorch's Embedding default N(0, 1)
        rng.fill_normal(t.data, n, 0.f, kaiming ? 1.f : std_dev);
        break;
      case Role::kLinearBias:  // PyTorch's Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for makeMoE
        if (kaiming) {
          const float bound = 1.f / std::sqrt(float(r.fan_in));
          rng.fill_uniform(t.data, n, -bound, bound);
        } else {
          std::fill(t.data, t.data + n, 0.f);
        }
        break;
      case Role::kLinearWeight:
        if (kaiming)
          rng.fill_normal(t.data, n, 0.f, float(std::sqrt(2.0 / double(r.fan_in))));
        else if (cfg_.model.init == "xavier")
          rng.fill_normal(t.data, n, 0.f, float(std::sqrt(2.0 / double(r.fan_in + r.fan_out))));
        else
          rng.fill_normal(t.data, n, 0.f, std_dev);
        break;
    }
  }
}

Tensor Model::apply_linear(Graph& g, const LinearParams& lp, const Tensor& x) const {
  Tensor b;
  if (lp.bias >= 0) b = params_.get(lp.bias);
  return linear(g, x, params_.get(lp.weight), b);
}

Tensor Model::apply_norm(Graph& g, const NormParams& np, const Tensor& x) const {
  return layernorm(g, x, params_.get(np.weight), params_.get(np.bias));
}

Tensor Model::attention(Graph& g, const BlockParams& bp, const Tensor& x, const ForwardOptions& opt) {
  const float p = opt.training ? float(cfg_.model.dropout) : 0.f;
  Rng& drop = opt.dropout_rng ? *opt.dropout_rng : unused_rng_;
  Tensor qkv = apply_linear(g, bp.qkv, x);  // (B, T, 3C)
  Tensor q = split_heads(g, slice_cols(g, qkv, 0, C_), H_);       // (B, H, T, D)
  Tensor k = split_heads(g, slice_cols(g, qkv, C_, C_), H_);      // (B, H, T, D)
  Tensor v = split_heads(g, slice_cols(g, qkv, 2 * C_, C_), H_);  // (B, H, T, D)
  Tensor att = scale(g, bmm(g, q, k, false, true), cfg_.attention_scale());  // (B, H, T, T)
  att = dropout(g, causal_softmax(g, att), p, opt.training, drop);
  Tensor y = merge_heads(g, bmm(g, att, v, false, false));  // (B, T, C)
  return dropout(g, apply_linear(g, bp.proj, y), p, opt.training, drop);
}

Tensor Model::moe_ffn(Graph& g, const BlockParams& bp, const Tensor& x, int64_t layer,
                      const ForwardOptions& opt) {
  const int64_t N = x.rows();
  Tensor xf = x.view({N, C_});            // (N, C)
  Tensor logits = apply_linear(g, bp.route, xf);  // (N, E)
  const bool noisy = opt.fixed_noise != nullptr ||
                     (cfg_.router.noisy && (opt.training || cfg_.router.noise_at_eval));
  if (noisy) {
    Tensor noise = g.new_tensor({N, E_}, false);  // (N, E) standard normal
    if (opt.fixed_noise) {
      const auto& fixed = (*opt.fixed_noise)[size_t(layer)];
      check(int64_t(fixed.size()) == N * E_, "Model", "fixed router noise has the wrong size");
      std::memcpy(noise.data, fixed.data(), sizeof(float) * size_t(N * E_));
    } else {
      check(opt.noise_rng != nullptr, "Model", "router noise needs a noise generator");
      opt.noise_rng->fill_normal(noise.data, N * E_);
    }
    Tensor noise_scale = softplus(g, apply_linear(g, bp.noise, xf));
    logits = add(g, logits, mul(g, noise, noise_scale));
  }
  TopK top = topk_softmax(g, logits, K_);  // weights (N, K), index N*K
  if (opt.chosen) (*opt.chosen)[size_t(layer)].assign(top.index, top.index + N * K_);

  int32_t* offsets = g.arena().alloc_ints(E_ + 1);
  int32_t* token = g.arena().alloc_ints(N * K_);
  int32_t* gate_pos = g.arena().alloc_ints(N * K_);
  group_by_expert(top.index, N, K_, E_, offsets, token, gate_pos);
  if (opt.stats)
    for (int64_t e = 0; e < E_; ++e)
      opt.stats->tokens_per_expert[size_t(layer)][size_t(e)] += offsets[e + 1] - offsets[e];

  const float p = opt.training ? float(cfg_.model.dropout) : 0.f;
  Rng& drop = opt.dropout_rng ? *opt.dropout_rng : unused_rng_;
  Tensor acc = g.zeros({N, C_}, g.grad_enabled());  // (N, C)
  for (int64_t e = 0; e < E_; ++e) {
    const int64_t begin = offsets[e], n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;  // only the chosen experts compute
    const ExpertParams& ep = bp.experts[size_t(e)];
    Tensor xe = gather_rows(g, xf, token + begin, n);         // (n, C)
    Tensor h = relu(g, apply_linear(g, ep.fc1, xe));           // (n, F)
    Tensor ye = apply_linear(g, ep.fc2, h);                    // (n, C)
    ye = dropout(g, ye, p, opt.training, drop);
    index_add_weighted(g, acc, ye, token + begin, top.weights, gate_pos + begin, n);
  }
  return acc.view(x.shape);
}

Model::Output Model::forward(Graph& g, const int32_t* idx, const int32_t* targets, int64_t B,
                             int64_t T, const ForwardOptions& opt) {
  check(T >= 1 && T <= T_max_, "Model::forward",
        "sequence length " + std::to_string(T) + " must be in [1, block_size=" + std::to_string(T_max_) + "]");
  check(!(opt.training && cfg_.model.dropout > 0) || opt.dropout_rng != nullptr, "Model::forward",
        "training with dropout needs a dropout generator");
  if (opt.stats && opt.stats->tokens_per_expert.empty()) opt.stats->reset(L_, E_);
  int32_t* pos = g.arena().alloc_ints(B * T);
  for (int64_t i = 0; i < B * T; ++i) pos[i] = int32_t(i % T);
  Tensor x = add(g, embedding(g, idx, params_.get(tok_emb_), {B, T, C_}),
                 embedding(g, pos, params_.get(pos_emb_), {B, T, C_}));  // (B, T, C)
  for (int64_t l = 0; l < L_; ++l) {
    const BlockParams& bp = blocks_[size_t(l)];
    x = add(g, x, attention(g, bp, apply_norm(g, bp.ln1, x), opt));
    x = add(g, x, moe_ffn(g, bp, apply_norm(g, bp.ln2, x), l, opt));
  }
  Output out;
  out.logits = apply_linear(g, lm_head_, apply_norm(g, ln_f_, x));  // (B, T, V)
  if (targets) out.loss = cross_entropy(g, out.logits, targets);
  return out;
}

KVCache Model::new_cache() const {
  KVCache c;
  c.k.assign(size_t(L_ * T_max_ * C_), 0.f);
  c.v.assign(size_t(L_ * T_max_ * C_), 0.f);
  return c;
}

Tensor Model::attention_cached(Graph& g, const BlockParams& bp, const Tensor& x, int64_t n,
                               KVCache& cache, int64_t layer) {
  Tensor qkv = apply_linear(g, bp.qkv, x);  // (1, n, 3C)
  float* kc = cache.k.data() + layer * T_max_ * C_;  // (T_max, C)
  float* vc = cache.v.data() + layer * T_max_ * C_;  // (T_max, C)
  const int64_t p0 = cache.len;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kc + (p0 + i) * C_, qkv.data + i * 3 * C_ + C_, sizeof(float) * size_t(C_));
    std::memcpy(vc + (p0 + i) * C_, qkv.data + i * 3 * C_ + 2 * C_, sizeof(float) * size_t(C_));
  }
  Tensor y = g.zeros({1, n, C_}, false);  // (1, n, C)
  const float sc = cfg_.attention_scale();
  std::vector<float> w(static_cast<size_t>(T_max_));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = p0 + i + 1;  // causal: positions 0..p0+i
    const float* q = qkv.data + i * 3 * C_;
    for (int64_t h = 0; h < H_; ++h) {
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        float s = 0;
        for (int64_t d = 0; d < D_; ++d) s += q[h * D_ + d] * kc[j * C_ + h * D_ + d];
        w[size_t(j)] = s * sc;
        mx = std::max(mx, w[size_t(j)]);
      }
      float z = 0;
      for (int64_t j = 0; j < len; ++j) z += (w[size_t(j)] = std::exp(w[size_t(j)] - mx));
      float* out = y.data + i * C_ + h * D_;
      for (int64_t j = 0; j < len; ++j)
        for (int64_t d = 0; d < D_; ++d) out[d] += w[size_t(j)] / z * vc[j * C_ + h * D_ + d];
    }
  }
  return apply_linear(g, bp.proj, y);
}

const float* Model::decode(Graph& g, KVCache& cache, const int32_t* tokens, int64_t n,
                           const ForwardOptions& opt) {
  check(n >= 1 && cache.len + n <= T_max_, "Model::decode",
        "cache holds " + std::to_string(cache.len) + " positions; " + std::to_string(n) +
            " more exceed block_size " + std::to_string(T_max_));
  NoGradGuard no_grad(g);
  ForwardOptions o = opt;
  o.training = false;
  int32_t* pos = g.arena().alloc_ints(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = int32_t(cache.len + i);
  Tensor x = add(g, embedding(g, tokens, params_.get(tok_emb_), {1, n, C_}),
                 embedding(g, pos, params_.get(pos_emb_), {1, n, C_}));  // (1, n, C)
  for (int64_t l = 0; l < L_; ++l) {
    const BlockParams& bp = blocks_[size_t(l)];
    x = add(g, x, attention_cached(g, bp, apply_norm(g, bp.ln1, x), n, cache, l));
    x = add(g, x, moe_ffn(g, bp, apply_norm(g, bp.ln2, x), l, o));
  }
  cache.len += n;
  // Only the last position's logits are needed.
  Tensor last = x.view({n, C_});
  last.data += (n - 1) * C_;
  last.shape = {1, C_};
  Tensor logits = apply_linear(g, lm_head_, apply_norm(g, ln_f_, last));  // (1, V)
  return logits.data;
}

}  // namespace moe
