// Model: the makeMoE transformer (token + position embeddings, pre-norm blocks of causal
// multi-head attention and a sparse MoE feed-forward with a noisy top-k router, final
// LayerNorm, lm_head), built on the autograd ops. Parameters live in one ParamStore under
// PyTorch-style dotted names (see scripts/torch_twin.py for the twin with the same names).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/io/config.hpp"
#include "moe/kernels/activations.hpp"
#include "moe/tensor/graph.hpp"
#include "moe/tensor/params.hpp"
#include "moe/tensor/rng.hpp"

namespace moe {

struct Regen;  // moe/ops/ops.hpp

struct LinearParams {
  int weight = -1;  // [out, in]
  int bias = -1;    // [out], or -1 for none
  int64_t in = 0, out = 0;
};

struct NormParams {
  int weight = -1, bias = -1;  // [C]
};

struct ExpertParams {
  LinearParams fc1;  // C -> F
  LinearParams fc2;  // F -> C
  LinearParams fc3;  // C -> F, SwiGLU's linear branch (weight -1 otherwise)
};

struct BlockParams {
  NormParams ln1;
  LinearParams qkv;   // C -> 3C, no bias: rows [q; k; v], head h at rows h*D..(h+1)*D of each
  LinearParams proj;  // C -> C
  NormParams ln2;
  LinearParams route;  // C -> E: clean router logits
  LinearParams noise;  // C -> E: scale of the router noise, through softplus
  std::vector<ExpertParams> experts;
  std::vector<ExpertParams> shared;  // model.shared_experts, applied to every token
};

// Per-layer routing statistics gathered during forwards (metrics log and `moe eval`).
struct RoutingStats {
  std::vector<std::vector<int64_t>> tokens_per_expert;  // [layer][expert]: slots the router chose
  std::vector<int64_t> assigned, dropped;  // [layer]: routed slots, and those the capacity dropped
  std::vector<int64_t> tokens, forwards;   // [layer]
  std::vector<double> entropy_sum;  // [layer]: Σ over tokens of the router entropy (nats)
  std::vector<double> z_sum;        // [layer]: Σ over tokens of logsumexp(router logits)²
  std::vector<double> aux_sum;      // [layer]: Σ over forwards of Σ_i f_i P_i (aux loss / E)
  void reset(int64_t layers, int64_t experts);
  bool empty() const { return tokens_per_expert.empty(); }
  // Adds other's figures to these (same layers and experts): from the forwards of other, what
  // gathering them here after these would give.
  void add(const RoutingStats& other);
  // Per layer: {"load": fraction of slots per expert, "dropped_frac", "router_entropy",
  // "aux_loss", "z_loss", "max_violation" (max load / mean load - 1)}.
  nlohmann::json health() const;
};

// Key/value cache for incremental generation of one sequence, with the buffers Model::decode
// works in (sized by Model::new_cache for block_size positions, so decoding allocates nothing).
struct KVCache {
  int64_t len = 0;              // positions filled
  std::vector<float> k, v;      // [L, T, C] each, T = block_size
  struct Work {
    std::vector<float> x, normed, qkv, heads, sub;  // [n, C] residual stream, its norm, [n, 3C],
                                                    // attention by head, a sublayer's output [n, C]
    std::vector<float> mean, rstd, scores;          // [n], [n], [T]
    std::vector<float> clean, noise, logits, probs, gates;  // router: [n, E] (gates [n, K])
    std::vector<int32_t> index, offsets, token, gate_pos;   // top-k ids [n, K], groups per expert
    std::vector<int32_t> active;                            // the experts with slots [<= E]
    std::vector<float> rows, hidden, hidden3, expert_out;   // expert inputs [n*K, C], [n*K, F] x2, [n*K, C]
    std::vector<float> out;                                 // logits of the last position [V]
    // Every Linear weight transposed to [in, out], copied by new_cache(): one-row products then
    // run along contiguous outputs, each still summed over the inputs in order. A cache made
    // before the parameters change decodes with the old weights.
    std::vector<float> weights_t;
    std::vector<int64_t> weight_t_offset;  // per parameter id: offset in weights_t, or -1
  } work;
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

struct ForwardOptions {
  bool training = false;         // dropout on; router noise on when router.noisy
  Rng* dropout_rng = nullptr;    // required when training with dropout > 0
  Rng* noise_rng = nullptr;      // required when router noise applies
  // Router noise fixed from outside (tests against the PyTorch twin): per layer, [B*T, E].
  const std::vector<std::vector<float>>* fixed_noise = nullptr;
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
};

class Model {
 public:
  Model(const Config& cfg, int64_t vocab_size);

