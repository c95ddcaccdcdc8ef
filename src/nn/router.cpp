#include "moe/nn/router.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "moe/kernels/log1pf.hpp"
#include "moe/kernels/nn.hpp"
#include "moe/kernels/routing.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

void group_plan(RoutingPlan& p, int64_t capacity, bool skip_zero) {
  group_by_expert(p.index, p.N, p.K, p.E, p.offsets, p.token, p.gate_pos);
  if (skip_zero) {  // compact each expert's list in place, keeping the slots of nonzero weight
    int32_t kept = 0;
    for (int64_t e = 0; e < p.E; ++e) {
      const int32_t begin = p.offsets[e], end = p.offsets[e + 1];
      p.offsets[e] = kept;
      for (int32_t s = begin; s < end; ++s)
        if (p.weights[p.gate_pos[s]] != 0.f) p.token[kept] = p.token[s], p.gate_pos[kept++] = p.gate_pos[s];
    }
    p.offsets[p.E] = kept;
  }
  for (int64_t e = 0; e < p.E; ++e) p.chosen[e] = p.offsets[e + 1] - p.offsets[e];
  p.dropped = capacity > 0 ? apply_capacity(p.offsets, p.token, p.gate_pos, p.weights, p.E, capacity) : 0;
}

GateSpec GateSpec::of(const RouterConfig& rc) {
  return {rc.gating, rc.renormalize, float(rc.route_scale), rc.n_groups, rc.topk_groups};
}

namespace {

// Expert choice's choice: taken [N, E] = 1 where expert e takes token n. Batch rule: each
// expert's ec.capacity tokens of largest probs (ties: the lower token), its capacity-th score
// into ec.kth; causal rule: probs >= ec.thresholds.
void expert_choice_select(uint8_t* taken, const float* probs, int64_t N, int64_t E, const ExpertChoice& ec) {
  std::fill(taken, taken + N * E, uint8_t(0));
  if (ec.capacity <= 0) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t e = 0; e < E; ++e) taken[n * E + e] = probs[n * E + e] >= ec.thresholds[e];
    return;
  }
  const int64_t C = std::min(ec.capacity, N);
  std::vector<int32_t> order(static_cast<size_t>(N));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t n = 0; n < N; ++n) order[size_t(n)] = int32_t(n);
    const auto better = [&](int32_t a, int32_t b) {
      const float pa = probs[a * E + e], pb = probs[b * E + e];
      return pa > pb || (pa == pb && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + C, order.end(), better);
    for (int64_t c = 0; c < C; ++c) taken[order[size_t(c)] * E + e] = 1;
    if (ec.kth) ec.kth[e] = probs[order[size_t(C - 1)] * E + e];
  }
}

}  // namespace

void gate_forward(const GateSpec& spec, int32_t* index, float* weights, float* probs, float* gathered,
                  const float* logits, const float* bias, int64_t N, int64_t E, int64_t K, const ExpertChoice& ec) {
  const auto select = [&](const float* scores) {
    topk_select_grouped(index, scores, bias, N, E, K, spec.groups, spec.open_groups);
  };
  switch (spec.gating) {
    case Gating::kTopkSoftmax:
      select(logits);
      topk_softmax_forward(weights, index, logits, N, E, K);
      return;
    case Gating::kSoftmaxTopk:
      softmax_forward(probs, logits, N, E, false);
      select(probs);
      gather_cols_forward(spec.renormalize ? gathered : weights, probs, index, N, E, K);
      if (spec.renormalize) normalize_rows_forward(weights, gathered, N, K);
      return;
    case Gating::kSigmoidTopk:
      for (int64_t i = 0; i < N * E; ++i) probs[i] = act::sigmoid(logits[i]);
      select(probs);
      gather_cols_forward(gathered, probs, index, N, E, K);
      normalize_rows_forward(weights, gathered, N, K);
      for (int64_t i = 0; i < N * K; ++i) weights[i] *= spec.route_scale;
      return;
    case Gating::kRelu:  // every expert, in descending logit; weight max(logit, 0)
      topk_select(index, logits, nullptr, N, E, E);
      gather_cols_forward(weights, logits, index, N, E, E);
      for (int64_t i = 0; i < N * E; ++i) weights[i] = std::max(weights[i], 0.f);
      return;
    case Gating::kExpertChoice: {
      softmax_forward(probs, logits, N, E, false);
      std::vector<uint8_t> taken(size_t(N * E));
      expert_choice_select(taken.data(), probs, N, E, ec);
      topk_select(index, probs, nullptr, N, E, E);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < E; ++k) {
          const int64_t e = index[n * E + k];
          weights[n * E + k] = taken[n * E + e] ? probs[n * E + e] : 0.f;
        }
      return;
    }
  }
}

