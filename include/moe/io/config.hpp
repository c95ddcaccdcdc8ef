// Config: the typed run configuration, loaded from JSON, validated, printed at start and
// stored in every checkpoint. Every field has a default (the makeMoE reference values but
// for attn_scale, whose default is the standard head_size^-0.5).
//
// All fields are declared once, in the table in src/io/config.cpp; loading, unknown-key
// detection, type checks, range checks and serialisation all come from that table.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <stdexcept>
#include <string>

namespace moe {

// Option values are enums from the moment the config loads: a switch over one makes the compiler
// name every site a new value must reach. EnumNames<E>::names holds the config spelling of each
// value, in declaration order: the one table that loading, saving and error messages read.
enum class ExpertFfn { kRelu, kGelu, kSwiglu };
enum class AttnScale { kHead, kEmbed };
enum class InitKind { kKaimingNormal, kXavier, kNormal };
enum class Gating { kTopkSoftmax, kSoftmaxTopk, kSigmoidTopk, kRelu, kExpertChoice };
enum class LrSchedule { kConstant, kCosine };
enum class NormKind { kLayerNorm, kRmsNorm };
enum class PositionKind { kLearned, kRope };
enum class AttentionKernel { kExact, kTiled };
enum class Precision { kFp32, kBf16 };

template <class E>
struct EnumNames;
template <>
struct EnumNames<ExpertFfn> {
  static constexpr std::array<const char*, 3> names{"relu", "gelu", "swiglu"};
};
template <>
struct EnumNames<AttnScale> {
  static constexpr std::array<const char*, 2> names{"head", "embed"};
};
template <>
struct EnumNames<InitKind> {
  static constexpr std::array<const char*, 3> names{"kaiming_normal", "xavier", "normal"};
};
template <>
struct EnumNames<Gating> {
  static constexpr std::array<const char*, 5> names{"topk_softmax", "softmax_topk", "sigmoid_topk", "relu",
                                                    "expert_choice"};
};
template <>
struct EnumNames<LrSchedule> {
  static constexpr std::array<const char*, 2> names{"constant", "cosine"};
};
template <>
struct EnumNames<NormKind> {
  static constexpr std::array<const char*, 2> names{"layernorm", "rmsnorm"};
};
template <>
struct EnumNames<PositionKind> {
  static constexpr std::array<const char*, 2> names{"learned", "rope"};
};
template <>
struct EnumNames<AttentionKernel> {
  static constexpr std::array<const char*, 2> names{"exact", "tiled"};
};
template <>
struct EnumNames<Precision> {
  static constexpr std::array<const char*, 2> names{"fp32", "bf16"};
};
template <class E>
const char* name_of(E value) {
  return EnumNames<E>::names[size_t(value)];
}

struct DataConfig {
  std::string path = "data/tinyshakespeare.txt";
  double train_fraction = 0.9;
};

struct ModelConfig {
  int64_t block_size = 32;
  int64_t n_embed = 128;
  int64_t n_head = 8;
  int64_t n_layer = 8;
  double dropout = 0.1;
  int64_t expert_hidden = 0;          // 0: 4 * n_embed
  ExpertFfn expert_ffn = ExpertFfn::kRelu;  // relu | gelu: fc2(act(fc1 x)); swiglu: fc2(silu(fc1 x) * fc3 x)
  int64_t shared_experts = 0;         // experts every token passes through, added to the routed output
  AttnScale attn_scale = AttnScale::kHead;  // head: head_size^-0.5; embed: n_embed^-0.5 (makeMoE)
  InitKind init = InitKind::kKaimingNormal;
  double init_std = 0.02;             // for "normal" (and embeddings outside kaiming_normal)
  NormKind norm = NormKind::kLayerNorm;  // every norm of the model (ln1, ln2, ln_f): LayerNorm or RMSNorm
  PositionKind position = PositionKind::kLearned;  // learned: a pos_emb table; rope: q and k rotated
  double rope_theta = 10000;          // rope: the base of the rotation frequencies
  int64_t n_kv_head = 0;              // key/value heads (grouped-query attention); 0: n_head
  bool qk_norm = false;               // RMSNorm on each head's query and key (before rope)
  // exact: the fused kernel keeping the T×T weights for the backward; tiled: blocks of 16 queries
  // and keys with an online softmax, only each row's log-sum-exp kept (the same results within
  // float rounding; faster and smaller from block_size 256 on)
  AttentionKernel attention_kernel = AttentionKernel::kExact;
  // Which blocks are MoE (DeepSeek-V2/V3's first_k_dense_replace and moe_layer_freq, nanoMoE's
  // stride): block i when i >= dense_first and i % moe_every == 0; the others have one dense
  // feed-forward (expert_ffn, dense_hidden wide). dense_first = n_layer: an all-dense model.
  int64_t moe_every = 1;
  int64_t dense_first = 0;
  int64_t dense_hidden = 0;           // a dense block's feed-forward width; 0: 4 * n_embed
  bool tie_embeddings = false;        // the LM head's weight is the token embedding matrix
};

struct RouterConfig {
  int64_t num_experts = 8;
  int64_t top_k = 2;
  bool noisy = true;           // noisy top-k gating (in training)
  bool noise_at_eval = false;  // makeMoE also adds the noise at evaluation and generation
  // "topk_softmax": softmax over the k kept logits (makeMoE); "softmax_topk": softmax over all
  // experts, then the k largest probabilities (Mixtral, Megablocks), rescaled to sum 1 if renormalize;
  // "sigmoid_topk" (DeepSeek-V3): s = sigmoid(logits), the k largest, weights s / Σ s · route_scale;
  // "relu" (ReMoE): weights ReLU(logits), a variable number of experts per token, held at top_k on
  // average by an adaptive L1 penalty; "expert_choice" (Zhou et al.): each expert takes the
  // capacity_factor · tokens · top_k / E tokens of the batch of best softmax score.
  Gating gating = Gating::kTopkSoftmax;
  bool renormalize = false;
  double aux_loss_coef = 0;      // Switch load-balancing loss E * sum_i f_i P_i, averaged over layers
  double z_loss_coef = 0;        // ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2
  double capacity_factor = 0;    // capacity = ceil(factor * k * tokens / E) per expert; 0: dropless
  bool capacity_at_eval = false; // apply the capacity outside training too
  double bias_update_rate = 0;   // DeepSeek-V3 aux-loss-free balancing step gamma; 0: off
  double route_scale = 1;        // sigmoid_topk: the weights' scale
  int64_t n_groups = 1;          // group-limited routing: experts in n_groups groups of E / n_groups
  int64_t topk_groups = 1;       // ... and only the topk_groups groups of best score (the sum of a
                                 // group's two best selection scores) can be chosen
  double jitter = 0;             // Megablocks: in training, the router's input times U(1 - jitter, 1 + jitter); 0: off
  double relu_l1_init = 1e-8;    // relu: the L1 penalty's first coefficient λ (ReMoE's λ0)
  double relu_l1_growth = 1.2;   // relu: λ ← λ · growth^sign(target sparsity - sparsity) after each step (ReMoE's α)
  double threshold_ema = 0.99;   // expert_choice: decay of each expert's causal threshold (EMA of its C-th score)
  int64_t top_k_anneal_steps = 0;  // dense-to-sparse: k from num_experts down to top_k, linearly over these steps; 0: off
};

// Slots one token can take: num_experts for the gatings whose count varies (relu,
// expert_choice), else top_k.
int64_t slots_per_token(const RouterConfig& r);
// The k of training step `step` (router.top_k_anneal_steps): num_experts at step 0, down to
// top_k linearly, rounded to the nearest integer, top_k from step top_k_anneal_steps on.
int64_t top_k_at(const RouterConfig& r, int64_t step);

// Slots each expert keeps when `rows` tokens are routed (capacity_factor > 0):
// ceil(capacity_factor · top_k · rows / num_experts).
int64_t expert_capacity(const RouterConfig& r, int64_t rows);

struct OptimizerConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  bool exempt_no_decay = false;  // true: no decay on biases, LayerNorm and embeddings
  double grad_clip = 0;          // max global gradient norm; 0: off
  LrSchedule schedule = LrSchedule::kConstant;
  int64_t warmup_steps = 0;
  double min_lr = 0;  // floor of the cosine schedule
};

