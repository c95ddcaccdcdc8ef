// What every module's forward shares: the options of a forward pass, the routing statistics
// it gathers, and the key/value cache and buffers of incremental decoding.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/tensor/graph.hpp"
#include "moe/tensor/rng.hpp"

namespace moe {

// Per-layer routing statistics gathered during forwards (metrics log and `moe eval`).
struct RoutingStats {
  std::vector<std::vector<int64_t>> tokens_per_expert;  // [layer][expert]: slots the router chose
  std::vector<int64_t> assigned, dropped;  // [layer]: routed slots, and those the capacity dropped
  std::vector<int64_t> tokens, forwards;   // [layer]
  std::vector<double> entropy_sum;  // [layer]: Σ over tokens of the router entropy (nats)
  std::vector<double> z_sum;        // [layer]: Σ over tokens of logsumexp(router logits)²
  std::vector<double> aux_sum;      // [layer]: Σ over forwards of Σ_i f_i P_i (aux loss / E)
  // Experts per token, for gatings where it varies (relu, expert_choice; `variable`):
  // [layer] Σ, Σ², min and max over tokens of the experts that ran for it.
  bool variable = false;
  std::vector<double> per_token_sum, per_token_sq;
  std::vector<int64_t> per_token_min, per_token_max;
  void reset(int64_t layers, int64_t experts);
  // experts[l]: layer l's routed experts, 0 for a dense block (no router: its figures stay empty).
  void reset(const std::vector<int64_t>& experts);
  bool empty() const { return tokens_per_expert.empty(); }
  // Adds other's figures to these (same layers and experts): from the forwards of other, what
  // gathering them here after these would give.
  void add(const RoutingStats& other);
  // Per layer: {"load": fraction of slots per expert, "dropped_frac", "router_entropy",
  // "aux_loss", "z_loss", "max_violation" (max load / mean load - 1)}, and when `variable`
  // "experts_per_token": {"mean", "std", "min", "max"}; null for a dense block.
  nlohmann::json health() const;
  // tokens_per_expert as JSON: per layer the slots per expert, null for a dense block.
  nlohmann::json counts() const;
};

// Told during the backward pass when gradients are final, so that communicating them can
// overlap the rest of the backward pass: from(first) means the gradients of parameter ids
// first, first + 1, ... (to the last) are complete.
class GradientsReady {
 public:
  virtual void from(int first_param) = 0;

 protected:
  ~GradientsReady() = default;
};

// The random numbers of a forward, stream by stream (moe/tensor/streams.hpp names them):
// - dropout_rng: every dropout, in forward order (attention weights, the attention's output,
//   the experts' outputs), one number per element;
// - noise_rng: the routers', in layer order. Router::noise_draws says how many one layer
//   draws for a number of tokens, and Model::noise_per_forward adds them up: batched
//   evaluation and the MPI shards place a batch's numbers by that count.
// Where Model::decode's time goes (moe generate --profile): seconds per part and layer, apart
// for the calls of one position (a generated character) and of several (a prompt, a
// re-encoded context). The clock is read only when ForwardOptions::profile is set.
struct DecodeProfile {
  enum Part : int { kEmbeddings, kNorms, kAttention, kRouter, kExperts, kThreadWait, kHead, kParts };
  static const char* part_name(int p);
  int64_t layers = 0;
  std::vector<double> seconds;  // [2][layers + 1][kParts]: [0] one position, [1] several; row `layers`: outside the blocks
  int64_t calls[2] = {0, 0}, positions[2] = {0, 0};
  double sampling = 0, output = 0;  // the Generator's: choosing each character, handing it on

  double& at(int kind, int64_t layer, int part) { return seconds[size_t((kind * (layers + 1) + layer) * kParts + part)]; }
  double at(int kind, int64_t layer, int part) const {
    return seconds[size_t((kind * (layers + 1) + layer) * kParts + part)];
  }
  double total(int kind, int part) const;  // over the layers and the row outside them
  // Model::decode's bookkeeping: a call of n positions starts; the next laps go to `layer`
  // (-1: outside the blocks); a lap adds the time since the last one to a part, `wait` of it
  // to kThreadWait instead.
  void begin(int64_t n_layers, int64_t n);
  void at_layer(int64_t l) { layer_ = l < 0 ? layers : l; }
  void lap(Part p, double wait = 0);
  static double now();

