#include "moe/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "moe/ops/ops.hpp"

namespace moe {

Model::Model(const Config& cfg, int64_t vocab_size) : cfg_(cfg), V_(vocab_size) {
  validate(cfg_);
  MOE_CHECK(V_ > 0, "Model", "vocabulary is empty");
  C_ = cfg.model.n_embed;
  L_ = cfg.model.n_layer;
  E_ = cfg.router.num_experts;
  T_max_ = cfg.model.block_size;
  // Registered in forward order: the blocks' gradients complete in reverse (grad_groups).
  ParamBuilder pb(params_, roles_);
  emb_ = Embeddings::make(pb, V_, C_, T_max_, cfg.model.position == PositionKind::kLearned);
  for (int64_t l = 0; l < L_; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    Block b;
    b.ln1 = Norm::make(pb, p + "ln1", C_, cfg.model.norm);
    b.attn = Attention::make(pb, p + "attn.", cfg);
    b.ln2 = Norm::make(pb, p + "ln2", C_, cfg.model.norm);
    b.sparse = cfg.moe_block(l);
    if (b.sparse)
      b.moe = MoELayer::make(pb, p + "moe.", cfg);
    else
      b.ffn = Expert::make(pb, p + "ffn.", C_, cfg.dense_hidden_size(), cfg.model.expert_ffn);
    moe_index_.push_back(b.sparse ? L_moe_++ : -1);
    blocks_.push_back(std::move(b));
  }
  ln_f_ = Norm::make(pb, "ln_f", C_, cfg.model.norm);
  // Tied: the head's weight is the token embedding matrix [V, C], which is a Linear's [out, in].
  lm_head_ = cfg.model.tie_embeddings ? Linear::tied(pb, "lm_head", emb_.tok, C_, V_, true)
                                      : Linear::make(pb, "lm_head", C_, V_, true);
  params_.finalize();
  const bool bias = cfg.router.bias_update_rate > 0, relu = cfg.router.gating == Gating::kRelu,
             ec = cfg.router.gating == Gating::kExpertChoice;
  const int64_t LE = L_moe_ * E_;  // per MoE block
  buffer_.assign(size_t((bias ? LE : 0) + (relu ? 1 : 0) + (ec ? LE : 0)), 0.f);
  int64_t next = 0;
  if (bias) bias_at_ = next, next += LE;
  if (relu) l1_at_ = next, buffer_[size_t(next++)] = float(cfg.router.relu_l1_init);
  if (ec) thresholds_at_ = next, std::fill(buffer_.begin() + next, buffer_.end(), -1.f);
  last_load_.assign(size_t(LE), 0);
  last_kth_.assign(size_t(LE), 0.f);
  last_tokens_.assign(size_t(L_moe_), 0);
}

std::vector<Model::Buffer> Model::buffers() const {
  std::vector<Buffer> out;
  if (bias_at_ >= 0)
    for (int64_t l = 0; l < L_; ++l)
      if (const int64_t m = moe_index_[size_t(l)]; m >= 0)
        out.push_back({"blocks." + std::to_string(l) + ".moe.router.balance_bias", bias_at_ + m * E_, E_});
  if (l1_at_ >= 0) out.push_back({"router.l1_coef", l1_at_, 1});
  if (thresholds_at_ >= 0)
    for (int64_t l = 0; l < L_; ++l)
      if (const int64_t m = moe_index_[size_t(l)]; m >= 0)
        out.push_back({"blocks." + std::to_string(l) + ".moe.router.threshold", thresholds_at_ + m * E_, E_});
  return out;
}

std::pair<int64_t, int64_t> Model::last_slots_and_tokens() const {
  int64_t slots = 0, tokens = 0;
  for (int64_t l = 0; l < L_moe_; ++l) {  // the MoE blocks
    tokens += last_tokens_[size_t(l)];
    for (int64_t e = 0; e < E_; ++e) slots += last_load_[size_t(l * E_ + e)];
  }
  return {slots, tokens};
}

double Model::last_experts_per_token() const {
  const auto [slots, tokens] = last_slots_and_tokens();
  return tokens ? double(slots) / double(tokens) : 0.0;
}

void Model::update_router_state() {
  update_balance_bias();
  if (L_moe_ == 0 || last_tokens_[0] == 0) return;  // no MoE block, or no training forward since the last update
  if (float* l1 = buffer_at(l1_at_)) {
    // ReMoE: λ grows while the gates are denser than top_k of E, shrinks while sparser.
    // Sparsity below the target 1 - top_k / E is more than top_k active gates per token, in integers.
    const auto [slots, tokens] = last_slots_and_tokens();
    const int64_t target = cfg_.router.top_k * tokens;
    const auto growth = float(cfg_.router.relu_l1_growth);
    if (slots > target) *l1 *= growth;
    else if (slots < target) *l1 /= growth;
  }
  if (float* thresholds = buffer_at(thresholds_at_)) {
    const auto m = float(cfg_.router.threshold_ema);
    for (int64_t i = 0; i < L_moe_ * E_; ++i) {
      float& t = thresholds[i];
      t = t < 0.f ? last_kth_[size_t(i)] : m * t + (1.f - m) * last_kth_[size_t(i)];
    }
  }
  std::fill(last_tokens_.begin(), last_tokens_.end(), 0);
}

void Model::update_balance_bias() {
  float* balance_bias = buffer_at(bias_at_);
  if (!balance_bias) return;
  const float rate = float(cfg_.router.bias_update_rate);
  for (int64_t l = 0; l < L_moe_; ++l) {  // the MoE blocks
    const int64_t* load = last_load_.data() + l * E_;
    int64_t total = 0;
    for (int64_t e = 0; e < E_; ++e) total += load[e];
    for (int64_t e = 0; e < E_; ++e) {
      // Compare load[e] with the mean total / E exactly, in integers.
      const int64_t diff = total - load[e] * E_;
      balance_bias[l * E_ + e] += diff > 0 ? rate : diff < 0 ? -rate : 0.f;
    }
  }
}

int64_t Model::active_param_count() const {
  int64_t routed = 0;
  for (const Block& b : blocks_)
    for (const Expert& ep : b.moe.experts)
      for (const Linear* lp : {&ep.fc1, &ep.fc2, &ep.fc3})
        for (int id : {lp->weight, lp->bias})
          if (id >= 0) routed += params_.get(id).numel();
  return params_.parameter_count() - routed + routed / E_ * cfg_.router.top_k;
}

std::vector<int64_t> Model::experts_per_layer() const {
  std::vector<int64_t> out;
  for (const Block& b : blocks_) out.push_back(b.sparse ? E_ : 0);
  return out;
}

void Model::init(Rng& rng) {
  const InitKind kind = cfg_.model.init;
  const bool kaiming = kind == InitKind::kKaimingNormal;
  const float std_dev = float(cfg_.model.init_std);
  for (int id = 0; id < params_.count(); ++id) {
    Tensor t = params_.get(id);
    const int64_t n = t.numel();
    const ParamRoleInfo& r = roles_[size_t(id)];
    switch (r.role) {
      case ParamRole::kNormWeight:
        std::fill(t.data, t.data + n, 1.f);
        break;
      case ParamRole::kNormBias:
        std::fill(t.data, t.data + n, 0.f);
        break;
      case ParamRole::kEmbedding:  // makeMoE keeps PyTorch's Embedding default N(0, 1)
        rng.fill_normal(t.data, n, 0.f, kaiming ? 1.f : std_dev);
        break;
      case ParamRole::kLinearBias:  // PyTorch's Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for makeMoE
        if (kaiming) {
          const float bound = 1.f / std::sqrt(float(r.fan_in));
          rng.fill_uniform(t.data, n, -bound, bound);
        } else {
          std::fill(t.data, t.data + n, 0.f);
        }
        break;
      case ParamRole::kLinearWeight:
        switch (kind) {
          case InitKind::kKaimingNormal:
            rng.fill_normal(t.data, n, 0.f, float(std::sqrt(2.0 / double(r.fan_in))));
            break;
          case InitKind::kXavier:
            rng.fill_normal(t.data, n, 0.f, float(std::sqrt(2.0 / double(r.fan_in + r.fan_out))));
            break;
          case InitKind::kNormal:
            rng.fill_normal(t.data, n, 0.f, std_dev);
            break;
        }
        break;
    }
  }
}

void Model::set_parallel(int rank, int ranks, bool expert_parallel) {
  MOE_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "Model", "rank " + std::to_string(rank) + " of " + std::to_string(ranks));
  if (expert_parallel && E_ % ranks != 0)
    throw std::runtime_error("expert parallelism over " + std::to_string(ranks) + " processes needs router.num_experts (" +
                             std::to_string(E_) + ") to be a multiple of " + std::to_string(ranks));
  if (expert_parallel && L_moe_ == 0)
    throw std::runtime_error("expert parallelism needs MoE blocks, and this model is all dense (model.dense_first = "
                             "model.n_layer): train it data parallel (without --expert-parallel)");
  rank_ = rank, ranks_ = ranks, expert_parallel_ = expert_parallel;
}