struct TrainingConfig {
  int64_t batch_size = 16;
  int64_t max_steps = 5000;
  int64_t seed = 1337;
  int64_t threads = 0;  // 0: OpenMP's default
  // Keep only each block's output in the forward and run the block again in the backward
  // pass (same numbers, about a third more work): activations of one block in memory.
  bool recompute = false;
  // Keep every activation of a block for its backward pass instead of making the ones from the
  // block's input to the MoE's input (norms, qkv, attention output, proj, the residual sum) and
  // the experts' gathered input rows again there: the same numbers, fewer products, more
  // memory. Not with recompute.
  bool keep_activations = false;
  // Wall seconds a run may take, from its start (evaluations included); 0: no limit. The step
  // that passes it is the last: then an evaluation and last.safetensors, as at max_steps
  // (which still sets the learning-rate schedule). For studies at equal wall time.
  double time_limit = 0;
  // The training step's matrix products (linears, experts, head; not the router's or
  // attention's own products): fp32, or bf16 inputs with fp32 sums (moe/kernels/gemm_bf16.hpp).
  // Weights, optimizer, norms, softmax and loss stay fp32; evaluation and generation run fp32.
  Precision precision = Precision::kFp32;
  // A running average of the weights after every step from step `average_start` on (0: none):
  // each step moves it by max(1 - average_decay, 1/(n+1)) of the way to the weights, n the
  // weights averaged so far, so decay 1 is their plain mean and a lower decay an exponential
  // moving average that starts as the mean. Evaluations and the checkpoints' weights are the
  // average's; training goes on from its own weights (kept in checkpoints for --resume).
  int64_t average_start = 0;
  double average_decay = 1.0;
};

