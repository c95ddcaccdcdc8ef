#include "moe/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "moe/dist/comm.hpp"
#include "moe/kernels/routing.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

void RoutingStats::reset(int64_t layers, int64_t experts) {
  const size_t L = size_t(layers);
  tokens_per_expert.assign(L, std::vector<int64_t>(size_t(experts), 0));
  assigned.assign(L, 0);
  dropped.assign(L, 0);
  tokens.assign(L, 0);
  forwards.assign(L, 0);
  entropy_sum.assign(L, 0);
  z_sum.assign(L, 0);
  aux_sum.assign(L, 0);
}

void RoutingStats::add(const RoutingStats& other) {
  for (size_t l = 0; l < other.tokens.size(); ++l) {
    for (size_t e = 0; e < other.tokens_per_expert[l].size(); ++e)
      tokens_per_expert[l][e] += other.tokens_per_expert[l][e];
    assigned[l] += other.assigned[l];
    dropped[l] += other.dropped[l];
    tokens[l] += other.tokens[l];
    forwards[l] += other.forwards[l];
    entropy_sum[l] += other.entropy_sum[l];
    z_sum[l] += other.z_sum[l];
    aux_sum[l] += other.aux_sum[l];
  }
}

nlohmann::json RoutingStats::health() const {
  nlohmann::json layers = nlohmann::json::array();
  for (size_t l = 0; l < tokens_per_expert.size(); ++l) {
    const auto& counts = tokens_per_expert[l];
    int64_t total = 0, most = 0;
    for (int64_t c : counts) total += c, most = std::max(most, c);
    nlohmann::json load = nlohmann::json::array();
    for (int64_t c : counts) load.push_back(total ? double(c) / double(total) : 0.0);
    const double mean_load = double(total) / double(counts.size());
    const auto per = [](double sum, int64_t n) { return n ? sum / double(n) : 0.0; };
    layers.push_back({{"load", load},
                      {"dropped_frac", per(double(dropped[l]), assigned[l])},
                      {"router_entropy", per(entropy_sum[l], tokens[l])},
                      {"aux_loss", per(double(counts.size()) * aux_sum[l], forwards[l])},
                      {"z_loss", per(z_sum[l], tokens[l])},
                      {"max_violation", total ? double(most) / mean_load - 1 : 0.0}});
  }
  return layers;
}

Model::Model(const Config& cfg, int64_t vocab_size) : cfg_(cfg), V_(vocab_size) {
  validate(cfg_);
  MOE_CHECK(V_ > 0, "Model", "vocabulary is empty");
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
    for (int64_t e = 0; e < E_; ++e) b.experts.push_back(add_expert(p + "moe.experts." + std::to_string(e) + "."));
    for (int64_t e = 0; e < cfg.model.shared_experts; ++e)
      b.shared.push_back(add_expert(p + "moe.shared." + std::to_string(e) + "."));
    blocks_.push_back(std::move(b));
  }
  ln_f_ = add_norm("ln_f", C_);
  lm_head_ = add_linear("lm_head", C_, V_, true);
  params_.finalize();
  if (cfg.router.bias_update_rate > 0) balance_bias_.assign(size_t(L_ * E_), 0.f);
  last_load_.assign(size_t(L_ * E_), 0);
}

ExpertParams Model::add_expert(const std::string& q) {
  ExpertParams ep;
  if (cfg_.model.expert_ffn == "swiglu") {  // Mixtral's form, without biases
    ep.fc1 = add_linear(q + "fc1", C_, F_, false);
    ep.fc2 = add_linear(q + "fc2", F_, C_, false);
    ep.fc3 = add_linear(q + "fc3", C_, F_, false);
  } else {
    ep.fc1 = add_linear(q + "fc1", C_, F_, true);
    ep.fc2 = add_linear(q + "fc2", F_, C_, true);
  }
  return ep;
}

std::vector<Model::Buffer> Model::buffers() const {
  std::vector<Buffer> out;
  if (!balance_bias_.empty())
    for (int64_t l = 0; l < L_; ++l)
      out.push_back({"blocks." + std::to_string(l) + ".moe.router.balance_bias", l * E_, E_});
  return out;
}