namespace {

// The gating as one op: weights [N, K] from logits [N, E], their gradient into the logits.
// For softmax_topk the backward runs what the separate ops' backward passes ran, in their
// order: the renormalisation's, the gather's (into zeroed probabilities' gradients), then the
// softmax's.
Tensor gate(Graph& g, const Tensor& logits, const GateSpec& spec, const float* bias, int64_t K, int32_t* index,
            const ExpertChoice& ec) {
  const int64_t N = logits.size(0), E = logits.size(1);
  MOE_CHECK(K >= 1 && K <= E, "gate", "K=" + std::to_string(K) + " must be in [1, E=" + std::to_string(E) + "]");
  Tensor w = g.output({N, K}, logits);
  const Gating kind = spec.gating;
  const bool renormalize = spec.renormalize;
  const bool with_probs = kind != Gating::kTopkSoftmax && kind != Gating::kRelu;
  const bool with_gathered = kind == Gating::kSigmoidTopk || (kind == Gating::kSoftmaxTopk && renormalize);
  float* probs = with_probs ? g.arena().alloc_floats(N * E) : nullptr;
  float* gathered = with_gathered ? g.arena().alloc_floats(N * K) : nullptr;
  gate_forward(spec, index, w.data, probs, gathered, logits.data, bias, N, E, K, ec);
  if (!w.requires_grad()) return w;
  switch (kind) {
    case Gating::kRelu:  // dlogit = dw where the weight is positive
      g.record([=] {
        for (int64_t i = 0; i < N * K; ++i)
          if (w.data[i] > 0.f) logits.grad[(i / K) * E + index[i]] += w.grad[i];
      });
      return w;
    case Gating::kExpertChoice:  // w = p at the taken slots: dp = dw there, then the softmax's backward
      break;
    case Gating::kTopkSoftmax:
      g.record([=] { topk_softmax_backward(logits.grad, w.grad, w.data, index, N, E, K); });
      return w;
    case Gating::kSigmoidTopk: {
      // w_k = r · s_k / S, S = Σ_k s_k: ds_j = (dw_j - Σ_k dw_k w_k / r) · r / S, then through the sigmoid.
      const float r = spec.route_scale;
      g.record([=] {
        for (int64_t n = 0; n < N; ++n) {
          const float* s = gathered + n * K;
          const float* dw = w.grad + n * K;
          float sum = 0, dot = 0;
          for (int64_t k = 0; k < K; ++k) sum += s[k], dot += dw[k] * w.data[n * K + k];
          for (int64_t k = 0; k < K; ++k) {
            const float ds = (dw[k] - dot / r) * r / sum;
            logits.grad[n * E + index[n * K + k]] += ds * s[k] * (1.f - s[k]);
          }
        }
      });
      return w;
    }
    case Gating::kSoftmaxTopk:
      break;
  }
  float* dprobs = g.arena().alloc_floats(N * E);
  if (kind == Gating::kExpertChoice) {
    g.record([=] {
      std::fill(dprobs, dprobs + N * E, 0.f);
      for (int64_t i = 0; i < N * K; ++i)
        if (w.data[i] != 0.f) dprobs[(i / K) * E + index[i]] = w.grad[i];
      softmax_backward(logits.grad, dprobs, probs, N, E);
    });
    return w;
  }
  float* dgathered = renormalize ? g.arena().alloc_floats(N * K) : nullptr;
  g.record([=] {
    const float* dg = w.grad;
    if (renormalize) {  // w = x / s: dx_j = (dw_j - Σ_k dw_k w_k) / s
      for (int64_t n = 0; n < N; ++n) {
        float s = 0, dot = 0;
        for (int64_t k = 0; k < K; ++k) s += gathered[n * K + k], dot += w.grad[n * K + k] * w.data[n * K + k];
        for (int64_t k = 0; k < K; ++k) dgathered[n * K + k] = 0.f + (w.grad[n * K + k] - dot) / s;
      }
      dg = dgathered;
    }
    std::fill(dprobs, dprobs + N * E, 0.f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) dprobs[n * E + index[n * K + k]] += dg[n * K + k];
    softmax_backward(logits.grad, dprobs, probs, N, E);
  });
  return w;
}

}  // namespace

Router Router::make(ParamBuilder& pb, const std::string& prefix, int64_t C, const RouterConfig& rc) {
  Router r;
  r.rc_ = rc;
  r.gate_ = GateSpec::of(rc);
  r.C_ = C;
  r.route = Linear::make(pb, prefix + "route", C, rc.num_experts, true);
  r.noise = Linear::make(pb, prefix + "noise", C, rc.num_experts, true);
  return r;
}

int64_t Router::noise_draws(int64_t rows, bool training) const {
  return (jitters(training) ? rows * C_ : 0) + (noisy(training) ? rows * rc_.num_experts : 0);
}

int64_t Router::capacity(int64_t rows, bool training, int64_t K) const {
  if (gate_.gating == Gating::kExpertChoice) return 0;  // its capacity is its choice: nothing to drop
  RouterConfig rc = rc_;
  rc.top_k = K;
  return rc.capacity_factor > 0 && (training || rc.capacity_at_eval) ? expert_capacity(rc, rows) : 0;
}