int64_t Model::noise_per_forward(int64_t rows, bool training) const {
  int64_t n = 0;
  for (const Block& b : blocks_)
    if (b.sparse) n += b.moe.router.noise_draws(rows, training);
  return n;
}

int Model::expert_owner(int64_t e) const {
  return MoEContext{nullptr, nullptr, rank_, ranks_, expert_parallel_}.expert_owner(e, E_);
}

std::vector<int> Model::grad_groups() const {
  std::vector<int> first{0};
  for (const Block& b : blocks_) first.push_back(b.ln1.weight);
  first.push_back(ln_f_.weight);
  return first;
}

std::vector<int> Model::param_expert() const {
  std::vector<int> out(size_t(params_.count()), -1);
  for (const Block& b : blocks_)
    for (size_t e = 0; e < b.moe.experts.size(); ++e)
      for (const Linear* lp : {&b.moe.experts[e].fc1, &b.moe.experts[e].fc2, &b.moe.experts[e].fc3})
        for (int id : {lp->weight, lp->bias})
          if (id >= 0) out[size_t(id)] = int(e);
  return out;
}

MoEContext Model::moe_context(int64_t l) {
  const int64_t m = moe_index_[size_t(l)];
  MOE_CHECK(m >= 0, "Model::moe_context", "block " + std::to_string(l) + " is dense");
  MoEContext ctx;
  ctx.bias = bias_at_ < 0 ? nullptr : buffer_at(bias_at_) + m * E_;
  ctx.last_load = last_load_.data() + m * E_;
  ctx.thresholds = thresholds_at_ < 0 ? nullptr : buffer_at(thresholds_at_) + m * E_;
  ctx.last_kth = thresholds_at_ < 0 ? nullptr : last_kth_.data() + m * E_;
  ctx.last_tokens = last_tokens_.data() + m;
  ctx.rank = rank_, ctx.ranks = ranks_, ctx.expert_parallel = expert_parallel_;
  ctx.unused_rng = &unused_rng_;
  return ctx;
}