  const Config& config() const { return cfg_; }
  int64_t vocab_size() const { return V_; }
  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  // Parameters that one token actually uses (shared parts + top_k experts per layer).
  int64_t active_param_count() const;

  // The groups of parameters whose gradients complete together in the backward pass, by the
  // id of each one's first: the embeddings (id 0, complete last), each block, the head. The
  // forward's GradientsReady calls name these ids but the first.
  std::vector<int> grad_groups() const;

  // Fills every parameter per config.model.init from rng (registration order).
  void init(Rng& rng);

  // idx, targets: B*T ids; targets may be null (losses are then empty). logits [B, T, V].
  struct Output {
    Tensor logits;
    Tensor loss;       // mean cross-entropy: what is reported
    const float* token_losses = nullptr;  // [B*T] each position's cross-entropy (graph arena)
    Tensor objective;  // loss + the router's balancing losses: what training minimises
  };
  Output forward(Graph& g, const int32_t* idx, const int32_t* targets, int64_t B, int64_t T,
                 const ForwardOptions& opt);

  // Incremental decoding (src/model/decode.cpp): appends `n` tokens at positions cache.len..
  // (prefill when n > 1) and returns the logits of the last one [V], in the cache's buffers
  // (valid until its next decode). Evaluation mode; the router noise, when router.noisy and
  // noise_at_eval, comes from opt.noise_rng (the other options are Model::forward's only).
  // Runs the kernels of Model::forward's ops directly on the cache's buffers, without an
  // autograd graph, in the same order (the logits can differ from Model::forward's in the last
  // bits only where a one-row product sums in one pass what the GEMM sums in blocks).
  // cache.len + n must be <= block_size; the cache must come from new_cache().
  const float* decode(KVCache& cache, const int32_t* tokens, int64_t n, const ForwardOptions& opt);
  KVCache new_cache() const;

  // State that is not a parameter but is saved in checkpoints: the aux-loss-free balancing
  // biases ("blocks.{l}.moe.router.balance_bias", [E]) when router.bias_update_rate > 0.
  struct Buffer {
    std::string name;
    int64_t offset, size;  // within buffer_data()
  };
  std::vector<Buffer> buffers() const;
  float* buffer_data() { return balance_bias_.data(); }
  const float* buffer_data() const { return balance_bias_.data(); }
  // DeepSeek-V3's update after a training step: each expert's selection bias moves by
  // bias_update_rate toward balance (up when the last training forward gave it fewer slots
  // than the mean, down when more).
  void update_balance_bias();

  // Training over `ranks` processes (this one `rank`), each with its own share of the batch.
  // With expert_parallel, expert e of every layer belongs to rank e / (E / ranks) (E must be
  // a multiple of ranks): only that rank computes it, in distributed forwards.
  void set_parallel(int rank, int ranks, bool expert_parallel);
  bool expert_parallel() const { return expert_parallel_; }
  // Router noise numbers one forward over `rows` tokens draws from ForwardOptions::noise_rng
  // (E per token and layer when the router is noisy, else none), for placing a batch's noise
  // by the batch's index.
  int64_t noise_per_forward(int64_t rows, bool training) const;
  // The rank that computes expert e (0 without expert parallelism).
  int expert_owner(int64_t e) const;
  // Per parameter id: the routed expert it belongs to, or -1 (everything else, including
  // shared experts).
  std::vector<int> param_expert() const;

