// Every model and router option against the PyTorch twin (scripts/torch_twin.py fixtures):
// one fixture per variant, compared at the tolerances of the makeMoE baseline's golden test
// in test_model.cpp, and moe's init of every model.init kind, which the twin reproduces to
// the bit.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "moe/io/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"

#include "fixture_util.hpp"

using namespace moe;
using moe_test::read_f32;
using moe_test::read_i32;

namespace {

std::string fixture_path(const std::string& name) {
  return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/twin_" + name + ".safetensors";
}

double max_abs_diff(const float* a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < b.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

// |a - b| <= 1e-5 |b|: the baseline's tolerance for a loss.
bool close_loss(float a, float b) { return std::fabs(a - b) <= 1e-5 * std::fabs(b); }

// The largest difference over every parameter between the store's values (or gradients) and
// the fixture's tensors prefix + name; each parameter is checked against `tol` on its own.
double check_params(const SafeTensorsFile& f, const ParamStore& ps, const float* base, const std::string& prefix,
                    double tol) {
  double worst = 0;
  for (const ParamInfo& p : ps.infos()) {
    const double d = max_abs_diff(base + p.offset, read_f32(f, prefix + p.name, p.shape));
    worst = std::max(worst, d);
    INFO(prefix << p.name << " max abs diff " << d);
    CHECK(d < tol);
  }
  return worst;
}

// The buffers (balancing biases, relu's L1 coefficient) equal the fixture's tensors prefix + name
// bit for bit: they are sums of ±bias_update_rate or products of relu_l1_growth, which the same
// choices make the same. Expert choice's thresholds are EMAs of scores: within 1e-6.
void check_buffers(const SafeTensorsFile& f, const Model& model, const std::string& prefix) {
  for (const Model::Buffer& b : model.buffers()) {
    const std::vector<float> ref = read_f32(f, prefix + b.name, {b.size});
    if (b.name.find("threshold") != std::string::npos) {
      INFO(prefix << b.name << " max abs diff " << max_abs_diff(model.buffer_data() + b.offset, ref));
      CHECK(max_abs_diff(model.buffer_data() + b.offset, ref) < 1e-6);
      continue;
    }
    INFO(prefix << b.name << " max abs diff " << max_abs_diff(model.buffer_data() + b.offset, ref));
    CHECK(std::memcmp(model.buffer_data() + b.offset, ref.data(), sizeof(float) * ref.size()) == 0);
  }
}

// The golden comparison of one variant: the top-k choices and capacity drops, logits, loss and
// objective of a forward (training or evaluation, as the fixture says), every gradient of the
// objective, then AdamW steps with the balancing-bias update after each: their losses and
// objectives, the final weights and biases.
// With `kernel`, the model's attention runs on that kernel instead of the fixture config's.
void check_variant(const std::string& variant, AttentionKernel kernel = AttentionKernel::kExact) {
  const std::string path = fixture_path(variant);
  const SafeTensorsFile f = load_safetensors(path);
  Config cfg = parse_config(f.metadata().at("config"), path);
  cfg.model.attention_kernel = kernel;
  const int64_t V = std::stoll(f.metadata().at("vocab_size")), B = std::stoll(f.metadata().at("batch_size"));
  const int64_t T = cfg.model.block_size, L = cfg.model.n_layer, E = cfg.router.num_experts,
                K = slots_per_token(cfg.router);
  Model model(cfg, V);
  ParamStore& ps = model.params();
  for (const ParamInfo& p : ps.infos()) f.copy_f32("param." + p.name, p.shape, ps.data() + p.offset);
  int64_t twin_params = 0;  // the same parameters, none more (a tied head has no weight of its own)
  for (const std::string& name : f.names()) twin_params += name.rfind("param.", 0) == 0;
  REQUIRE(twin_params == ps.count());
  for (const Model::Buffer& b : model.buffers()) f.copy_f32("buffer." + b.name, {b.size}, model.buffer_data() + b.offset);
  const std::vector<int32_t> idx = read_i32(f, "idx", B * T), targets = read_i32(f, "targets", B * T);
  // Per block, the MoE blocks' only (a dense block has no router; its entry stays empty).
  std::vector<std::vector<float>> noise(static_cast<size_t>(L));
  std::vector<std::vector<float>> jitter(static_cast<size_t>(L));  // the router's input factors (router.jitter)
  bool fixed_noise = false, fixed_jitter = false;
  for (int64_t l = 0; l < L; ++l) {
    const std::string n = "noise." + std::to_string(l), j = "jitter." + std::to_string(l);
    INFO("block " << l << (cfg.moe_block(l) ? " (MoE)" : " (dense)"));
    CHECK((f.has(n) || f.has(j)) <= cfg.moe_block(l));
    if (f.has(n)) noise[size_t(l)] = read_f32(f, n, {B * T, E}), fixed_noise = true;
    if (f.has(j)) jitter[size_t(l)] = read_f32(f, j, {B * T, cfg.model.n_embed}), fixed_jitter = true;
  }

  // Or the noise moe draws, which the twin drew the same way (its Philox and Box-Muller).
  const auto& meta = f.metadata();
  Rng noise_rng(meta.count("noise_seed") ? std::stoull(meta.at("noise_seed")) : 0,
                meta.count("noise_stream") ? std::stoull(meta.at("noise_stream")) : 0);

  ForwardOptions fo;
  fo.training = meta.at("training") == "1";  // dropout is 0: the router's rules only
  if (fixed_noise) fo.fixed_noise = &noise;
  if (fixed_jitter) fo.fixed_jitter = &jitter;
  if (meta.count("noise_seed")) fo.noise_rng = &noise_rng;
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(L));
  fo.chosen = &chosen;
  RoutingStats stats;
  fo.stats = &stats;
  Graph g;
  const Model::Output out = model.forward(g, idx.data(), targets.data(), B, T, fo);
  for (int64_t l = 0; l < L; ++l) {
    const std::string layer = "router." + std::to_string(l);
    REQUIRE(f.has(layer + ".topk") == cfg.moe_block(l));
    if (!cfg.moe_block(l)) {
      CHECK(chosen[size_t(l)].empty());
      CHECK(stats.tokens_per_expert[size_t(l)].empty());
      continue;
    }
    INFO("layer " << l << " top-k choices");
    REQUIRE(chosen[size_t(l)] == read_i32(f, layer + ".topk", B * T * K));
    const int64_t dropped = f.has(layer + ".dropped") ? read_i32(f, layer + ".dropped", 1)[0] : 0;
    INFO("layer " << l << " slots the capacity dropped");
    REQUIRE(stats.dropped[size_t(l)] == dropped);
  }
  const std::vector<float> ref_logits = read_f32(f, "logits", {B, T, V});
  const double dlogits = max_abs_diff(out.logits.data, ref_logits);
  // Float rounding is relative: 1e-5 up to logits of 10, 1e-6 of the largest logit beyond.
  double max_logit = 0;
  for (float x : ref_logits) max_logit = std::max(max_logit, double(std::fabs(x)));
  const double logits_tol = 1e-6 * std::max(10.0, max_logit);
  const float ref_loss = read_f32(f, "loss", {1})[0];
  const float ref_objective = f.has("objective") ? read_f32(f, "objective", {1})[0] : ref_loss;
  INFO("logits max abs diff " << dlogits << " (tolerance " << logits_tol << "); loss " << out.loss.data[0] << " vs " << ref_loss << "; objective "
                              << out.objective.data[0] << " vs " << ref_objective);
  CHECK(dlogits < logits_tol);
  CHECK(close_loss(out.loss.data[0], ref_loss));
  CHECK(close_loss(out.objective.data[0], ref_objective));

  g.backward(out.objective);
  const double worst_grad = check_params(f, ps, ps.grad(), "grad.", 1e-4);

  OptimizerConfig oc = cfg.optimizer;
  oc.lr = std::stod(f.metadata().at("adamw_lr"));
  AdamW adamw(oc, ps);
  const int64_t steps = std::stoll(f.metadata().at("adamw_steps"));
  const std::vector<float> ref_losses = read_f32(f, "adamw.losses", {steps});
  const std::vector<float> ref_objectives = f.has("adamw.objectives") ? read_f32(f, "adamw.objectives", {steps}) : ref_losses;
  fo.stats = nullptr;
  for (int64_t s = 0; s < steps; ++s) {
    g.clear();
    ps.zero_grad();
    const Model::Output o = model.forward(g, idx.data(), targets.data(), B, T, fo);
    INFO("AdamW step " << s << ": loss " << o.loss.data[0] << " vs " << ref_losses[size_t(s)] << ", objective "
                       << o.objective.data[0] << " vs " << ref_objectives[size_t(s)]);
    CHECK(close_loss(o.loss.data[0], ref_losses[size_t(s)]));
    CHECK(close_loss(o.objective.data[0], ref_objectives[size_t(s)]));
    g.backward(o.objective);
    adamw.step(ps, float(oc.lr));
    model.update_router_state();
  }
  const double worst_final = check_params(f, ps, ps.data(), "final.", 1e-4);
  check_buffers(f, model, "final_buffer.");
  WARN("golden " << variant << ": logits max abs diff " << dlogits << ", worst gradient max abs diff " << worst_grad
                 << ", worst final weight max abs diff " << worst_final);
}

}  // namespace

