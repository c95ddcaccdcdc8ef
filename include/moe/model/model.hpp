// Model: the makeMoE transformer, composed of the modules in moe/nn/: token + position
// embeddings (or RoPE in the attention), pre-norm blocks of causal multi-head attention and a
// sparse MoE feed-forward (router, experts) or, in the blocks model.moe_every / dense_first leave
// dense, one dense feed-forward, a final norm (LayerNorm or RMSNorm) and the LM head (its weight
// tied to the token embedding with model.tie_embeddings). Parameters live in one ParamStore under
// PyTorch-style dotted names (see scripts/torch_twin.py for the twin with the same names).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/io/config.hpp"
#include "moe/nn/attention.hpp"
#include "moe/nn/embedding.hpp"
#include "moe/nn/forward.hpp"
#include "moe/nn/moe.hpp"
#include "moe/nn/norm.hpp"
#include "moe/tensor/graph.hpp"
#include "moe/tensor/params.hpp"
#include "moe/tensor/rng.hpp"

namespace moe {

// One transformer block: x + attention(ln1 x), then that + ffn(ln2 of it), where the
// feed-forward is the MoE layer in an MoE block (Config::moe_block) and one dense Expert
// ("blocks.{l}.ffn.", model.dense_hidden wide, no router) in the others.
struct Block {
  Norm ln1;
  Attention attn;
  Norm ln2;
  bool sparse = true;  // an MoE block: moe is used, ffn is empty
  MoELayer moe;
  Expert ffn;
};

class Model {
 public:
  Model(const Config& cfg, int64_t vocab_size);

  const Config& config() const { return cfg_; }
  int64_t vocab_size() const { return V_; }
  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  // Parameters that one token actually uses (shared parts + top_k experts per MoE layer).
  int64_t active_param_count() const;
  // Per block, its routed experts: router.num_experts in an MoE block, 0 in a dense one (the
  // layout of RoutingStats).
  std::vector<int64_t> experts_per_layer() const;

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
  // The cache must come from new_cache(). With learned positions cache.len + n must be
  // <= block_size; with rope n must be <= block_size and positions go on past it, each one
  // attending to the last block_size (the cache rolls: see KVCache).
  const float* decode(KVCache& cache, const int32_t* tokens, int64_t n, const ForwardOptions& opt);
  KVCache new_cache() const;
  // Lays the weights of every Linear out for decoding ([in, out], Linear::to_decode_layout; not
  // the head's when it is tied to the embedding): decode gives the same bits, faster (a
  // token's one-row products stream each weight in order; a relu expert's second product
  // reads only the rows its nonzero hidden units multiply). For a model that only decodes
  // from then on (moe generate, moe serve): forward refuses it, and its checkpoint would hold
  // the weights transposed.
  void use_decode_layout();
  bool decode_layout() const { return decode_layout_; }

  // State that is not a parameter but is saved in checkpoints: the aux-loss-free balancing
  // biases ("blocks.{l}.moe.router.balance_bias", [E], one per MoE block) when
  // router.bias_update_rate > 0; the relu gating's L1 coefficient ("router.l1_coef", [1]);
  // expert choice's causal thresholds ("blocks.{l}.moe.router.threshold", [E] per MoE block, -1
  // before the first training step).
  struct Buffer {
    std::string name;
    int64_t offset, size;  // within buffer_data()
  };
  std::vector<Buffer> buffers() const;
  float* buffer_data() { return buffer_.data(); }
  const float* buffer_data() const { return buffer_.data(); }
  // DeepSeek-V3's update after a training step: each expert's selection bias moves by
  // bias_update_rate toward balance (up when the last training forward gave it fewer slots
  // than the mean, down when more).
  void update_balance_bias();
  // The router state's updates after a training step, from its last training forward (the
  // global batch's figures, so the same on every process): the balancing bias; the relu
  // gating's L1 coefficient λ ← λ · relu_l1_growth^sign(target - sparsity), target = 1 - top_k / E,
  // sparsity the fraction of zero gates over the layers; expert choice's thresholds
  // τ ← threshold_ema · τ + (1 - threshold_ema) · (the C-th score), the first one taken as it is.
  void update_router_state();
  // The relu gating's L1 coefficient (0 for other gatings).
  float l1_coef() const { return l1_at_ < 0 ? 0.f : buffer_[size_t(l1_at_)]; }
  // Experts per token the relu gating ran in the last training forward, mean over the layers.
  double last_experts_per_token() const;