Tensor Model::block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt, RouterLosses* losses,
                    float* out_grad) {
  const Block& b = blocks_[size_t(l)];
  // Set here as well as in forward: a recomputed block runs in a graph of its own.
  const Bf16Guard bf16(g, bf16_products(opt));
  const float p = opt.training ? float(cfg_.model.dropout) : 0.f;
  Rng& drop = opt.dropout_rng ? *opt.dropout_rng : unused_rng_;
  // The memory policy: in a gradient scope, everything from x to the MoE's input is made again
  // at the start of the block's backward pass, in forward order (mem.next(), in the order of the
  // ops). The block keeps its input, the attention's weights and masks, the router's figures and
  // the experts' packed hidden layers and outputs. The products made again (qkv, proj) cost no
  // time measurably: their outputs come from cache instead of memory (a step of makeMoE keeps
  // 1 MiB a block less). Dropout and the sums go over outputs that no backward reads.
  Remake mem(g);
  const Tensor h = b.ln1.forward(g, params_, x, mem.next());
  const Tensor o = b.attn.forward(g, params_, h, p, opt.training, drop, mem);
  const Tensor y = dropout_add_into(g, x, o, p, opt.training, drop, mem.next());  // over proj's output
  const Tensor hn = b.ln2.forward(g, params_, y, mem.next());
  const Tensor f = b.sparse ? b.moe.forward(g, params_, hn, l, moe_context(l), opt, losses)
                            : b.ffn.forward(g, params_, hn.view({hn.rows(), C_}), cfg_.model.expert_ffn, p, opt.training,
                                            drop).view(hn.shape);  // over fc2's output, as an expert's
  mem.record();
  Graph::KeepGradsIn outlives_block(g, out_grad, x.numel());
  return add_into(g, y, f);
}