int64_t Router::slots(const ForwardOptions& opt) const {
  return variable() ? rc_.num_experts : opt.top_k > 0 ? opt.top_k : rc_.top_k;
}

Router::Routed Router::forward(Graph& g, const ParamStore& ps, const Tensor& x, int64_t layer, const RouterState& st,
                               const ForwardOptions& opt) const {
  PartScope part(Part::Routing);
  const int64_t N = x.rows(), E = rc_.num_experts, K = slots(opt);
  // The router's products stay fp32 under training.precision "bf16" (as Switch Transformer's
  // selective precision): its logits choose the experts, and they are a small part of a step.
  const Bf16Guard fp32(g, false);
  const auto fixed = [&](const std::vector<std::vector<float>>* from, float* to, int64_t n, const char* what) {
    const auto& v = (*from)[size_t(layer)];
    MOE_CHECK(int64_t(v.size()) == n, "Model", std::string("fixed router ") + what + " has the wrong size");
    std::memcpy(to, v.data(), sizeof(float) * size_t(n));
  };
  Tensor in = x;  // (N, C)
  if (jitters(opt.training)) {
    Tensor u = g.new_tensor({N, C_}, false);  // (N, C) in [1 - jitter, 1 + jitter]
    if (opt.fixed_jitter) {
      fixed(opt.fixed_jitter, u.data, N * C_, "jitter");
    } else {
      MOE_CHECK(opt.noise_rng != nullptr, "Model", "router jitter needs a noise generator");
      const auto j = float(rc_.jitter);
      opt.noise_rng->fill_uniform(u.data, N * C_, 1.f - j, 1.f + j);
    }
    in = mul(g, x, u);
  }
  Routed r;
  r.clean = route.forward(g, ps, in);  // (N, E)
  Tensor logits = r.clean;
  if (opt.fixed_noise != nullptr || noisy(opt.training)) {
    Tensor n = g.new_tensor({N, E}, false);  // (N, E) standard normal
    if (opt.fixed_noise) {
      fixed(opt.fixed_noise, n.data, N * E, "noise");
    } else {
      MOE_CHECK(opt.noise_rng != nullptr, "Model", "router noise needs a noise generator");
      opt.noise_rng->fill_normal(n.data, N * E);
    }
    Tensor noise_scale = softplus(g, noise.forward(g, ps, in));
    logits = add(g, r.clean, mul(g, n, noise_scale));
  }
  int32_t* index = g.arena().alloc_ints(N * K);
  r.weights = gate(g, logits, gate_, st.bias, K, index, expert_choice(N, st, opt.training || opt.batch_routing));
  r.plan = {N, E, K, index, r.weights.data, g.arena().alloc_ints(E + 1), g.arena().alloc_ints(N * K),
            g.arena().alloc_ints(N * K), g.arena().alloc_ints(E)};
  group_plan(r.plan, capacity(N, opt.training, variable() ? rc_.top_k : K), variable());  // relu: top_k on average
  return r;
}

ExpertChoice Router::expert_choice(int64_t rows, const RouterState& st, bool batch) const {
  if (gate_.gating != Gating::kExpertChoice) return {};
  if (batch) return {expert_capacity(rc_, rows), nullptr, st.kth};
  MOE_CHECK(st.thresholds != nullptr, "Router", "expert choice's causal rule needs the thresholds");
  return {0, st.thresholds, nullptr};
}

RoutingPlan Router::decode(const ParamStore& ps, KVCache::Work& w, int64_t n, const RouterState& st,
                           const ForwardOptions& opt) const {
  const int64_t E = rc_.num_experts, K = variable() ? E : rc_.top_k;
  const float* x = w.normed.data();
  float* clean = w.clean.data();
  route.decode(ps, x, n, clean);  // (n, E)
  const float* logits = clean;
  if (noisy(false)) {  // clean + noise ⊙ softplus(noise linear), as mul() then add()
    MOE_CHECK(opt.noise_rng != nullptr, "Model::decode", "router noise needs a noise generator");
    float* nz = w.noise.data();
    opt.noise_rng->fill_normal(nz, n * E);
    float* noisy_logits = w.logits.data();
    noise.decode(ps, x, n, noisy_logits);
    softplus_floats(noisy_logits, noisy_logits, n * E);
    for (int64_t i = 0; i < n * E; ++i) noisy_logits[i] = nz[i] * noisy_logits[i];
    for (int64_t i = 0; i < n * E; ++i) noisy_logits[i] = noisy_logits[i] + clean[i];
    logits = noisy_logits;
  }
  RoutingPlan plan{n,           E, K, w.index.data(), w.gates.data(), w.offsets.data(), w.token.data(),
                   w.gate_pos.data(), w.chosen.data()};
  gate_forward(gate_, w.index.data(), w.gates.data(), w.probs.data(), w.gathered.data(), logits, st.bias, n, E, K,
               expert_choice(n, st, false));
  group_plan(plan, capacity(n, false, variable() ? rc_.top_k : K), variable());
  return plan;
}

}  // namespace moe
