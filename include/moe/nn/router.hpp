// The router: per token, which experts and with what weights, as a RoutingPlan that the MoE
// layer's executors run. Training (on the graph) and decoding (on kernels) share the gating
// math (gate_forward below) and the plan's grouping and capacity (group_plan).
//
// Logits: clean = route(x'), where x' = x ⊙ u, u ~ U(1 - jitter, 1 + jitter) in training
// (Megablocks' router jitter; x' = x otherwise); with noise (noisy top-k), logits = clean +
// n ⊙ softplus(noise(x')), n ~ N(0, 1). Gating (router.gating):
// - topk_softmax: the K largest logits, softmax over them (makeMoE);
// - softmax_topk: softmax over all experts, the K largest probabilities, rescaled to sum 1
//   with router.renormalize (Mixtral);
// - sigmoid_topk: s = sigmoid(logits), the K largest, weights s / Σ_chosen s · route_scale
//   (DeepSeek-V3).
// - relu (ReMoE): weights ReLU(logits) at every expert; a token goes to the experts whose
//   weight is positive, a variable number (the plan has K = E slots, the zero ones not run);
// - expert_choice (Zhou et al. 2022): p = softmax(logits) over experts; in training (and in
//   `moe eval`'s batch loss) each expert takes the C = capacity_factor·N·top_k/E tokens of the
//   batch of largest p (ties: the lower token), and remembers its C-th score; otherwise (a causal
//   rule, for evaluation and decoding) a token goes to each expert e with p_e >= threshold_e,
//   the EMA of that C-th score over training steps. Weights: p at the taken slots.
// The balancing bias (router.bias_update_rate) shifts the choice only, never the weights. With
// router.n_groups > 1 the choice is group-limited (topk_select_grouped).
#pragma once

#include <string>

#include "moe/io/config.hpp"
#include "moe/nn/linear.hpp"

namespace moe {

// A routing plan over N tokens, K slots each: per token its experts and weights, per expert
// its rows. K may equal E (a dense weight per token and expert).
struct RoutingPlan {
  int64_t N = 0, E = 0, K = 0;
  const int32_t* index = nullptr;  // [N, K] expert of each slot, per token in descending score
  float* weights = nullptr;        // [N, K] gate weight of each slot
  int32_t* offsets = nullptr;      // [E + 1] expert e's rows: offsets[e]..offsets[e+1] (after drops)
  int32_t* token = nullptr;        // [N*K] each row's token, grouped by expert, tokens in order
  int32_t* gate_pos = nullptr;     // [N*K] each row's slot n*K + k
  int32_t* chosen = nullptr;       // [E] slots each expert was chosen for, before drops
  int64_t dropped = 0;             // slots the capacity dropped
  int64_t rows() const { return offsets[E]; }
};

// Groups the plan's slots by expert (offsets, token, gate_pos, chosen) and applies the capacity
// (0: none): an expert keeps its `capacity` slots of largest weight. With skip_zero, slots of
// weight 0 are left out first (relu, expert_choice: chosen counts only the others).
void group_plan(RoutingPlan& plan, int64_t capacity, bool skip_zero = false);

// How the router turns logits into its choice and weights: the router options that the
// gating reads.
struct GateSpec {
  Gating gating = Gating::kTopkSoftmax;
  bool renormalize = false;   // softmax_topk
  float route_scale = 1;      // sigmoid_topk
  int64_t groups = 1, open_groups = 1;  // group-limited choice (router.n_groups, topk_groups)
  static GateSpec of(const RouterConfig& rc);
};

// Expert choice's rule for one forward: with capacity > 0 the batch rule (each expert its
// `capacity` best tokens; its capacity-th score into kth [E] when not null), else the causal
// rule with thresholds [E].
struct ExpertChoice {
  int64_t capacity = 0;
  const float* thresholds = nullptr;
  float* kth = nullptr;
};

// The gating: index [N, K] and weights [N, K] from logits [N, E] and the selection bias (may be
// null). probs [N, E] and gathered [N, K] hold the intermediates of softmax_topk (probabilities,
// and the chosen ones before renormalising), sigmoid_topk (sigmoids, and the chosen ones) and
// expert_choice (probabilities). relu and expert_choice take K = E, slots in descending score.
void gate_forward(const GateSpec& spec, int32_t* index, float* weights, float* probs, float* gathered,
                  const float* logits, const float* bias, int64_t N, int64_t E, int64_t K,
                  const ExpertChoice& ec = {});

// What the router reads and writes of the model's state besides its parameters.
struct RouterState {
  const float* bias = nullptr;        // [E] the balancing bias, or null
  const float* thresholds = nullptr;  // [E] expert_choice: the causal thresholds
  float* kth = nullptr;               // [E] expert_choice, batch rule: each expert's C-th score
};

class Router {
 public:
  Linear route;  // C -> E: clean logits
  Linear noise;  // C -> E: scale of the noise, through softplus

  static Router make(ParamBuilder& pb, const std::string& prefix, int64_t C, const RouterConfig& rc);
  // Whether the router adds noise: router.noisy, in training or with router.noise_at_eval.
  bool noisy(bool training) const { return rc_.noisy && (training || rc_.noise_at_eval); }
  bool jitters(bool training) const { return training && rc_.jitter > 0; }
  // Numbers one forward over `rows` tokens draws from ForwardOptions::noise_rng: the jitter's
  // (C per token, first), then the noise's (E per token).
  int64_t noise_draws(int64_t rows, bool training) const;
  // Slots each expert keeps for `rows` tokens (0: no capacity) in training or not, K per token.
  int64_t capacity(int64_t rows, bool training, int64_t K) const;
  // Slots per token of a forward: E for relu and expert_choice, else the step's k
  // (ForwardOptions::top_k, or router.top_k).
  int64_t slots(const ForwardOptions& opt) const;
  // Whether the plan's count of experts per token varies (relu, expert_choice).
  bool variable() const { return gate_.gating == Gating::kRelu || gate_.gating == Gating::kExpertChoice; }

  struct Routed {
    Tensor clean;    // [N, E] clean logits (the balancing losses read them)
    Tensor weights;  // [N, K] the plan's weights, with their gradient
    RoutingPlan plan;
  };
  // The plan for the rows of x [N, C] (layer `layer`, for fixed noise).
  Routed forward(Graph& g, const ParamStore& ps, const Tensor& x, int64_t layer, const RouterState& st,
                 const ForwardOptions& opt) const;
  // The same in evaluation for the n rows of w.normed, in w's router buffers.
  RoutingPlan decode(const ParamStore& ps, KVCache::Work& w, int64_t n, const RouterState& st,
                     const ForwardOptions& opt) const;

 private:
  // Expert choice's rule for `rows` tokens: the batch rule or the causal one; {} otherwise.
  ExpertChoice expert_choice(int64_t rows, const RouterState& st, bool batch) const;

  RouterConfig rc_;
  GateSpec gate_;
  int64_t C_ = 0;
};

}  // namespace moe