Tensor Model::recomputed_block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt,
                               RouterLosses* losses) {
  // The random numbers the block is about to draw, for drawing them again.
  const Rng no_rng(0, 0);
  const Rng drop0 = opt.dropout_rng ? *opt.dropout_rng : no_rng, noise0 = opt.noise_rng ? *opt.noise_rng : no_rng;
  Tensor out = g.new_tensor(x.shape, true);
  Tensor aux_item, z_item, l1_item;
  RouterLosses mine{{&aux_item, 0}, {&z_item, 0}, {&l1_item, 0}};
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
  const Tensor l1 = losses ? keep(mine.l1, &losses->l1) : Tensor{};
  ForwardOptions again = opt;
  again.stats = nullptr;  // counted once, in the forward
  again.chosen = nullptr;
  again.grads_ready = nullptr;
  again.recompute = nullptr;
  const bool with_losses = losses != nullptr;
  g.record([this, sub, l, x, out, aux, z, l1, again, drop0, noise0, with_losses] {
    Rng drop = drop0, noise = noise0;
    ForwardOptions o = again;
    if (o.dropout_rng) o.dropout_rng = &drop;
    if (o.noise_rng) o.noise_rng = &noise;
    sub->clear();
    const Tensor xs = sub->new_tensor(x.shape, true);
    std::memcpy(xs.data, x.data, sizeof(float) * size_t(x.numel()));
    Tensor aux_again, z_again, l1_again;
    RouterLosses rl{{&aux_again, 0}, {&z_again, 0}, {&l1_again, 0}};
    const Tensor y = block(*sub, l, xs, o, with_losses ? &rl : nullptr);
    sub->backward_from({{y, out.grad}, {aux_again, aux.grad}, {z_again, z.grad}, {l1_again, l1.grad}});
    if (x.grad)  // its only use: the sum equals the one the block would have made here
      for (int64_t i = 0; i < x.numel(); ++i) x.grad[i] += xs.grad[i];
  });
  return out;
}

bool Model::bf16_products(const ForwardOptions& opt) const {
  return opt.training && cfg_.training.precision == Precision::kBf16;
}