void Model::update_balance_bias() {
  if (balance_bias_.empty()) return;
  const float rate = float(cfg_.router.bias_update_rate);
  for (int64_t l = 0; l < L_; ++l) {
    const int64_t* load = last_load_.data() + l * E_;
    int64_t total = 0;
    for (int64_t e = 0; e < E_; ++e) total += load[e];
    for (int64_t e = 0; e < E_; ++e) {
      // Compare load[e] with the mean total / E exactly, in integers.
      const int64_t diff = total - load[e] * E_;
      balance_bias_[size_t(l * E_ + e)] += diff > 0 ? rate : diff < 0 ? -rate : 0.f;
    }
  }
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

Tensor Model::apply_linear(Graph& g, const LinearParams& lp, const Tensor& x, Regen* regen) const {
  Tensor b;
  if (lp.bias >= 0) b = params_.get(lp.bias);
  return linear(g, x, params_.get(lp.weight), b, regen);
}

Tensor Model::apply_norm(Graph& g, const NormParams& np, const Tensor& x, Regen* regen) const {
  return layernorm(g, x, params_.get(np.weight), params_.get(np.bias), 1e-5f, regen);
}

Activation Model::expert_activation() const {
  const std::string& kind = cfg_.model.expert_ffn;
  return kind == "swiglu" ? Activation::kSilu : kind == "gelu" ? Activation::kGelu : Activation::kRelu;
}

Tensor Model::expert_forward(Graph& g, const ExpertParams& ep, const Tensor& x, const ForwardOptions& opt) {
  Tensor b1;
  if (ep.fc1.bias >= 0) b1 = params_.get(ep.fc1.bias);
  Tensor h = linear_act(g, x, params_.get(ep.fc1.weight), b1, expert_activation());  // (n, F): act(fc1(x))
  if (cfg_.model.expert_ffn == "swiglu") h = mul(g, h, apply_linear(g, ep.fc3, x));
  const float p = opt.training ? float(cfg_.model.dropout) : 0.f;
  Rng& drop = opt.dropout_rng ? *opt.dropout_rng : unused_rng_;
  return dropout(g, apply_linear(g, ep.fc2, h), p, opt.training, drop, true);  // (n, C), over fc2's output
}

namespace {

// Router health of one forward from the clean logits [N, E] and the slots per expert: adds the
// entropy and logsumexp² of every token and the Switch aux value E · Σ_i f_i P_i.
void record_router_health(Graph& g, RoutingStats& st, int64_t layer, const float* clean, int64_t N, int64_t E,
                          const int32_t* offsets, int64_t dropped) {
  const size_t l = size_t(layer);
  // Chunks of tokens, in parallel (an exp and a log per token and expert), each with its own
  // sums {entropy, z, P[0..E)} and scratch p[E], added up in chunk order: the same figures for
  // any thread count.
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (N + kChunk - 1) / kChunk, width = 2 + 2 * E;
  auto* part = static_cast<double*>(g.arena().alloc_bytes(sizeof(double) * size_t(chunks * width + E)));
#pragma omp parallel for schedule(static) if (N * E >= 2048)
  for (int64_t c = 0; c < chunks; ++c) {
    double* sums = part + c * width;  // entropy, z, P[E]
    double *P = sums + 2, *p = P + E;
    std::fill(sums, sums + 2 + E, 0.0);
    for (int64_t n = c * kChunk; n < std::min(N, (c + 1) * kChunk); ++n) {
      const float* r = clean + n * E;
      const double mx = *std::max_element(r, r + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(double(r[e]) - mx));
      const double lse = mx + std::log(sum);
      sums[1] += lse * lse;
      for (int64_t e = 0; e < E; ++e) {
        const double q = p[e] / sum;
        P[e] += q / double(N);
        if (q > 0) sums[0] -= q * std::log(q);
      }
    }
  }
  double entropy = 0, z = 0;
  double* P = part + chunks * width;  // Σ over tokens of each expert's probability / N
  std::fill(P, P + E, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    const double* sums = part + c * width;
    entropy += sums[0], z += sums[1];
    for (int64_t e = 0; e < E; ++e) P[e] += sums[2 + e];
  }
  const int64_t slots = offsets[E];
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = offsets[e + 1] - offsets[e];
    st.tokens_per_expert[l][size_t(e)] += c;
    aux += double(c) / double(slots) * P[e];
  }
  st.assigned[l] += slots;
  st.dropped[l] += dropped;
  st.tokens[l] += N;
  st.forwards[l] += 1;
  st.entropy_sum[l] += entropy;
  st.z_sum[l] += z;
  st.aux_sum[l] += aux;  // a plain sum (E applies in health()): adding up parts gives it
}

}  // namespace