 private:
  // Decoding steps on cache.work: attention and MoE read `normed` and write `sub` ([n, C]).
  void decode_attention(const BlockParams& bp, int64_t layer, KVCache& cache, int64_t n) const;
  void decode_moe(const BlockParams& bp, int64_t layer, KVCache::Work& w, int64_t n, const ForwardOptions& opt) const;
  void decode_expert(const KVCache::Work& w, const ExpertParams& ep, const float* x, int64_t n, float* hidden,
                     float* hidden3, float* y) const;
  void decode_linear(const KVCache::Work& w, const LinearParams& lp, const float* x, int64_t n, float* y) const;
  // A forward's balancing losses, one scalar per layer each, in its graph's arena: forward
  // keeps nothing of a call in the model, so that threads can run forwards at once.
  struct LossList {
    Tensor* items = nullptr;
    int64_t size = 0;
    void push(const Tensor& t) { items[size++] = t; }
  };
  struct RouterLosses {
    LossList aux, z;
  };
  // Block l on x: x + attention(ln1 x), then that + moe_ffn(ln2 of it). Its output's gradient
  // is kept out of any gradient scope, in out_grad when given (Graph::KeepGradsIn).
  Tensor block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt, RouterLosses* losses,
               float* out_grad = nullptr);
  // Block l as ForwardOptions::recompute describes.
  Tensor recomputed_block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt, RouterLosses* losses);
  Tensor moe_ffn(Graph& g, const BlockParams& bp, const Tensor& x, int64_t layer,
                 const ForwardOptions& opt, RouterLosses* losses);
  Tensor expert_forward(Graph& g, const ExpertParams& ep, const Tensor& x, const ForwardOptions& opt);
  // Whether the router adds noise: router.noisy, in training or with router.noise_at_eval.
  bool router_noisy(bool training) const { return cfg_.router.noisy && (training || cfg_.router.noise_at_eval); }
  // fc1's activation for model.expert_ffn: relu, gelu, or silu (SwiGLU's gate).
  Activation expert_activation() const;
  Tensor remote_experts(Graph& g, const BlockParams& bp, const Tensor& xf, const int32_t* offsets,
                        const int32_t* token, const int64_t* counts, const ForwardOptions& opt);
  ExpertParams add_expert(const std::string& name);
  Tensor apply_linear(Graph& g, const LinearParams& lp, const Tensor& x, Regen* regen = nullptr) const;
  Tensor apply_norm(Graph& g, const NormParams& np, const Tensor& x, Regen* regen = nullptr) const;
  LinearParams add_linear(const std::string& name, int64_t in, int64_t out, bool bias);
  NormParams add_norm(const std::string& name, int64_t C);

  // How init() fills each parameter, recorded when it is registered (indexed by id).
  enum class Role { kEmbedding, kNormWeight, kNormBias, kLinearWeight, kLinearBias };
  struct RoleInfo {
    Role role;
    int64_t fan_in = 0, fan_out = 0;  // for Linear weights and biases
  };
  int add_param(const std::string& name, const Shape& shape, bool decay, RoleInfo role);

  Config cfg_;
  std::vector<RoleInfo> roles_;
  int64_t V_, C_, H_, D_, L_, E_, K_, F_, T_max_;
  ParamStore params_;
  int tok_emb_ = -1, pos_emb_ = -1;
  std::vector<BlockParams> blocks_;
  NormParams ln_f_;
  LinearParams lm_head_;
  std::vector<float> balance_bias_;  // [L, E] when router.bias_update_rate > 0, else empty
  std::vector<int64_t> last_load_;    // [L, E]: slots per expert in the last training forward
  int rank_ = 0, ranks_ = 1;
  bool expert_parallel_ = false;
  Rng unused_rng_;  // handed to dropout when it is off (p == 0 or not training): never drawn
};

}  // namespace moe