Model::Output Model::forward(Graph& g, const int32_t* idx, const int32_t* targets, int64_t B,
                             int64_t T, const ForwardOptions& opt) {
  MOE_CHECK(!decode_layout_, "Model::forward", "the weights are laid out for decoding (use_decode_layout)");
  MOE_CHECK(T >= 1 && T <= T_max_, "Model::forward",
        "sequence length " + std::to_string(T) + " must be in [1, block_size=" + std::to_string(T_max_) + "]");
  MOE_CHECK(!(opt.training && cfg_.model.dropout > 0) || opt.dropout_rng != nullptr, "Model::forward",
        "training with dropout needs a dropout generator");
  if (opt.stats && opt.stats->empty()) opt.stats->reset(experts_per_layer());
  const Bf16Guard bf16(g, bf16_products(opt));
  RouterLosses router_losses;
  router_losses.aux.items = g.arena().alloc_objects<Tensor>(L_);
  router_losses.z.items = g.arena().alloc_objects<Tensor>(L_);
  // The head's weight. Tied, the head's gradient of the shared matrix goes to memory of its own,
  // added into the embedding's by a closure recorded before the embeddings, which the backward
  // pass runs last: with the gradients of each group in one shared region (ParamStore::
  // share_grads), the matrix's gradient must not be there while the blocks' are.
  Tensor head_weight = params_.get(lm_head_.weight);
  if (cfg_.model.tie_embeddings && g.grad_enabled()) {
    const Tensor table = head_weight;
    head_weight.grad = g.grad_memory(table.numel());
    g.record([table, d = head_weight.grad, n = table.numel()] {
      for (int64_t i = 0; i < n; ++i) table.grad[i] += d[i];
    });
  }
  router_losses.l1.items = g.arena().alloc_objects<Tensor>(L_);
  Tensor x = emb_.forward(g, params_, idx, B, T);  // (B, T, C)
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
  float* kept = rewind ? g.arena().alloc_floats(3 * L_) : nullptr;
  int64_t kept_aux = 0, kept_z = 0, kept_l1 = 0;
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
    mark_ready(blocks_[size_t(l)].ln1.weight);
    if (recompute) {
      x = recomputed_block(g, l, x, opt, targets ? &router_losses : nullptr);
      continue;
    }
    const Arena::Mark before = g.arena().mark();
    g.begin_grad_scope();
    const Tensor y = block(g, l, x, opt, targets ? &router_losses : nullptr, out_grads[l % 2]);
    g.end_grad_scope();
    if (out_grads[0] && l > 0) {
      PartScope zeroing(Part::Zeroing);
      g.record([d = x.grad, n = x.numel()] { std::fill(d, d + n, 0.f); });
    }
    if (!rewind) {
      x = y;
      continue;
    }
    std::memcpy(x.data, y.data, sizeof(float) * size_t(x.numel()));
    keep(router_losses.aux, kept_aux);
    keep(router_losses.z, kept_z);
    keep(router_losses.l1, kept_l1);
    g.arena().rewind(before);
  }
  mark_ready(ln_f_.weight);
  Output out;
  out.logits = linear(g, ln_f_.forward(g, params_, x), head_weight, lm_head_.bias_tensor(params_));  // (B, T, V)
  if (!targets) return out;
  out.loss = cross_entropy(g, out.logits, targets, &out.token_losses);
  out.objective = out.loss;
  // Each balancing loss is averaged over the MoE layers, then weighted by its coefficient.
  const auto add_term = [&](const LossList& terms, double coef) {
    for (int64_t i = 0; i < terms.size; ++i)
      out.objective = add(g, out.objective, scale(g, terms.items[i], float(coef / double(L_moe_))));
  };
  add_term(router_losses.aux, cfg_.router.aux_loss_coef);
  add_term(router_losses.z, cfg_.router.z_loss_coef);
  add_term(router_losses.l1, double(l1_coef()));
  return out;
}

KVCache Model::new_cache() const {
  KVCache c;
  const int64_t K = slots_per_token(cfg_.router), F = cfg_.expert_hidden_size();
  const int64_t Fd = L_moe_ < L_ ? cfg_.dense_hidden_size() : 0;  // a dense block's width
  const auto T = size_t(T_max_), C = size_t(C_), E = size_t(E_), TK = size_t(T_max_ * K);
  const auto H = size_t(cfg_.model.n_head), KC = size_t(cfg_.kv_heads() * cfg_.head_size());
  c.k.assign(size_t(L_) * T * KC, 0.f);
  c.v.assign(size_t(L_) * T * KC, 0.f);
  KVCache::Work& w = c.work;
  for (auto* b : {&w.x, &w.normed, &w.heads, &w.sub}) b->resize(T * C);
  w.qkv.resize(T * (C + 2 * KC));
  for (auto* b : {&w.mean, &w.scores}) b->resize(T);
  w.rstd.resize(std::max(T, H));  // rows of the block's norm, or one row's heads (qk_norm)
  if (cfg_.model.position == PositionKind::kRope)
    for (auto* b : {&w.rope_cos, &w.rope_sin}) b->resize(T * size_t(cfg_.head_size() / 2));
  for (auto* b : {&w.clean, &w.noise, &w.logits, &w.probs}) b->resize(T * E);
  for (auto* b : {&w.gates, &w.gathered}) b->resize(TK);
  for (auto* b : {&w.index, &w.token, &w.gate_pos}) b->resize(TK);
  w.offsets.resize(E + 1);
  w.chosen.resize(E);
  w.active.resize(E);
  // Expert rows: the routed slots (T*K), or every position for a shared expert (T <= T*K).
  for (auto* b : {&w.rows, &w.expert_out}) b->resize(TK * C);
  for (auto* b : {&w.hidden, &w.hidden3}) b->resize(std::max(TK * size_t(F), T * size_t(Fd)));
  w.out.resize(size_t(V_));
  return c;
}

