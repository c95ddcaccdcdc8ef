// Model::decode: incremental inference with the key/value cache, straight on the kernels of
// src/kernels/ and the buffers of KVCache::Work, without an autograd graph: per token it is
// about a hundred small products, where building graph nodes, checking shapes and opening
// OpenMP teams used to cost more than the arithmetic. Each step computes what the ops of
// Model::forward compute (same kernels, same order of every sum), so the sampled text is the
// one the graph-built decoder gave.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/kernels/activations.hpp"
#include "moe/kernels/expf.hpp"
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/log1pf.hpp"
#include "moe/kernels/nn.hpp"
#include "moe/kernels/routing.hpp"
#include "moe/model/model.hpp"

namespace moe {

namespace {

constexpr float kNormEps = 1e-5f;  // layernorm()'s default, which Model::forward uses

void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
}

// dst [cols, rows] = src [rows, cols]ᵀ, in tiles that stay in cache.
void transpose(float* dst, const float* src, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[c * rows + r] = src[r * cols + c];
}

}  // namespace

KVCache Model::new_cache() const {
  KVCache c;
  const auto T = size_t(T_max_), C = size_t(C_), E = size_t(E_), K = size_t(K_), F = size_t(F_);
  c.k.assign(size_t(L_) * T * C, 0.f);
  c.v.assign(size_t(L_) * T * C, 0.f);
  KVCache::Work& w = c.work;
  for (auto* b : {&w.x, &w.normed, &w.heads, &w.sub}) b->resize(T * C);
  w.qkv.resize(T * 3 * C);
  for (auto* b : {&w.mean, &w.rstd, &w.scores}) b->resize(T);
  for (auto* b : {&w.clean, &w.noise, &w.logits, &w.probs}) b->resize(T * E);
  w.gates.resize(T * K);
  for (auto* b : {&w.index, &w.token, &w.gate_pos}) b->resize(T * K);
  w.offsets.resize(E + 1);
  w.active.resize(E);
  // Expert rows: the routed slots (T*K), or every position for a shared expert (T <= T*K).
  for (auto* b : {&w.rows, &w.expert_out}) b->resize(T * K * C);
  for (auto* b : {&w.hidden, &w.hidden3}) b->resize(T * K * F);
  w.out.resize(size_t(V_));
  w.weight_t_offset.assign(size_t(params_.count()), -1);
  int64_t total = 0;
  for (int id = 0; id < params_.count(); ++id)
    if (roles_[size_t(id)].role == Role::kLinearWeight) {
      w.weight_t_offset[size_t(id)] = total;
      total += params_.get(id).numel();
    }
  w.weights_t.resize(size_t(total));
  for (int id = 0; id < params_.count(); ++id)
    if (w.weight_t_offset[size_t(id)] >= 0) {
      const Tensor wt = params_.get(id);  // [out, in]
      transpose(w.weights_t.data() + w.weight_t_offset[size_t(id)], wt.data, wt.size(0), wt.size(1));
    }
  return c;
}

// y [n, out] = x [n, in] · Wᵀ + b, as linear() computes it: bias rows first, then the GEMM
// (on Wᵀ stored: the same products summed in the same order). One row, the usual case, takes
// the one-row loops: no packing, sums in order but not in gemm's k blocks.
void Model::decode_linear(const KVCache::Work& w, const LinearParams& lp, const float* x, int64_t n, float* y) const {
  const bool has_bias = lp.bias >= 0;
  if (has_bias) {
    const float* b = params_.get(lp.bias).data;
    for (int64_t i = 0; i < n; ++i) std::memcpy(y + i * lp.out, b, sizeof(float) * size_t(lp.out));
  }
  const float* wt = w.weights_t.data() + w.weight_t_offset[size_t(lp.weight)];  // [in, out]
  if (n == 1)
    gemv(false, lp.out, lp.in, 1.f, x, wt, lp.out, has_bias ? 1.f : 0.f, y);
  else
    gemm(false, false, n, lp.out, lp.in, 1.f, x, lp.in, wt, lp.out, has_bias ? 1.f : 0.f, y, lp.out);
}