  // Training over `ranks` processes (this one `rank`), each with its own share of the batch.
  // With expert_parallel, expert e of every layer belongs to rank e / (E / ranks) (E must be
  // a multiple of ranks): only that rank computes it, in distributed forwards.
  void set_parallel(int rank, int ranks, bool expert_parallel);
  bool expert_parallel() const { return expert_parallel_; }
  // Numbers one forward over `rows` tokens draws from ForwardOptions::noise_rng: the sum of
  // each layer's Router::noise_draws, for placing a batch's noise by the batch's index.
  int64_t noise_per_forward(int64_t rows, bool training) const;
  // Whether a forward with these options runs its linears' products in bf16: training
  // forwards (and their backward passes) under training.precision "bf16"; evaluation and
  // generation stay fp32. The router's products stay fp32 always (Router::forward).
  bool bf16_products(const ForwardOptions& opt) const;
  // The rank that computes expert e (0 without expert parallelism).
  int expert_owner(int64_t e) const;
  // Per parameter id: the routed expert it belongs to, or -1 (everything else, including
  // shared experts).
  std::vector<int> param_expert() const;

 private:
  // Block l on x: x + attention(ln1 x), then that + moe(ln2 of it). Its output's gradient is
  // kept out of any gradient scope, in out_grad when given (Graph::KeepGradsIn).
  Tensor block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt, RouterLosses* losses,
               float* out_grad = nullptr);
  // Block l as ForwardOptions::recompute describes.
  Tensor recomputed_block(Graph& g, int64_t l, const Tensor& x, const ForwardOptions& opt, RouterLosses* losses);
  // What layer l's MoE reads and writes of the model's state (an MoE block's).
  MoEContext moe_context(int64_t l);

  Config cfg_;
  std::vector<ParamRoleInfo> roles_;  // how init() fills each parameter, by id
  int64_t V_, C_, L_, E_, T_max_;
  ParamStore params_;
  Embeddings emb_;
  std::vector<Block> blocks_;
  Norm ln_f_;
  Linear lm_head_;
  std::vector<int64_t> moe_index_;    // [L]: block l's place among the MoE blocks, -1 for a dense block
  int64_t L_moe_ = 0;                 // MoE blocks
  // The buffers, per MoE block: balancing bias [L_moe, E], l1 coefficient [1], thresholds [L_moe, E].
  std::vector<float> buffer_;
  // Offsets in buffer_ (-1: absent; offsets, not pointers, so that a copied model is whole):
  int64_t bias_at_ = -1;        // [L_moe, E] the balancing bias, router.bias_update_rate > 0
  int64_t l1_at_ = -1;          // [1] router.gating "relu"
  int64_t thresholds_at_ = -1;  // [L_moe, E] router.gating "expert_choice"
  // Routed slots and tokens of the last training forward, summed over the MoE blocks.
  std::pair<int64_t, int64_t> last_slots_and_tokens() const;
  float* buffer_at(int64_t at) { return at < 0 ? nullptr : buffer_.data() + at; }
  const float* buffer_at(int64_t at) const { return at < 0 ? nullptr : buffer_.data() + at; }
  std::vector<int64_t> last_load_;    // [L_moe, E]: slots per expert in the last training forward
  std::vector<float> last_kth_;       // [L_moe, E]: expert choice's C-th scores in the last training forward
  std::vector<int64_t> last_tokens_;  // [L_moe]: tokens of the last training forward's global batch
  int rank_ = 0, ranks_ = 1;
  bool expert_parallel_ = false;
  bool decode_layout_ = false;  // use_decode_layout
  Rng unused_rng_;  // handed to dropout when it is off (p == 0 or not training): never drawn
};

}  // namespace moe