Tensor Model::moe_ffn(Graph& g, const BlockParams& bp, const Tensor& x, int64_t layer,
                      const ForwardOptions& opt, RouterLosses* losses) {
  const RouterConfig& rc = cfg_.router;
  const int64_t N = x.rows();
  Tensor xf = x.view({N, C_});                    // (N, C)
  Tensor clean = apply_linear(g, bp.route, xf);   // (N, E)
  Tensor logits = clean;
  const bool noisy = opt.fixed_noise != nullptr || router_noisy(opt.training);
  if (noisy) {
    Tensor noise = g.new_tensor({N, E_}, false);  // (N, E) standard normal
    if (opt.fixed_noise) {
      const auto& fixed = (*opt.fixed_noise)[size_t(layer)];
      MOE_CHECK(int64_t(fixed.size()) == N * E_, "Model", "fixed router noise has the wrong size");
      std::memcpy(noise.data, fixed.data(), sizeof(float) * size_t(N * E_));
    } else {
      MOE_CHECK(opt.noise_rng != nullptr, "Model", "router noise needs a noise generator");
      opt.noise_rng->fill_normal(noise.data, N * E_);
    }
    Tensor noise_scale = softplus(g, apply_linear(g, bp.noise, xf));
    logits = add(g, clean, mul(g, noise, noise_scale));
  }

  // Gating: which K experts per token (selection may add the balancing bias) and their weights.
  const float* bias = balance_bias_.empty() ? nullptr : balance_bias_.data() + layer * E_;
  TopK top;
  if (rc.gating == "topk_softmax") {
    top = topk_softmax(g, logits, K_, bias);  // (N, K)
  } else {
    Tensor probs = softmax(g, logits);  // (N, E)
    top.index = topk_indices(g, probs, K_, bias);
    top.weights = gather_cols(g, probs, top.index, K_);  // (N, K)
    if (rc.renormalize) top.weights = normalize_rows(g, top.weights);
  }
  if (opt.chosen) (*opt.chosen)[size_t(layer)].assign(top.index, top.index + N * K_);
  if (opt.chosen_weights) (*opt.chosen_weights)[size_t(layer)].assign(top.weights.data, top.weights.data + N * K_);

  int32_t* offsets = g.arena().alloc_ints(E_ + 1);
  int32_t* token = g.arena().alloc_ints(N * K_);
  int32_t* gate_pos = g.arena().alloc_ints(N * K_);
  group_by_expert(top.index, N, K_, E_, offsets, token, gate_pos);

  // Router health counts the router's choices, so it keeps the offsets from before any drops.
  int32_t* chosen_offsets = g.arena().alloc_ints(E_ + 1);
  std::copy(offsets, offsets + E_ + 1, chosen_offsets);
  int64_t dropped = 0;
  if (rc.capacity_factor > 0 && (opt.training || rc.capacity_at_eval))
    dropped = apply_capacity(offsets, token, gate_pos, top.weights.data, E_, cfg_.expert_capacity(N));
  if (opt.stats) record_router_health(g, *opt.stats, layer, clean.data, N, E_, chosen_offsets, dropped);

  // Slots per expert, chosen (before any capacity drops) and kept: counts[r][e] and
  // counts[r][E + e] for process r, every process of a distributed forward, else this one.
  const bool dist = opt.distributed && ranks_ > 1;
  const int64_t R = dist ? ranks_ : 1, me = dist ? rank_ : 0;
  auto* mine = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(2 * E_)));
  auto* counts = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(R * 2 * E_)));
  for (int64_t e = 0; e < E_; ++e) {
    mine[e] = chosen_offsets[e + 1] - chosen_offsets[e];
    mine[E_ + e] = offsets[e + 1] - offsets[e];
  }
  if (dist)
    dist::allgather(mine, counts, 2 * E_);
  else
    std::copy(mine, mine + 2 * E_, counts);
  int32_t* slots = g.arena().alloc_ints(E_);  // chosen over the global batch
  for (int64_t e = 0; e < E_; ++e) {
    int64_t c = 0;
    for (int64_t r = 0; r < R; ++r) c += counts[r * 2 * E_ + e];
    slots[e] = int32_t(c);
    if (opt.training) last_load_[size_t(layer * E_ + e)] = c;
  }

  // Balancing losses from the clean logits and the router's choices (before any capacity).
  {
    Graph::KeepGrads added_after_the_blocks(g);
    if (losses && rc.aux_loss_coef > 0) losses->aux.push(switch_aux_loss(g, clean, slots));
    if (losses && rc.z_loss_coef > 0) losses->z.push(router_z_loss(g, clean));
  }

  Tensor acc = g.zeros({N, C_}, g.grad_enabled());  // (N, C)
  if (dist && expert_parallel_) {
    Tensor ys = remote_experts(g, bp, xf, offsets, token, counts, opt);  // (slots kept, C)
    index_add_weighted(g, acc, ys, token, top.weights, gate_pos, offsets[E_]);
  } else if (!dist) {
    // Every expert at once: grouped ops run the experts on separate threads, each product on
    // one, in place of some hundred small parallel products a layer. The same numbers as the
    // loop below: one dropout draw over the slots in expert order is the experts' draws one
    // after the other, and the gather and the weighted sum add in the loop's order.
    const int64_t S = offsets[E_];
    if (S > 0) {
      Tensor* t = g.arena().alloc_objects<Tensor>(6 * E_);  // w1, b1, w2, b2, w3, b3: E each
      for (int64_t e = 0; e < E_; ++e) {
        const ExpertParams& ep = bp.experts[size_t(e)];
        const LinearParams* lps[3] = {&ep.fc1, &ep.fc2, &ep.fc3};
        for (int j = 0; j < 3; ++j) {
          t[(2 * j) * E_ + e] = lps[j]->weight >= 0 ? params_.get(lps[j]->weight) : Tensor{};
          t[(2 * j + 1) * E_ + e] = lps[j]->bias >= 0 ? params_.get(lps[j]->bias) : Tensor{};
        }
      }
      const Activation act = expert_activation();
      Regen xs_again;  // recorded after the experts, its only readers
      Regen* xs_regen = g.in_scope() ? &xs_again : nullptr;
      Tensor xs = gather_row_groups(g, xf, token, offsets, E_, xs_regen);  // (S, C) in expert order
      Tensor y;
      if (cfg_.model.expert_ffn == "swiglu") {
        Tensor h = grouped_linear(g, xs, offsets, E_, t, t + E_, &act);
        h = mul(g, h, grouped_linear(g, xs, offsets, E_, t + 4 * E_, t + 5 * E_));
        y = grouped_linear(g, h, offsets, E_, t + 2 * E_, t + 3 * E_);
      } else {
        y = grouped_mlp(g, xs, offsets, E_, t, t + E_, act, t + 2 * E_, t + 3 * E_);
      }
      const float p = opt.training ? float(cfg_.model.dropout) : 0.f;
      Rng& drop = opt.dropout_rng ? *opt.dropout_rng : unused_rng_;
      Tensor ys = dropout(g, y, p, opt.training, drop, true);  // over the experts' outputs
      index_add_weighted(g, acc, ys, token, top.weights, gate_pos, S);
      if (xs_regen) g.record(xs_again);
    }
  } else {
    const bool drawn = opt.training && cfg_.model.dropout > 0 && opt.dropout_rng;
    for (int64_t e = 0; e < E_; ++e) {
      const int64_t begin = offsets[e], n = offsets[e + 1] - offsets[e];
      if (drawn) {
        // Expert e's dropout over the rows of every process, in process order: what one
        // process with the whole batch would draw for these rows.
        int64_t before = 0, total = 0;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t k = counts[r * 2 * E_ + E_ + e];
          if (r < me) before += k;
          total += k;
        }
        if (n == 0) opt.dropout_rng->skip(uint64_t(total * C_));
        else opt.dropout_rng->set_next_window(uint64_t(before * C_), uint64_t(total * C_));
      }
      if (n == 0) continue;  // only the chosen experts compute
      Tensor ye = expert_forward(g, bp.experts[size_t(e)], gather_rows(g, xf, token + begin, n), opt);  // (n, C)
      index_add_weighted(g, acc, ye, token + begin, top.weights, gate_pos + begin, n);
    }
  }
  Tensor out = acc;
  for (const ExpertParams& sp : bp.shared) out = add(g, out, expert_forward(g, sp, xf, opt));
  return out.view(x.shape);
}