// As expert_forward() in evaluation: fc2(act(fc1 x)), or fc2(silu(fc1 x) ⊙ fc3 x) for SwiGLU.
void Model::decode_expert(const KVCache::Work& w, const ExpertParams& ep, const float* x, int64_t n,
                          float* hidden, float* hidden3, float* y) const {
  const int64_t m = n * F_;
  decode_linear(w, ep.fc1, x, n, hidden);
  act::dispatch(expert_activation(), [&](auto f, auto) {
    for (int64_t i = 0; i < m; ++i) hidden[i] = f(hidden[i]);
  });
  if (cfg_.model.expert_ffn == "swiglu") {  // silu(fc1 x) ⊙ fc3 x, as mul() computes it
    decode_linear(w, ep.fc3, x, n, hidden3);
    for (int64_t i = 0; i < m; ++i) hidden[i] = hidden[i] * hidden3[i];
  }
  decode_linear(w, ep.fc2, hidden, n, y);
}

void Model::decode_attention(const BlockParams& bp, int64_t layer, KVCache& cache, int64_t n) const {
  KVCache::Work& w = cache.work;
  decode_linear(w, bp.qkv, w.normed.data(), n, w.qkv.data());  // (n, 3C)
  const float* qkv = w.qkv.data();
  float* kc = cache.k.data() + layer * T_max_ * C_;  // (T_max, C)
  float* vc = cache.v.data() + layer * T_max_ * C_;  // (T_max, C)
  const int64_t p0 = cache.len;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kc + (p0 + i) * C_, qkv + i * 3 * C_ + C_, sizeof(float) * size_t(C_));
    std::memcpy(vc + (p0 + i) * C_, qkv + i * 3 * C_ + 2 * C_, sizeof(float) * size_t(C_));
  }
  float* y = w.heads.data();
  std::fill(y, y + n * C_, 0.f);
  float* s = w.scores.data();
  const float sc = cfg_.attention_scale();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = p0 + i + 1;  // causal: positions 0..p0+i
    const float* q = qkv + i * 3 * C_;
    for (int64_t h = 0; h < H_; ++h) {
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        float dot = 0;
        for (int64_t d = 0; d < D_; ++d) dot += q[h * D_ + d] * kc[j * C_ + h * D_ + d];
        s[j] = dot * sc;
        mx = std::max(mx, s[j]);
      }
      float z = 0;
      for (int64_t j = 0; j < len; ++j) s[j] -= mx;
      exp_floats(s, s, len);
      for (int64_t j = 0; j < len; ++j) z += s[j];
      float* out = y + i * C_ + h * D_;
      for (int64_t j = 0; j < len; ++j)
        for (int64_t d = 0; d < D_; ++d) out[d] += s[j] / z * vc[j * C_ + h * D_ + d];
    }
  }
  decode_linear(w, bp.proj, y, n, w.sub.data());
}