 private:
  int kind_ = 0;
  int64_t layer_ = 0;
  double last_ = 0;
};

struct ForwardOptions {
  // Model::decode only: where the time goes, when set (moe generate --profile).
  DecodeProfile* profile = nullptr;
  bool training = false;         // dropout on; router noise on when router.noisy
  Rng* dropout_rng = nullptr;    // required when training with dropout > 0
  Rng* noise_rng = nullptr;      // required when router noise or jitter applies
  // Router noise fixed from outside (tests against the PyTorch twin): per layer, [B*T, E].
  const std::vector<std::vector<float>>* fixed_noise = nullptr;
  // Router jitter factors fixed from outside (tests): per layer, [B*T, C].
  const std::vector<std::vector<float>>* fixed_jitter = nullptr;
  RoutingStats* stats = nullptr;
  // Top-k ids chosen per layer ([B*T*K] each), written when non-null (tests).
  std::vector<std::vector<int32_t>>* chosen = nullptr;
  // Their gate weights per layer ([B*T*K] each, same order), written when non-null (moe inspect).
  std::vector<std::vector<float>>* chosen_weights = nullptr;
  // The training forward of a run over several processes (see Model::set_parallel): the
  // routing counts behind the aux loss, the balancing bias and the expert dropout are those
  // of the global batch, and with expert parallelism the routed rows travel to the rank
  // that owns their expert. Collective: every rank runs the same forwards.
  bool distributed = false;
  // When set, the forward records a call to it at the start of each block and of the head.
  GradientsReady* grads_ready = nullptr;
  // When set (and gradients are on): recomputation. Each block runs without gradients, keeping
  // only its output; the backward pass runs it again in this graph, from the same input and the
  // same random numbers, and goes back through it there. The gradients are the same bits;
  // activations take one block's memory here and in the graph. One process only.
  Graph* recompute = nullptr;
  // The k of top-k gatings for this forward (router.top_k_anneal_steps); 0: router.top_k.
  int64_t top_k = 0;
  // router.gating "expert_choice" outside training: route by the batch rule (each expert its
  // best tokens of this batch, as in training) instead of the causal thresholds.
  bool batch_routing = false;
};

// A forward's balancing losses, one scalar per layer each, in its graph's arena: a forward
// keeps nothing in the model, so that threads can run forwards at once.
struct LossList {
  Tensor* items = nullptr;
  int64_t size = 0;
  void push(const Tensor& t) { items[size++] = t; }
};
struct RouterLosses {
  LossList aux, z, l1;  // l1: relu gating's mean over tokens of Σ_e gate (ReMoE's L1 penalty)
};

// Key/value cache for incremental generation of one sequence, with the buffers Model::decode
// works in (sized by Model::new_cache for block_size positions, so decoding allocates nothing).
// With model.position = "rope" the cache is a ring: position p in slot p % T, the last T kept.
struct KVCache {
  int64_t len = 0;              // positions decoded (the next one's position)
  std::vector<float> k, v;      // [L, T, H_kv·D] each, T = block_size
  struct Work {
    std::vector<float> x, normed, qkv, heads, sub;  // [n, C] residual stream, its norm, [n, C + 2·H_kv·D],
                                                    // attention by head, a sublayer's output [n, C]
    std::vector<float> mean, rstd, scores;          // [n], [max(n, H)], [T]
    std::vector<float> rope_cos, rope_sin;          // rope: [n, D/2] each
    std::vector<float> clean, noise, logits, probs, gates, gathered;  // router: [n, E] (gates, gathered [n, K])
    std::vector<int32_t> index, offsets, token, gate_pos;   // top-k ids [n, K], groups per expert
    std::vector<int32_t> chosen;                            // slots per expert before drops [E]
    std::vector<int32_t> active;                            // the experts with slots [<= E]
    std::vector<float> rows, hidden, hidden3, expert_out;   // expert inputs [n*K, C], [n*K, F] x2, [n*K, C]
    std::vector<float> out;                                 // logits of the last position [V]
  } work;
};

}  // namespace moe