Tensor Model::remote_experts(Graph& g, const BlockParams& bp, const Tensor& xf, const int32_t* offsets,
                             const int32_t* token, const int64_t* counts, const ForwardOptions& opt) {
  // Dispatch: the kept rows, sorted by expert, go to the experts' owners (experts of one
  // owner are consecutive). Rows from rank src arrive in one block, sorted by expert.
  const int64_t R = ranks_, El = E_ / R, S = offsets[E_];
  const auto kept = [&](int64_t r, int64_t e) { return counts[r * 2 * E_ + E_ + e]; };
  auto* send = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(2 * R)));
  int64_t* recv = send + R;
  int64_t* block = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(R)));  // first row from src
  int64_t received = 0;
  for (int64_t r = 0; r < R; ++r) {
    send[r] = offsets[(r + 1) * El] - offsets[r * El];
    recv[r] = 0;
    for (int64_t e = rank_ * El; e < (rank_ + 1) * El; ++e) recv[r] += kept(r, e);
    block[r] = received;
    received += recv[r];
  }
  Tensor xr = exchange_rows(g, gather_rows(g, xf, token, S), send, recv);  // (received, C)

  // Each expert of this rank runs once over its rows from every rank, in rank order (the
  // order one process would see them in); the other experts' dropout numbers are skipped.
  Tensor yr = g.zeros({received, C_}, g.grad_enabled());
  Tensor ones = g.new_tensor({std::max<int64_t>(1, received)}, false);
  std::fill(ones.data, ones.data + ones.numel(), 1.f);
  const bool drawn = opt.training && cfg_.model.dropout > 0 && opt.dropout_rng;
  for (int64_t e = 0; e < E_; ++e) {
    int64_t n = 0;
    for (int64_t r = 0; r < R; ++r) n += kept(r, e);
    if (expert_owner(e) != rank_) {
      if (drawn) opt.dropout_rng->skip(uint64_t(n * C_));
      continue;
    }
    if (n == 0) continue;
    int32_t* rows = g.arena().alloc_ints(n);
    int64_t i = 0;
    for (int64_t r = 0; r < R; ++r) {
      int64_t first = block[r];
      for (int64_t e2 = rank_ * El; e2 < e; ++e2) first += kept(r, e2);
      for (int64_t j = 0; j < kept(r, e); ++j) rows[i++] = int32_t(first + j);
    }
    if (drawn) opt.dropout_rng->set_next_window(0, uint64_t(n * C_));
    Tensor ye = expert_forward(g, bp.experts[size_t(e)], gather_rows(g, xr, rows, n), opt);  // (n, C)
    index_add_weighted(g, yr, ye, rows, ones, rows, n);
  }
  // Combine: the outputs go back to the ranks the rows came from, in their original order.
  return exchange_rows(g, yr, recv, send);  // (S, C)
}