struct LoggingConfig {
  int64_t log_interval = 10;
  int64_t eval_interval = 100;
  int64_t eval_iters = 400;
  int64_t checkpoint_interval = 1000;  // 0: only best and last
  std::string out_dir = "runs/default";
};

struct Config {
  DataConfig data;
  ModelConfig model;
  RouterConfig router;
  OptimizerConfig optimizer;
  TrainingConfig training;
  LoggingConfig logging;

  int64_t head_size() const { return model.n_embed / model.n_head; }
  int64_t kv_heads() const { return model.n_kv_head > 0 ? model.n_kv_head : model.n_head; }
  int64_t expert_hidden_size() const { return model.expert_hidden > 0 ? model.expert_hidden : 4 * model.n_embed; }
  int64_t dense_hidden_size() const { return model.dense_hidden > 0 ? model.dense_hidden : 4 * model.n_embed; }
  // Whether block l (0-based) is an MoE block: l >= model.dense_first and l % model.moe_every == 0.
  bool moe_block(int64_t l) const { return l >= model.dense_first && l % model.moe_every == 0; }
  int64_t moe_blocks() const;  // how many of the n_layer blocks are
  float attention_scale() const;
  // Weight matrices of one expert: fc1 and fc2, and SwiGLU's fc3.
  int64_t expert_matrices() const;
  // Slots each expert keeps when `rows` tokens are routed (router.capacity_factor > 0):
  // ceil(capacity_factor · top_k · rows / num_experts).
  int64_t expert_capacity(int64_t rows) const;
};

// Every config problem: the message names the source, the dotted field, the value and what
// is allowed.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

Config load_config(const std::string& path);
// The text of a config file; `origin` (the path) names it in every error message.
Config parse_config(const std::string& text, const std::string& origin);
Config config_from_json(const nlohmann::json& j, const std::string& source_name);
nlohmann::json config_to_json(const Config& c);
// Throws ConfigError on the first impossible value.
void validate(const Config& c, const std::string& source_name = "config");

}  // namespace moe