void Model::use_decode_layout() {
  std::vector<float> scratch;
  const auto lay_out = [&](Linear& lp) {
    if (lp.weight >= 0) lp.to_decode_layout(params_, scratch);
  };
  const auto lay_out_expert = [&](Expert& ep) {
    for (Linear* lp : {&ep.fc1, &ep.fc2, &ep.fc3}) lay_out(*lp);
  };
  for (Block& b : blocks_) {
    for (Linear* lp : {&b.attn.qkv, &b.attn.proj, &b.moe.router.route, &b.moe.router.noise}) lay_out(*lp);
    for (Expert& ep : b.moe.experts) lay_out_expert(ep);
    for (Expert& ep : b.moe.shared) lay_out_expert(ep);
    lay_out_expert(b.ffn);
  }
  if (!cfg_.model.tie_embeddings) lm_head_.to_decode_layout(params_, scratch);
  decode_layout_ = true;
}

const float* Model::decode(KVCache& cache, const int32_t* tokens, int64_t n, const ForwardOptions& opt) {
  // With rope the cache rolls (positions go on past block_size); learned positions end there.
  const bool rolling = cfg_.model.position == PositionKind::kRope;
  MOE_CHECK(n >= 1 && (rolling ? n <= T_max_ : cache.len + n <= T_max_), "Model::decode",
            rolling ? std::to_string(n) + " positions at once exceed block_size " + std::to_string(T_max_)
                    : "cache holds " + std::to_string(cache.len) + " positions; " + std::to_string(n) +
                          " more exceed block_size " + std::to_string(T_max_));
  MOE_CHECK(cache.work.out.size() == size_t(V_) &&
                cache.k.size() == size_t(L_ * T_max_ * cfg_.kv_heads() * cfg_.head_size()),
            "Model::decode",
            "the cache was not made by this model's new_cache()");
  MOE_CHECK(!opt.fixed_noise && !opt.fixed_jitter && !opt.stats && !opt.chosen && !opt.chosen_weights, "Model::decode",
            "fixed router noise or jitter, routing statistics and chosen ids are options of Model::forward only");
  KVCache::Work& w = cache.work;
  float* x = w.x.data();
  DecodeProfile* prof = opt.profile;  // the clock is read only when profiling
  const auto lap = [prof](DecodeProfile::Part p) {
    if (prof) prof->lap(p);
  };
  if (prof) prof->begin(L_, n);
  emb_.decode(params_, tokens, n, cache.len, x);
  lap(DecodeProfile::kEmbeddings);
  const auto add_sub = [&] {
    const float* sub = w.sub.data();
    for (int64_t i = 0; i < n * C_; ++i) x[i] = x[i] + sub[i];
  };
  for (int64_t l = 0; l < L_; ++l) {
    const Block& b = blocks_[size_t(l)];
    if (prof) prof->at_layer(l);
    b.ln1.decode(params_, w, x, n);
    lap(DecodeProfile::kNorms);
    b.attn.decode(params_, cache, l, n);
    lap(DecodeProfile::kAttention);
    add_sub();
    b.ln2.decode(params_, w, x, n);
    lap(DecodeProfile::kNorms);
    if (b.sparse) {
      b.moe.decode(params_, w, n, moe_context(l), opt);  // laps its router and experts
    } else {
      b.ffn.decode(params_, cfg_.model.expert_ffn, w.normed.data(), n, w.hidden.data(), w.hidden3.data(),
                   w.sub.data());
      lap(DecodeProfile::kExperts);
    }
    add_sub();
    lap(DecodeProfile::kNorms);
  }
  cache.len += n;
  if (prof) prof->at_layer(-1);
  // Only the last position's logits are needed.
  ln_f_.decode(params_, w, x + (n - 1) * C_, 1);
  lm_head_.decode(params_, w.normed.data(), 1, w.out.data());
  lap(DecodeProfile::kHead);
  return w.out.data();
}

}  // namespace moe