void Model::set_parallel(int rank, int ranks, bool expert_parallel) {
  MOE_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "Model", "rank " + std::to_string(rank) + " of " + std::to_string(ranks));
  if (expert_parallel && E_ % ranks != 0)
    throw std::runtime_error("expert parallelism over " + std::to_string(ranks) + " processes needs router.num_experts (" +
                             std::to_string(E_) + ") to be a multiple of " + std::to_string(ranks));
  rank_ = rank, ranks_ = ranks, expert_parallel_ = expert_parallel;
}

int64_t Model::noise_per_forward(int64_t rows, bool training) const {
  return router_noisy(training) ? L_ * rows * E_ : 0;
}

int Model::expert_owner(int64_t e) const { return expert_parallel_ ? int(e / (E_ / ranks_)) : 0; }

std::vector<int> Model::grad_groups() const {
  std::vector<int> first{0};
  for (const BlockParams& b : blocks_) first.push_back(b.ln1.weight);
  first.push_back(ln_f_.weight);
  return first;
}

std::vector<int> Model::param_expert() const {
  std::vector<int> out(size_t(params_.count()), -1);
  for (const BlockParams& b : blocks_)
    for (size_t e = 0; e < b.experts.size(); ++e)
      for (const LinearParams* lp : {&b.experts[e].fc1, &b.experts[e].fc2, &b.experts[e].fc3})
        for (int id : {lp->weight, lp->bias})
          if (id >= 0) out[size_t(id)] = int(e);
  return out;
}