TEST_CASE("Every model and router option matches the PyTorch twin", "[model][golden][twin]") {
  // tests/fixtures/twin_<variant>.safetensors; scripts/torch_twin.py's VARIANTS says what each
  // changes from the tiny base.
  const std::string variant =
      GENERATE(as<std::string>{}, "gelu", "swiglu", "shared1", "shared2_swiglu", "softmax_topk", "softmax_topk_renorm",
               "capacity", "capacity_eval", "capacity_not_at_eval", "aux_loss", "z_loss", "balance_bias", "attn_head",
               "noiseless", "noise_at_eval", "jitter", "sigmoid_topk", "sigmoid_groups", "all", "rmsnorm", "rope", "gqa",
               "mqa", "qk_norm", "modern", "moe_every2",
               "dense_first1", "all_dense", "tied", "layout_all", "modern_layout", "topk_dense",
               "relu", "expert_choice", "expert_choice_eval");
  INFO("variant " << variant << " (" << fixture_path(variant) << ")");
  check_variant(variant);
}

TEST_CASE("The tiled attention kernel matches the PyTorch twin too", "[model][golden][twin][tiled]") {
  // model.attention_kernel = "tiled" on fixtures made with PyTorch's attention (the same maths):
  // learned positions with the head-size scale, grouped-query and multi-query heads, rope with
  // QK-norm, and every option at once.
  const std::string variant = GENERATE(as<std::string>{}, "attn_head", "gqa", "mqa", "modern", "all");
  INFO("variant " << variant << " with attention_kernel tiled");
  check_variant(variant, AttentionKernel::kTiled);
}