// moe_ffn() in evaluation, for the n rows of w.normed.
void Model::decode_moe(const BlockParams& bp, int64_t layer, KVCache::Work& w, int64_t n,
                       const ForwardOptions& opt) const {
  const RouterConfig& rc = cfg_.router;
  const float* x = w.normed.data();
  float* clean = w.clean.data();
  decode_linear(w, bp.route, x, n, clean);  // (n, E)
  const float* logits = clean;
  if (router_noisy(false)) {  // clean + noise ⊙ softplus(noise linear), as mul() then add()
    MOE_CHECK(opt.noise_rng != nullptr, "Model::decode", "router noise needs a noise generator");
    float* noise = w.noise.data();
    opt.noise_rng->fill_normal(noise, n * E_);
    float* noisy = w.logits.data();
    decode_linear(w, bp.noise, x, n, noisy);
    softplus_floats(noisy, noisy, n * E_);
    for (int64_t i = 0; i < n * E_; ++i) noisy[i] = noise[i] * noisy[i];
    add_into(noisy, clean, n * E_);
    logits = noisy;
  }

  const float* bias = balance_bias_.empty() ? nullptr : balance_bias_.data() + layer * E_;
  int32_t* index = w.index.data();
  float* gates = w.gates.data();
  if (rc.gating == "topk_softmax") {
    topk_select(index, logits, bias, n, E_, K_);
    topk_softmax_forward(gates, index, logits, n, E_, K_);
  } else {  // as softmax(), topk_indices(), gather_cols() and normalize_rows()
    float* probs = w.probs.data();
    softmax_forward(probs, logits, n, E_, false);
    topk_select(index, probs, bias, n, E_, K_);
    gather_cols_forward(gates, probs, index, n, E_, K_);
    if (rc.renormalize) normalize_rows_forward(gates, gates, n, K_);
  }
  int32_t* offsets = w.offsets.data();
  int32_t* token = w.token.data();
  int32_t* gate_pos = w.gate_pos.data();
  group_by_expert(index, n, K_, E_, offsets, token, gate_pos);
  if (rc.capacity_factor > 0 && rc.capacity_at_eval)
    apply_capacity(offsets, token, gate_pos, gates, E_, cfg_.expert_capacity(n));

  // Each routed slot s owns row s of rows, hidden and expert_out, so the chosen experts run on
  // separate threads (one team per layer; their products run serially inside it).
  int32_t* active = w.active.data();
  int64_t n_active = 0;
  for (int64_t e = 0; e < E_; ++e)
    if (offsets[e + 1] > offsets[e]) active[n_active++] = int32_t(e);
  float* rows = w.rows.data();
  float* ye = w.expert_out.data();
#pragma omp parallel if (n_active > 1)
  {
    gemm_reserve_thread(std::max(C_, F_));  // whichever expert this thread draws
#pragma omp for schedule(dynamic, 1)
    for (int64_t a = 0; a < n_active; ++a) {
      const int64_t e = active[a], begin = offsets[e], count = offsets[e + 1] - begin;
      for (int64_t s = begin; s < begin + count; ++s)
        std::memcpy(rows + s * C_, x + int64_t(token[s]) * C_, sizeof(float) * size_t(C_));
      decode_expert(w, bp.experts[size_t(e)], rows + begin * C_, count, w.hidden.data() + begin * F_,
                    w.hidden3.data() + begin * F_, ye + begin * C_);
    }
  }
  float* acc = w.sub.data();
  std::fill(acc, acc + n * C_, 0.f);
  for (int64_t e = 0; e < E_; ++e) {  // in expert order, as moe_ffn() adds them
    const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
    scatter_add_weighted(acc, ye + begin * C_, token + begin, gates, gate_pos + begin, count, C_);
  }
  for (const ExpertParams& sp : bp.shared) {
    decode_expert(w, sp, x, n, w.hidden.data(), w.hidden3.data(), ye);
    add_into(acc, ye, n * C_);
  }
}

const float* Model::decode(KVCache& cache, const int32_t* tokens, int64_t n, const ForwardOptions& opt) {
  MOE_CHECK(n >= 1 && cache.len + n <= T_max_, "Model::decode",
        "cache holds " + std::to_string(cache.len) + " positions; " + std::to_string(n) +
            " more exceed block_size " + std::to_string(T_max_));
  MOE_CHECK(cache.work.out.size() == size_t(V_) && cache.k.size() == size_t(L_ * T_max_ * C_), "Model::decode",
        "the cache was not made by this model's new_cache()");
  MOE_CHECK(!opt.fixed_noise && !opt.stats && !opt.chosen, "Model::decode",
        "fixed router noise, routing statistics and chosen ids are options of Model::forward only");
  KVCache::Work& w = cache.work;
  float* x = w.x.data();
  const float* tok = params_.get(tok_emb_).data;
  const float* pos = params_.get(pos_emb_).data;
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(tokens[i] >= 0 && tokens[i] < V_, "Model::decode",
          "id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
              " is outside the vocabulary [0, " + std::to_string(V_) + ")");
    const float* te = tok + int64_t(tokens[i]) * C_;
    const float* pe = pos + (cache.len + i) * C_;
    for (int64_t c = 0; c < C_; ++c) x[i * C_ + c] = te[c] + pe[c];
  }
  const auto norm = [&](const NormParams& np, const float* in, int64_t rows) {  // into w.normed
    layernorm_forward(w.normed.data(), w.mean.data(), w.rstd.data(), in, params_.get(np.weight).data,
                      params_.get(np.bias).data, rows, C_, kNormEps);
  };
  for (int64_t l = 0; l < L_; ++l) {
    const BlockParams& bp = blocks_[size_t(l)];
    norm(bp.ln1, x, n);
    decode_attention(bp, l, cache, n);
    add_into(x, w.sub.data(), n * C_);
    norm(bp.ln2, x, n);
    decode_moe(bp, l, w, n, opt);
    add_into(x, w.sub.data(), n * C_);
  }
  cache.len += n;
  // Only the last position's logits are needed.
  norm(ln_f_, x + (n - 1) * C_, 1);
  decode_linear(w, lm_head_, w.normed.data(), 1, w.out.data());
  return w.out.data();
}

}  // namespace moe