Tensor Model::block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt, RouterLosses* losses,
                    float* out_grad) {
  const BlockParams& bp = blocks_[size_t(l)];
  const float p = opt.training ? float(cfg_.model.dropout) : 0.f;
  Rng& drop = opt.dropout_rng ? *opt.dropout_rng : unused_rng_;
  // In a gradient scope, everything from x to the experts' input lives in the scratch memory
  // every block reuses, and is made again at the start of the block's backward pass, in forward
  // order (a tape runs backwards: they are recorded last to first, after all their readers).
  // The block keeps its input, the attention's weights and masks, the router's figures and the
  // experts' packed hidden layers and outputs. The products made again (qkv, proj) cost no time
  // measurably: their outputs come from cache instead of memory (a step of makeMoE keeps 1 MiB
  // a block less). Dropout and the sums go over outputs that no backward reads.
  Regen again[7];  // ln1, qkv, attention, proj, dropout, the sum, ln2
  const auto at = [&](int i) { return g.in_scope() ? &again[i] : nullptr; };
  const Tensor h = apply_norm(g, bp.ln1, x, at(0));
  const Tensor qkv = apply_linear(g, bp.qkv, h, at(1));  // (B, T, 3C)
  const Tensor a = causal_attention(g, qkv, H_, cfg_.attention_scale(), p, opt.training, drop, at(2));  // (B, T, C)
  const Tensor o = apply_linear(g, bp.proj, a, at(3));
  const Tensor y = add_into(g, x, dropout(g, o, p, opt.training, drop, true, at(4)), at(5));  // over proj's output
  const Tensor f = moe_ffn(g, bp, apply_norm(g, bp.ln2, y, at(6)), l, opt, losses);
  for (int i = 6; i >= 0; --i)
    if (at(i)) g.record(again[i]);
  Graph::KeepGradsIn outlives_block(g, out_grad, x.numel());
  return add_into(g, y, f);
}

Tensor Model::recomputed_block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt,
                               RouterLosses* losses) {
  // The random numbers the block is about to draw, for drawing them again.
  const Rng no_rng(0, 0);
  const Rng drop0 = opt.dropout_rng ? *opt.dropout_rng : no_rng, noise0 = opt.noise_rng ? *opt.noise_rng : no_rng;
  Tensor out = g.new_tensor(x.shape, true);
  Tensor aux_item, z_item;
  RouterLosses mine{{&aux_item, 0}, {&z_item, 0}};
  Graph* sub = opt.recompute;  // idle until the backward pass: it holds this run too
  sub->clear();
  {
    NoGradGuard no_grad(*sub);
    const Tensor y = block(*sub, l, x, opt, losses ? &mine : nullptr);
    std::memcpy(out.data, y.data, sizeof(float) * size_t(x.numel()));
  }
  // The router losses' scalars, as tensors with gradients here.
  const auto keep = [&](LossList& from, LossList* to) {
    if (!from.size) return Tensor{};
    const float v = from.items[0].data[0];
    const Tensor t = g.new_tensor(from.items[0].shape, true);
    t.data[0] = v;
    to->push(t);
    return t;
  };
  const Tensor aux = losses ? keep(mine.aux, &losses->aux) : Tensor{};
  const Tensor z = losses ? keep(mine.z, &losses->z) : Tensor{};
  ForwardOptions again = opt;
  again.stats = nullptr;  // counted once, in the forward
  again.chosen = nullptr;
  again.grads_ready = nullptr;
  again.recompute = nullptr;
  const bool with_losses = losses != nullptr;
  g.record([this, sub, l, x, out, aux, z, again, drop0, noise0, with_losses] {
    Rng drop = drop0, noise = noise0;
    ForwardOptions o = again;
    if (o.dropout_rng) o.dropout_rng = &drop;
    if (o.noise_rng) o.noise_rng = &noise;
    sub->clear();
    const Tensor xs = sub->new_tensor(x.shape, true);
    std::memcpy(xs.data, x.data, sizeof(float) * size_t(x.numel()));
    Tensor aux_again, z_again;
    RouterLosses rl{{&aux_again, 0}, {&z_again, 0}};
    const Tensor y = block(*sub, l, xs, o, with_losses ? &rl : nullptr);
    sub->backward_from({{y, out.grad}, {aux_again, aux.grad}, {z_again, z.grad}});
    if (x.grad)  // its only use: the sum equals the one the block would have made here
      for (int64_t i = 0; i < x.numel(); ++i) x.grad[i] += xs.grad[i];
  });
  return out;
}