TEST_CASE("model.init draws what the twin's reproduction of it draws, bit for bit", "[model][golden][twin][init]") {
  const std::string path = fixture_path("init");
  const SafeTensorsFile f = load_safetensors(path);
  const int64_t V = std::stoll(f.metadata().at("vocab_size"));
  const uint64_t seed = std::stoull(f.metadata().at("init_seed")), stream = std::stoull(f.metadata().at("init_stream"));
  for (const std::string kind : {"kaiming_normal", "xavier", "normal"}) {
    INFO("model.init " << kind);
    const Config cfg = parse_config(f.metadata().at("config." + kind), path);
    Model model(cfg, V);
    Rng rng(seed, stream);
    model.init(rng);
    const ParamStore& ps = model.params();
    for (const ParamInfo& p : ps.infos()) {
      const std::vector<float> ref = read_f32(f, "init." + kind + "." + p.name, p.shape);
      int64_t differ = 0;
      for (size_t i = 0; i < ref.size(); ++i)
        differ += std::memcmp(ps.data() + p.offset + i, &ref[i], sizeof(float)) != 0;
      INFO(p.name << ": " << differ << " of " << ref.size() << " differ, max abs diff "
                  << max_abs_diff(ps.data() + p.offset, ref));
      CHECK(differ == 0);
    }
    CHECK(rng.state().counter == std::stoull(f.metadata().at("draws." + kind)));  // nothing else drawn
  }
}