Model::Output Model::forward(Graph& g, const int32_t* idx, const int32_t* targets, int64_t B,
                             int64_t T, const ForwardOptions& opt) {
  MOE_CHECK(T >= 1 && T <= T_max_, "Model::forward",
        "sequence length " + std::to_string(T) + " must be in [1, block_size=" + std::to_string(T_max_) + "]");
  MOE_CHECK(!(opt.training && cfg_.model.dropout > 0) || opt.dropout_rng != nullptr, "Model::forward",
        "training with dropout needs a dropout generator");
  if (opt.stats && opt.stats->empty()) opt.stats->reset(L_, E_);
  RouterLosses router_losses;
  router_losses.aux.items = g.arena().alloc_objects<Tensor>(L_);
  router_losses.z.items = g.arena().alloc_objects<Tensor>(L_);
  int32_t* pos = g.arena().alloc_ints(B * T);
  for (int64_t i = 0; i < B * T; ++i) pos[i] = int32_t(i % T);
  Tensor x = add(g, embedding(g, idx, params_.get(tok_emb_), {B, T, C_}),
                 embedding(g, pos, params_.get(pos_emb_), {B, T, C_}));  // (B, T, C)
  // Recorded before the ops that use parameters first.. (registered in forward order), this
  // runs in the backward pass right after the last of their gradient contributions.
  const auto mark_ready = [&](int first) {
    if (GradientsReady* h = opt.grads_ready) g.record([h, first] { h->from(first); });
  };
  // Without gradients, nothing a block allocates is needed after it but its output: that goes
  // back into x, the router losses' scalars into `kept`, and the arena back to where it was
  // before the block. A forward then holds one block's activations, whatever the depth.
  const bool rewind = !g.grad_enabled();
  const bool recompute = g.grad_enabled() && opt.recompute;
  MOE_CHECK(!recompute || !opt.distributed, "Model::forward", "recomputation runs in one process only");
  float* kept = rewind ? g.arena().alloc_floats(2 * L_) : nullptr;
  int64_t kept_aux = 0, kept_z = 0;
  const auto keep = [&](LossList& losses, int64_t& done) {
    for (; done < losses.size; ++done) {
      *kept = losses.items[done].data[0];
      losses.items[done].data = kept++;
    }
  };
  // With gradient scopes, the blocks' outputs take turns in two gradients (Graph::KeepGradsIn):
  // block l zeroes its input's at the start of its backward, once block l + 1 has read it.
  float* out_grads[2] = {nullptr, nullptr};
  if (g.grad_enabled() && g.grad_scopes() && !recompute)
    for (float*& d : out_grads) d = g.grad_memory(B * T * C_);
  for (int64_t l = 0; l < L_; ++l) {
    const BlockParams& bp = blocks_[size_t(l)];
    mark_ready(bp.ln1.weight);
    if (recompute) {
      x = recomputed_block(g, l, x, opt, targets ? &router_losses : nullptr);
      continue;
    }
    const Arena::Mark before = g.arena().mark();
    g.begin_grad_scope();
    const Tensor y = block(g, l, x, opt, targets ? &router_losses : nullptr, out_grads[l % 2]);
    g.end_grad_scope();
    if (out_grads[0] && l > 0) g.record([d = x.grad, n = x.numel()] { std::fill(d, d + n, 0.f); });
    if (!rewind) {
      x = y;
      continue;
    }
    std::memcpy(x.data, y.data, sizeof(float) * size_t(x.numel()));
    keep(router_losses.aux, kept_aux);
    keep(router_losses.z, kept_z);
    g.arena().rewind(before);
  }
  mark_ready(ln_f_.weight);
  Output out;
  out.logits = apply_linear(g, lm_head_, apply_norm(g, ln_f_, x));  // (B, T, V)
  if (!targets) return out;
  out.loss = cross_entropy(g, out.logits, targets, &out.token_losses);
  out.objective = out.loss;
  // Each balancing loss is averaged over the layers, then weighted by its coefficient.
  const auto add_term = [&](const LossList& terms, double coef) {
    for (int64_t i = 0; i < terms.size; ++i)
      out.objective = add(g, out.objective, scale(g, terms.items[i], float(coef / double(L_))));
  };
  add_term(router_losses.aux, cfg_.router.aux_loss_coef);
  add_term(router_losses.z, cfg_.router.z_loss_coef);
  return out;
}

}  // namespace moe
