// The model end to end: golden comparison with the PyTorch twin, KV-cache decoding,
// generation determinism, checkpoint round trip and exact resume.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/generate/generator.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/train/checkpoint.hpp"
#include "moe/train/trainer.hpp"

#include "fixture_util.hpp"
#include "io_test_util.hpp"

using namespace moe;
using moe_test::read_f32;
using moe_test::read_i32;
namespace fs = std::filesystem;

namespace {

double max_abs_diff(const float* a, const float* b, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

// Parameters equal bit for bit (the alignment padding between them is not compared).
bool same_params(const Model& a, const Model& b) {
  for (const ParamInfo& p : a.params().infos())
    if (std::memcmp(a.params().data() + p.offset, b.params().data() + p.offset, sizeof(float) * size_t(p.shape.numel())) != 0)
      return false;
  return true;
}

// The weights of two checkpoints are equal bit for bit.
bool same_checkpoint_weights(const fs::path& a_path, const fs::path& b_path) {
  CheckpointHeader h = read_checkpoint_header(a_path.string());
  Model a(h.config, int64_t(h.vocab.size())), b(h.config, int64_t(h.vocab.size()));
  load_checkpoint_tensors(a_path.string(), a, nullptr);
  load_checkpoint_tensors(b_path.string(), b, nullptr);
  for (const Model::Buffer& buf : a.buffers())  // the balancing biases too
    if (std::memcmp(a.buffer_data() + buf.offset, b.buffer_data() + buf.offset, sizeof(float) * size_t(buf.size)) != 0)
      return false;
  return same_params(a, b);
}

// Trains a into dir/"a" and b into dir/"b" (quietly) and requires the same last training loss
// and the same weights, bit for bit.
void require_same_training(const Config& a, const Config& b, const fs::path& dir) {
  TrainOptions opt;
  opt.quiet = true;
  opt.out_dir = (dir / "a").string();
  const TrainResult ra = train(a, opt);
  opt.out_dir = (dir / "b").string();
  const TrainResult rb = train(b, opt);
  REQUIRE(ra.last_train_loss == rb.last_train_loss);
  REQUIRE(same_checkpoint_weights(dir / "a" / "last.safetensors", dir / "b" / "last.safetensors"));
}

Config tiny_config() {
  nlohmann::json j = {
      {"data", {{"path", std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt"}}},
      {"model", {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 2}, {"dropout", 0.1}}},
      {"router", {{"num_experts", 4}, {"top_k", 2}}},
      {"optimizer", {{"lr", 1e-2}}},
      {"training", {{"batch_size", 4}, {"max_steps", 20}, {"seed", 7}}},
      {"logging", {{"log_interval", 5}, {"eval_interval", 10}, {"eval_iters", 2}, {"checkpoint_interval", 0}}}};
  return config_from_json(j, "tiny_config");
}

// tiny_config with every MoE option beyond makeMoE switched on.
Config all_features_config() {
  Config c = tiny_config();
  c.model.expert_ffn = ExpertFfn::kSwiglu;
  c.model.shared_experts = 1;
  c.router.gating = Gating::kSoftmaxTopk;
  c.router.renormalize = true;
  c.router.aux_loss_coef = 0.01;
  c.router.z_loss_coef = 1e-3;
  c.router.capacity_factor = 1.0;
  c.router.bias_update_rate = 1e-3;
  return c;
}

// A config with dense blocks among the MoE ones and a tied head: of n_layer blocks, the even
// ones MoE (model.moe_every 2), the others a dense feed-forward of model.dense_hidden 24.
Config layout_config(Config c, int64_t n_layer) {
  c.model.n_layer = n_layer;
  c.model.moe_every = 2;
  c.model.dense_hidden = 24;
  c.model.tie_embeddings = true;
  validate(c);
  return c;
}

// One training forward and backward (dropout and router noise on) of all_features_config()
// with 4 layers on a fixed batch, in g with the options given: the objective and every
// parameter gradient.
struct GradRun {
  float objective = 0;
  std::vector<float> grads;
};
// With layout, layout_config's blocks (MoE, dense, MoE, dense) and tied head.
// With bf16, under training.precision "bf16".
GradRun training_gradients(Graph& g, ForwardOptions fo, ExpertFfn expert_ffn = ExpertFfn::kSwiglu, bool layout = false,
                           bool bf16 = false) {
  Config cfg = all_features_config();
  if (bf16) cfg.training.precision = Precision::kBf16;
  cfg.model.n_layer = 4;
  cfg.model.expert_ffn = expert_ffn;
  if (layout) cfg = layout_config(cfg, 4);
  const int64_t B = 4, T = 8;
  std::vector<int32_t> x(size_t(B * T)), y(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) x[size_t(i)] = int32_t(i * 7 % 13), y[size_t(i)] = int32_t(i * 5 % 13);
  Model model(cfg, 13);
  Rng init(3, 1), drop(5, 2), noise(5, 3);
  model.init(init);
  fo.training = true;
  fo.dropout_rng = &drop;
  fo.noise_rng = &noise;
  const Model::Output o = model.forward(g, x.data(), y.data(), B, T, fo);
  g.backward(o.objective);
  const ParamStore& ps = model.params();
  return {o.objective.data[0], std::vector<float>(ps.grad(), ps.grad() + ps.numel())};
}

}  // namespace

TEST_CASE("Model matches the PyTorch twin: logits, loss, gradients, 5 AdamW steps", "[model][golden]") {
  const std::string path = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/twin_tiny.safetensors";
  SafeTensorsFile f = load_safetensors(path);
  Config cfg = config_from_json(nlohmann::json::parse(f.metadata().at("config")), path);
  const int64_t V = std::stoll(f.metadata().at("vocab_size"));
  const int64_t B = std::stoll(f.metadata().at("batch_size"));
  const int64_t T = cfg.model.block_size, L = cfg.model.n_layer, E = cfg.router.num_experts,
                K = cfg.router.top_k;
  Model model(cfg, V);
  ParamStore& ps = model.params();
  for (const ParamInfo& p : ps.infos()) f.copy_f32("param." + p.name, p.shape, ps.data() + p.offset);
  std::vector<int32_t> idx = read_i32(f, "idx", B * T), targets = read_i32(f, "targets", B * T);
  std::vector<std::vector<float>> noise;
  for (int64_t l = 0; l < L; ++l) noise.push_back(read_f32(f, "noise." + std::to_string(l), {B * T, E}));

  Graph g;
  ForwardOptions fo;
  fo.fixed_noise = &noise;
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(L));
  fo.chosen = &chosen;
  Model::Output out = model.forward(g, idx.data(), targets.data(), B, T, fo);
  for (int64_t l = 0; l < L; ++l) {
    INFO("layer " << l << " top-k choices");
    REQUIRE(chosen[size_t(l)] == read_i32(f, "router." + std::to_string(l) + ".topk", B * T * K));
  }
  std::vector<float> logits = read_f32(f, "logits", {B, T, V});
  const double dlogits = max_abs_diff(out.logits.data, logits.data(), B * T * V);
  const float ref_loss = read_f32(f, "loss", {1})[0];
  INFO("logits max abs diff " << dlogits << "; loss " << out.loss.data[0] << " vs " << ref_loss);
  CHECK(dlogits < 1e-5);
  CHECK(std::fabs(out.loss.data[0] - ref_loss) <= 1e-5 * std::fabs(ref_loss));

  g.backward(out.loss);
  double worst = 0;
  for (const ParamInfo& p : ps.infos()) {
    std::vector<float> ref = read_f32(f, "grad." + p.name, p.shape);
    const double d = max_abs_diff(ps.grad() + p.offset, ref.data(), p.shape.numel());
    worst = std::max(worst, d);
    INFO("grad." << p.name << " max abs diff " << d);
    CHECK(d < 1e-4);
  }
  WARN("golden: logits max abs diff " << dlogits << ", worst gradient max abs diff " << worst);

  // Five AdamW steps on the same batch and noise.
  OptimizerConfig oc = cfg.optimizer;
  oc.lr = 1e-2;
  oc.weight_decay = 0.01;
  AdamW adamw(oc, ps);
  std::vector<float> ref_losses = read_f32(f, "adamw.losses", {5});
  for (int s = 0; s < 5; ++s) {
    g.clear();
    ps.zero_grad();
    Model::Output o = model.forward(g, idx.data(), targets.data(), B, T, fo);
    INFO("AdamW step " << s << ": loss " << o.loss.data[0] << " vs " << ref_losses[size_t(s)]);
    CHECK(std::fabs(o.loss.data[0] - ref_losses[size_t(s)]) <= 1e-5 * std::fabs(ref_losses[size_t(s)]));
    g.backward(o.loss);
    adamw.step(ps, float(oc.lr));
  }
  for (const ParamInfo& p : ps.infos()) {
    std::vector<float> ref = read_f32(f, "final." + p.name, p.shape);
    const double d = max_abs_diff(ps.data() + p.offset, ref.data(), p.shape.numel());
    INFO("final." << p.name << " max abs diff " << d);
    CHECK(d < 1e-4);
  }
}

Config all_dense_config() {
  Config c = tiny_config();
  c.model.dense_first = c.model.n_layer;
  return c;
}

TEST_CASE("KV-cache decoding equals full-context recomputation", "[model][generate]") {
  // makeMoE's options, and every other MoE option (SwiGLU, shared expert, softmax_topk); dense
  // blocks (relu and SwiGLU) between MoE ones with a tied head, and an all-dense model.
  Config cfg = GENERATE(tiny_config(), all_features_config(), layout_config(tiny_config(), 3),
                        layout_config(all_features_config(), 3), all_dense_config());
  Model model(cfg, 13);
  Rng init(1, 1);
  model.init(init);
  const int64_t T = cfg.model.block_size;
  std::vector<int32_t> seq = {1, 5, 2, 12, 0, 7, 7, 3};
  Graph g_full;
  KVCache cache = model.new_cache();
  ForwardOptions fo;
  // Prefill 3 tokens, then one at a time; compare with a full forward each time.
  for (int64_t len = 3; len <= T; ++len) {
    const float* inc = nullptr;
    if (len == 3)
      inc = model.decode(cache, seq.data(), 3, fo);
    else
      inc = model.decode(cache, &seq[size_t(len - 1)], 1, fo);
    g_full.clear();
    NoGradGuard ng(g_full);
    Model::Output full = model.forward(g_full, seq.data(), nullptr, 1, len, fo);
    const double d = max_abs_diff(inc, full.logits.data + (len - 1) * 13, 13);
    INFO("length " << len << " max abs diff " << d);
    REQUIRE(d < 1e-5);
  }
  REQUIRE_THROWS_WITH(model.decode(cache, seq.data(), 1, fo), Catch::Contains("block_size"));
  KVCache fresh = model.new_cache();
  const int32_t bad = 13;
  REQUIRE_THROWS_WITH(model.decode(fresh, &bad, 1, fo), Catch::Contains("outside the vocabulary"));
}

// tiny_config with the attention and norm options of model: n_head 4 (head size 4).
Config attention_config(const nlohmann::json& model) {
  Config c = tiny_config();
  c.model.n_head = 4;
  nlohmann::json j = config_to_json(c);
  j["model"].update(model);
  return config_from_json(j, "attention_config");
}

TEST_CASE("KV-cache decoding equals the graph forward with rope, GQA, MQA, RMSNorm and QK-norm", "[model][generate]") {
  const nlohmann::json model = GENERATE(nlohmann::json{{"position", "rope"}}, nlohmann::json{{"n_kv_head", 2}},
                                        nlohmann::json{{"n_kv_head", 1}, {"qk_norm", true}},
                                        nlohmann::json{{"norm", "rmsnorm"}},
                                        nlohmann::json{{"position", "rope"}, {"rope_theta", 50.0}, {"n_kv_head", 2},
                                                       {"qk_norm", true}, {"norm", "rmsnorm"}});
  INFO("model options " << model.dump());
  const Config cfg = attention_config(model);
  Model model_(cfg, 13);
  Rng init(1, 1);
  model_.init(init);
  const int64_t T = cfg.model.block_size;
  const std::vector<int32_t> seq = {1, 5, 2, 12, 0, 7, 7, 3};
  KVCache cache = model_.new_cache();
  // The cache holds n_kv_head heads: n_head / n_kv_head times smaller.
  CHECK(cache.k.size() == size_t(cfg.model.n_layer * T * cfg.kv_heads() * cfg.head_size()));
  ForwardOptions fo;
  Graph g;
  for (int64_t len = 3; len <= T; ++len) {
    const float* inc = len == 3 ? model_.decode(cache, seq.data(), 3, fo) : model_.decode(cache, &seq[size_t(len - 1)], 1, fo);
    g.clear();
    NoGradGuard ng(g);
    const Model::Output full = model_.forward(g, seq.data(), nullptr, 1, len, fo);
    const double d = max_abs_diff(inc, full.logits.data + (len - 1) * 13, 13);
    INFO("length " << len << " max abs diff " << d);
    REQUIRE(d < 1e-5);
  }
}

TEST_CASE("With rope the KV cache rolls: one layer decodes past block_size as the forward of the last window",
          "[model][generate][rope]") {
  // One layer: a key depends on its token and (through the rotation) on its distance to the
  // query only, so the rolling cache at position p must give the logits of a forward over the
  // last block_size tokens from position 0, up to the rounding of the rotations' angles.
  Config cfg = attention_config({{"position", "rope"}, {"n_kv_head", 2}, {"qk_norm", true}});
  cfg.model.n_layer = 1;
  Model model(cfg, 13);
  Rng init(2, 1);
  model.init(init);
  const int64_t T = cfg.model.block_size;
  std::vector<int32_t> seq;
  for (int i = 0; i < 4 * T; ++i) seq.push_back(int32_t((i * 7 + i / 3) % 13));
  KVCache cache = model.new_cache();
  ForwardOptions fo;
  Graph g;
  int64_t len = 0;
  double worst = 0;
  // Prefills of 3 and then of 5 that wrap around the ring, one position at a time between.
  while (len < int64_t(seq.size())) {
    const int64_t n = len == 0 ? 3 : (len == 2 * T - 2 ? 5 : 1);
    const float* inc = model.decode(cache, seq.data() + len, n, fo);
    len += n;
    REQUIRE(cache.len == len);
    const int64_t w = std::min(len, T);
    g.clear();
    NoGradGuard ng(g);
    const Model::Output full = model.forward(g, seq.data() + len - w, nullptr, 1, w, fo);
    const double d = max_abs_diff(inc, full.logits.data + (w - 1) * 13, 13);
    worst = std::max(worst, d);
    INFO("position " << len - 1 << " max abs diff " << d);
    REQUIRE(d < 1e-4);
  }
  WARN("rolling rope cache against the window's forward: worst logit difference " << worst);
  REQUIRE_THROWS_WITH(model.decode(cache, seq.data(), T + 1, fo), Catch::Contains("block_size"));
}

TEST_CASE("Generation with rope rolls its cache: deterministic, any thread count; --context-keep refused",
          "[model][generate][rope]") {
  const Config cfg = attention_config({{"position", "rope"}, {"n_kv_head", 1}});
  Model model(cfg, 13);
  Rng init(3, 1);
  model.init(init);
  GenerateOptions go;
  go.seed = 11;
  const auto run = [&] {
    std::vector<int32_t> out;
    Generator(model, go).generate({1, 2, 3, 4, 5}, 40, [&](int32_t id) { out.push_back(id); });
    return out;
  };
  const std::vector<int32_t> two = run();
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<int32_t> one = run();
  omp_set_num_threads(saved);
  CHECK(one == two);
  CHECK(two.size() == 40);
  // Greedy: the same tokens as decoding them one by one on a cache of our own.
  go.sampling.temperature = 0;
  std::vector<int32_t> greedy;
  Generator(model, go).generate({1, 2, 3}, 30, [&](int32_t id) { greedy.push_back(id); });
  KVCache cache = model.new_cache();
  const std::vector<int32_t> prompt = {1, 2, 3};
  const float* logits = model.decode(cache, prompt.data(), 3, ForwardOptions{});
  for (size_t i = 0; i < greedy.size(); ++i) {
    const int32_t best = int32_t(std::max_element(logits, logits + 13) - logits);
    REQUIRE(greedy[i] == best);
    logits = model.decode(cache, &best, 1, ForwardOptions{});
  }
  go.context_keep = 4;
  REQUIRE_THROWS_WITH(Generator(model, go), Catch::Contains("--context-keep does not apply"));
}

TEST_CASE("Parameter counts follow the README's formula with every attention and norm option", "[model]") {
  // makemoe.json's sizes (V = 65): 8,996,545 parameters, 2,674,369 active, by default.
  Config base;
  base.model.expert_hidden = 512;
  const int64_t V = 65, C = 128, T = 32, L = 8, H = 8, D = 16, E = 8, F = 512, K = 2;
  for (const bool rope : {false, true})
    for (const bool rms : {false, true})
      for (const int64_t kv : {int64_t(0), int64_t(2), int64_t(1)})
        for (const bool qk : {false, true}) {
          Config c = base;
          c.model.position = rope ? PositionKind::kRope : PositionKind::kLearned;
          c.model.norm = rms ? NormKind::kRmsNorm : NormKind::kLayerNorm;
          c.model.n_kv_head = kv;
          c.model.qk_norm = qk;
          const int64_t H_kv = kv ? kv : H, norm = rms ? C : 2 * C, expert = 2 * C * F + F + C;
          const int64_t shared = V * C + (rope ? 0 : T * C) + norm + C * V + V +
                                 L * (C * (C + 2 * H_kv * D) + C * C + C + 2 * norm + (qk ? 2 * D : 0) + 2 * (C * E + E));
          const Model m(c, V);
          INFO("rope " << rope << " rmsnorm " << rms << " n_kv_head " << kv << " qk_norm " << qk);
          CHECK(m.params().parameter_count() == shared + L * E * expert);
          CHECK(m.active_param_count() == shared + L * K * expert);
          if (!rope && !rms && !kv && !qk) CHECK(m.params().parameter_count() == 8996545);
        }
}

TEST_CASE("Generation is deterministic by seed, exact window mode matches recomputation", "[model][generate]") {
  Config cfg = tiny_config();
  Model model(cfg, 13);
  Rng init(1, 1);
  model.init(init);
  auto run = [&](uint64_t seed, int64_t keep) {
    GenerateOptions go;
    go.seed = seed;
    go.context_keep = keep;
    Generator gen(model, go);
    std::vector<int32_t> out;
    gen.generate({1, 2, 3}, 30, [&](int32_t id) { out.push_back(id); });
    return out;
  };
  REQUIRE(run(5, 0) == run(5, 0));
  REQUIRE(run(5, 0) != run(6, 0));

  // Greedy, full window: the same tokens as recomputing the last block_size tokens each time.
  GenerateOptions go;
  go.sampling.temperature = 0;
  go.context_keep = cfg.model.block_size;
  Generator gen(model, go);
  std::vector<int32_t> cached;
  gen.generate({1, 2, 3}, 20, [&](int32_t id) { cached.push_back(id); });
  std::vector<int32_t> ctx = {1, 2, 3}, naive;
  Graph g;
  NoGradGuard ng(g);
  for (int i = 0; i < 20; ++i) {
    const int64_t n = std::min<int64_t>(int64_t(ctx.size()), cfg.model.block_size);
    g.clear();
    Model::Output o = model.forward(g, ctx.data() + ctx.size() - size_t(n), nullptr, 1, n, ForwardOptions{});
    const float* last = o.logits.data + (n - 1) * 13;
    int32_t best = int32_t(std::max_element(last, last + 13) - last);
    naive.push_back(best);
    ctx.push_back(best);
  }
  REQUIRE(cached == naive);
}

TEST_CASE("Checkpoint round trip restores weights, moments and state", "[model][checkpoint]") {
  Config cfg = tiny_config();
  Model a(cfg, 13);
  Rng init(3, 1);
  a.init(init);
  AdamW opt(cfg.optimizer, a.params());
  for (const ParamInfo& p : a.params().infos())
    for (int64_t i = 0; i < p.shape.numel(); ++i) a.params().grad()[p.offset + i] = 0.01f * float(i % 7);
  opt.step(a.params(), 1e-2f);
  TrainState st;
  st.step = 42;
  st.best_val_loss = 1.5;
  st.data_rng = {1, 2, 3};
  st.dropout_rng = {4, 5, 6};
  st.noise_rng = {7, 8, 9};
  const moe_test::TempDir tmp_dir("ckpt");  // per process: suites running at once do not share it
  const fs::path dir = tmp_dir.path;
  fs::create_directories(dir);
  const std::string path = (dir / "c.safetensors").string();
  save_checkpoint(path, a, &opt, {10, 65, 66}, st);

  CheckpointHeader h = read_checkpoint_header(path);
  REQUIRE(h.state.step == 42);
  REQUIRE(h.state.noise_rng.counter == 9);
  REQUIRE(h.vocab == std::vector<uint32_t>{10, 65, 66});
  REQUIRE(config_to_json(h.config) == config_to_json(cfg));
  Model b(h.config, 13);
  AdamW opt_b(h.config.optimizer, b.params());
  load_checkpoint_tensors(path, b, &opt_b);
  REQUIRE(same_params(a, b));
  REQUIRE(opt_b.m() == opt.m());
  REQUIRE(opt_b.v() == opt.v());
  REQUIRE(opt_b.steps() == 1);

  Config other = cfg;
  other.model.n_embed = 32;
  REQUIRE_THROWS_WITH(check_resume_compatible(cfg, other, path), Catch::Contains("model.n_embed"));
  fs::remove_all(dir);
}

TEST_CASE("Checkpoint metadata: numbers that are not integers in range are refused", "[model][checkpoint]") {
  // Found by tests/fuzz/fuzz_checkpoint.cpp: nlohmann's get<uint64_t>() converted 1e300 with an
  // out-of-range (undefined) cast, and silently wrapped -1 and 2^32 + 65 into the vocabulary.
  std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat}, {"config", config_to_json(tiny_config()).dump()}, {"vocab", "[10,65]"},
      {"step", "3"}, {"best_val_loss", "2.5"}, {"rng", R"({"data":[1,2,3],"dropout":[4,5,6],"noise":[7,8,9]})"}};
  REQUIRE(checkpoint_header_from_metadata(meta, "m").vocab == std::vector<uint32_t>{10, 65});
  auto error_with = [&](const std::string& key, const std::string& value) {
    auto m = meta;
    m[key] = value;
    try {
      checkpoint_header_from_metadata(m, "ck.safetensors");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  using Catch::Contains;
  CHECK_THAT(error_with("vocab", "[10,1e300]"), Contains("ck.safetensors") && Contains("vocab entry must be an integer"));
  CHECK_THAT(error_with("vocab", "[-1]"), Contains("vocab entry must be an integer in [0, 4294967295], got -1"));
  CHECK_THAT(error_with("vocab", "[4294967361]"), Contains("vocab entry must be an integer"));
  CHECK_THAT(error_with("vocab", "{}"), Contains("vocab must be an array"));
  CHECK_THAT(error_with("rng", R"({"data":[1,2,8.5e53],"dropout":[4,5,6],"noise":[7,8,9]})"),
             Contains("ck.safetensors") && Contains("generator counter must be an integer"));
}

TEST_CASE("Exact resume: 20 straight steps equal 10 + resume + 10, bit for bit", "[model][resume]") {
  const int kind = GENERATE(0, 1, 2);
  INFO((kind == 0 ? "makeMoE" : kind == 1 ? "every MoE option on" : "every MoE option, dense blocks, a tied head"));
  const Config cfg = kind == 0 ? tiny_config() : kind == 1 ? all_features_config() : layout_config(all_features_config(), 3);
  const moe_test::TempDir tmp_dir("resume");  // per process: suites running at once do not share it
  const fs::path dir = tmp_dir.path;
  fs::remove_all(dir);
  TrainOptions straight;
  straight.quiet = true;
  straight.out_dir = (dir / "straight").string();
  TrainResult r1 = train(cfg, straight);

  Config half = cfg;
  half.training.max_steps = 10;
  TrainOptions first = straight;
  first.out_dir = (dir / "resumed").string();
  train(half, first);
  TrainOptions second = first;
  second.resume = (dir / "resumed" / "last.safetensors").string();
  TrainResult r2 = train(cfg, second);
  REQUIRE(r2.steps_done == 20);
  REQUIRE(r1.last_train_loss == r2.last_train_loss);
  // Every logged loss after the resume point, bit for bit (JSON keeps all float digits).
  auto losses_after = [](const fs::path& metrics, int64_t from) {
    std::vector<double> v;
    std::ifstream in(metrics);
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      if (j.contains("loss") && j["step"].get<int64_t>() > from) v.push_back(j["loss"].get<double>());
    }
    return v;
  };
  const auto a_losses = losses_after(dir / "straight" / "metrics.jsonl", 10);
  REQUIRE(a_losses.size() == 2);
  REQUIRE(a_losses == losses_after(dir / "resumed" / "metrics.jsonl", 10));

  REQUIRE(same_checkpoint_weights(dir / "straight" / "last.safetensors", dir / "resumed" / "last.safetensors"));
  fs::remove_all(dir);
}

namespace {
// Every weight of a checkpoint, under `prefix` ("" for the model's, "optimizer.w." for the
// weights training continues from), in the model's layout order.
std::vector<double> checkpoint_weights(const fs::path& path, const std::string& prefix) {
  const SafeTensorsFile f = load_safetensors(path.string());
  const CheckpointHeader h = checkpoint_header_from_metadata(f.metadata(), path.string());
  const Model m(h.config, int64_t(h.vocab.size()));
  std::vector<double> out;
  for (const ParamInfo& p : m.params().infos())
    for (float v : read_f32(f, prefix + p.name, p.shape)) out.push_back(v);
  return out;
}
}  // namespace

TEST_CASE("training.average_start: checkpoints hold the running average of the trained weights; resume stays exact",
          "[model][resume][average]") {
  const double decay = GENERATE(1.0, 0.6);
  INFO("average_decay " << decay);
  const moe_test::TempDir tmp_dir("average");
  const fs::path dir = tmp_dir.path;
  fs::remove_all(dir);
  Config cfg = tiny_config();
  cfg.training.max_steps = 8;
  cfg.training.average_start = 5;
  cfg.training.average_decay = decay;
  cfg.logging.checkpoint_interval = 1;
  cfg.logging.eval_interval = 4;
  TrainOptions opt;
  opt.quiet = true;
  opt.out_dir = (dir / "avg").string();
  train(cfg, opt);

  // The trained weights after steps 5..8, as each step's checkpoint keeps them, averaged here
  // in double by the documented rule: the first one, then max(1 - decay, 1/(n+1)) of the way.
  std::vector<double> expected;
  for (int64_t n = 0, step = 5; step <= 8; ++step, ++n) {
    const auto w = checkpoint_weights(dir / "avg" / ("step_" + std::to_string(step) + ".safetensors"), "optimizer.w.");
    REQUIRE(read_checkpoint_header((dir / "avg" / ("step_" + std::to_string(step) + ".safetensors")).string())
                .state.average_count == n + 1);
    if (n == 0) {
      expected = w;
      continue;
    }
    const double rate = std::max(1.0 - decay, 1.0 / double(n + 1));
    for (size_t i = 0; i < w.size(); ++i) expected[i] += rate * (w[i] - expected[i]);
  }
  const auto got = checkpoint_weights(dir / "avg" / "last.safetensors", "");
  const auto trained = checkpoint_weights(dir / "avg" / "last.safetensors", "optimizer.w.");
  REQUIRE(got.size() == expected.size());
  double worst = 0, moved = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    worst = std::max(worst, std::fabs(got[i] - expected[i]));
    moved = std::max(moved, std::fabs(got[i] - trained[i]));
  }
  CHECK(worst < 1e-6);
  CHECK(moved > 1e-3);  // the average is not the last weights

  // Averaging does not change training: the trained weights are a plain run's.
  Config plain = cfg;
  plain.training.average_start = 0;
  TrainOptions plain_opt = opt;
  plain_opt.out_dir = (dir / "plain").string();
  train(plain, plain_opt);
  CHECK(checkpoint_weights(dir / "plain" / "last.safetensors", "") == trained);
  CHECK_FALSE(read_safetensors_header((dir / "plain" / "last.safetensors").string()).metadata().count("average.count"));

  // The evaluations after the start are the average's, and say so.
  std::ifstream metrics(dir / "avg" / "metrics.jsonl");
  int evaluations_of_average = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("val_loss") && j.contains("average_count")) ++evaluations_of_average;
  }
  CHECK(evaluations_of_average == 1);  // at steps 0, 4 and 7: the last after averaging 3 steps' weights

  // Resumed inside the averaging window: the same average and trained weights, bit for bit.
  Config half = cfg;
  half.training.max_steps = 6;
  TrainOptions first = opt;
  first.out_dir = (dir / "resumed").string();
  train(half, first);
  TrainOptions second = first;
  second.resume = (dir / "resumed" / "last.safetensors").string();
  const TrainResult r = train(cfg, second);
  REQUIRE(r.steps_done == 8);
  CHECK(same_checkpoint_weights(dir / "avg" / "last.safetensors", dir / "resumed" / "last.safetensors"));
  CHECK(checkpoint_weights(dir / "resumed" / "last.safetensors", "optimizer.w.") == trained);
  fs::remove_all(dir);
}

TEST_CASE("1 and 2 threads give bit-identical training", "[model][threads]") {
  const bool features = GENERATE(false, true);
  INFO((features ? "every MoE option on" : "makeMoE"));
  Config cfg = features ? all_features_config() : tiny_config();
  cfg.training.max_steps = 6;
  const moe_test::TempDir tmp_dir("threads");  // per process: suites running at once do not share it
  const fs::path dir = tmp_dir.path;
  fs::remove_all(dir);
  const int saved = omp_get_max_threads();
  Config two = cfg;
  cfg.training.threads = 1;
  two.training.threads = 2;
  require_same_training(cfg, two, dir);
  omp_set_num_threads(saved);
  // The logged figures too (router health, gradient norm), all but the speed.
  const auto metrics = [&](const char* run) {
    std::ifstream f(dir / run / "metrics.jsonl");
    std::vector<nlohmann::json> lines;
    for (std::string line; std::getline(f, line);) {
      lines.push_back(nlohmann::json::parse(line));
      lines.back().erase("tokens_per_s");
    }
    return lines;
  };
  const auto m1 = metrics("a"), m2 = metrics("b");
  REQUIRE(m1.size() >= 2);
  CHECK(m1 == m2);
  fs::remove_all(dir);
}

TEST_CASE("training.keep_activations gives the same training, bit for bit", "[model][keep_activations]") {
  const bool features = GENERATE(false, true);
  INFO((features ? "every MoE option on" : "makeMoE"));
  Config cfg = features ? all_features_config() : tiny_config();
  cfg.training.max_steps = 6;
  const moe_test::TempDir tmp_dir("keep");
  const fs::path dir = tmp_dir.path;
  fs::remove_all(dir);
  Config kept = cfg;
  kept.training.keep_activations = true;
  require_same_training(cfg, kept, dir);
  fs::remove_all(dir);
}

TEST_CASE("training.precision bf16: 1 and 2 threads give the same bits; the loss stays near fp32's", "[model][bf16]") {
  // Wide enough that the dense products split between threads (M·N·K >= 32768).
  Config cfg = tiny_config();
  cfg.model.n_embed = 64;
  cfg.model.n_head = 4;
  cfg.model.block_size = 16;
  cfg.training.batch_size = 8;
  cfg.training.max_steps = 30;
  cfg.optimizer.lr = 3e-3;
  cfg.logging.log_interval = 1;
  cfg.logging.eval_interval = 30;
  const moe_test::TempDir tmp_dir("bf16");
  const fs::path dir = tmp_dir.path;
  fs::remove_all(dir);
  TrainOptions opt;
  opt.quiet = true;
  const int saved = omp_get_max_threads();
  const auto losses = [&](const char* run) {
    std::vector<double> v;
    std::ifstream in(dir / run / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      if (j.contains("loss")) v.push_back(j["loss"].get<double>());
    }
    return v;
  };
  cfg.training.threads = 2;
  opt.out_dir = (dir / "fp32").string();
  const TrainResult fp32 = train(cfg, opt);
  cfg.training.precision = Precision::kBf16;
  opt.out_dir = (dir / "bf16_two").string();
  const TrainResult two = train(cfg, opt);
  cfg.training.threads = 1;
  opt.out_dir = (dir / "bf16_one").string();
  const TrainResult one = train(cfg, opt);
  omp_set_num_threads(saved);
  REQUIRE(one.last_train_loss == two.last_train_loss);
  REQUIRE(losses("bf16_one") == losses("bf16_two"));
  REQUIRE(same_checkpoint_weights(dir / "bf16_one" / "last.safetensors", dir / "bf16_two" / "last.safetensors"));
  // bf16 changes the numbers, but not the course: every step's loss within 0.1 of fp32's (the
  // loss falls from 5.1 to 3.1 over these 30 steps; the largest gap measured was 0.06, the
  // last 0.013).
  const auto a = losses("fp32"), b = losses("bf16_two");
  REQUIRE(a.size() == 30);
  REQUIRE(a.size() == b.size());
  REQUIRE(a != b);
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  INFO("first loss " << a.front() << ", last " << a.back() << " (fp32) and " << b.back() << " (bf16); largest gap "
                     << worst);
  CHECK(a.front() - a.back() > 1.5);
  CHECK(worst < 0.1);
  CHECK(std::fabs(a.back() - b.back()) < 0.05);
  CHECK(std::fabs(fp32.last_val_loss - two.last_val_loss) < 0.05);
  // The checkpoint keeps the precision (its config), and evaluates in fp32 like any other.
  CHECK(read_checkpoint_header((dir / "bf16_two" / "last.safetensors").string()).config.training.precision ==
        Precision::kBf16);
  fs::remove_all(dir);
}

TEST_CASE("Generated tokens are those of the graph-built decoder (recorded), every MoE option", "[model][generate]") {
  // Token ids recorded from Model::decode as it was when it built an autograd graph per token.
  // Sampling at temperature 1 with router noise at evaluation, and a context_keep that
  // re-encodes the context several times, so the prefill and the one-token path both count.
  auto run = [](Config cfg, bool skew_bias) {
    cfg.router.noise_at_eval = true;
    cfg.router.capacity_at_eval = true;
    Model model(cfg, 13);
    Rng init(3, 1);
    model.init(init);
    if (skew_bias)  // nonzero aux-loss-free balancing biases, so the selection uses them
      for (const Model::Buffer& b : model.buffers())
        for (int64_t e = 0; e < b.size; ++e) model.buffer_data()[b.offset + e] = 0.3f * float(e % 3) - 0.2f;
    GenerateOptions go;
    go.seed = 11;
    go.context_keep = 3;
    std::vector<int32_t> out, one_thread;
    Generator(model, go).generate({1, 2, 3, 4, 5}, 40, [&](int32_t id) { out.push_back(id); });
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    Generator(model, go).generate({1, 2, 3, 4, 5}, 40, [&](int32_t id) { one_thread.push_back(id); });
    omp_set_num_threads(saved);
    CHECK(one_thread == out);
    return out;
  };
  Config gelu = tiny_config();
  gelu.model.expert_ffn = ExpertFfn::kGelu;
  gelu.model.attn_scale = AttnScale::kEmbed;
  using Ids = std::vector<int32_t>;
  CHECK(run(tiny_config(), false) == Ids{12, 4, 11, 5, 5, 3, 2, 5, 5, 4, 12, 12, 4, 5, 5, 4, 5, 5, 4, 2,
                                          4, 4, 10, 11, 0, 11, 4, 12, 4, 12, 4, 12, 12, 4, 6, 7, 4, 8, 4, 4});
  CHECK(run(gelu, false) == Ids{12, 4, 11, 5, 5, 3, 2, 2, 5, 5, 5, 12, 4, 2, 9, 4, 4, 6, 1, 12,
                                4, 4, 4, 10, 8, 5, 5, 5, 5, 12, 4, 9, 2, 5, 11, 1, 12, 3, 12, 4});
  CHECK(run(all_features_config(), true) == Ids{2, 4, 2, 11, 6, 10, 11, 4, 4, 2, 3, 1, 4, 5, 4, 0, 2, 2, 0, 5,
                                                2, 2, 3, 2, 10, 0, 4, 10, 3, 4, 0, 5, 9, 3, 7, 10, 7, 4, 5, 2});
}

TEST_CASE("Gradient scopes: the gradients of a gradient per tensor, in about one block's memory", "[model][scopes]") {
  // The aux and z losses are made inside a block and added after the last, so their gradients
  // must outlive the block's scope.
  // relu experts run grouped_mlp, whose hidden layer's gradient is assigned in a region of the
  // scope that is not zeroed: each block's backward finds the block after it's there.
  for (const auto& [ffn, layout] : {std::pair{ExpertFfn::kSwiglu, false}, std::pair{ExpertFfn::kRelu, false},
                                     std::pair{ExpertFfn::kRelu, true}}) {
    INFO(name_of(ffn) << (layout ? " with dense blocks and a tied head" : ""));
    Graph scoped, per_tensor;
    per_tensor.set_grad_scopes(false);
    const GradRun a = training_gradients(scoped, {}, ffn, layout), b = training_gradients(per_tensor, {}, ffn, layout);
    CHECK(a.objective == b.objective);
    REQUIRE(a.grads.size() == b.grads.size());
    CHECK(std::memcmp(a.grads.data(), b.grads.data(), sizeof(float) * a.grads.size()) == 0);
    // Four blocks' activation gradients against one block's and what outlives the blocks.
    const auto grad_bytes = [](const Graph& g) {
      return g.grad_arena().bytes_used() + g.scope_grad_arena().bytes_used() + g.scope_scratch_arena().bytes_used();
    };
    CHECK(grad_bytes(scoped) * 2 < grad_bytes(per_tensor));
  }
}

TEST_CASE("AdamW group by group in the backward pass equals the step after it, norm included", "[model][optim]") {
  // Both with every MoE option: a tiny model (all groups in one chunk of the gradient norm)
  // and a wider one (groups across chunks); and with dense blocks and a tied head, whose
  // matrix gets gradients at both ends of the backward pass while the groups share a region.
  for (const auto& [C, layout] : {std::pair{int64_t(16), false}, std::pair{int64_t(64), false},
                                  std::pair{int64_t(16), true}, std::pair{int64_t(64), true}}) {
    INFO("n_embed " << C << (layout ? ", dense blocks and a tied head" : ""));
    Config cfg = all_features_config();
    cfg.model.n_embed = C;
    cfg.model.n_layer = 3;
    if (layout) cfg = layout_config(cfg, 3);
    const int64_t B = 4, T = 8;
    const auto run = [&](bool grouped, std::vector<double>& norms) {
      Model model(cfg, 13);
      Rng init(3, 1), drop(5, 2), noise(5, 3);
      model.init(init);
      AdamW adamw(cfg.optimizer, model.params());
      ParamStore& ps = model.params();
      GroupUpdate group(adamw, ps);
      if (grouped) ps.share_grads(model.grad_groups());
      ForwardOptions fo;
      fo.training = true;
      fo.dropout_rng = &drop;
      fo.noise_rng = &noise;
      fo.grads_ready = grouped ? &group : nullptr;
      Graph g;
      std::vector<int32_t> x(size_t(B * T)), y(size_t(B * T));
      for (int step = 0; step < 3; ++step) {
        for (int64_t i = 0; i < B * T; ++i)
          x[size_t(i)] = int32_t((i * 7 + step) % 13), y[size_t(i)] = int32_t((i * 5 + step) % 13);
        g.clear();
        const float lr = 1e-2f;
        if (grouped) group.begin(lr, true);
        const Model::Output o = model.forward(g, x.data(), y.data(), B, T, fo);
        g.backward(o.objective);
        if (grouped) {
          norms.push_back(group.finish());
        } else {
          norms.push_back(clip_grad_norm(ps, 0));
          adamw.step(ps, lr, nullptr, true);
        }
      }
      return std::vector<float>(ps.data(), ps.data() + ps.numel());
    };
    std::vector<double> grouped_norms, step_norms;
    const std::vector<float> grouped = run(true, grouped_norms), stepped = run(false, step_norms);
    CHECK(grouped_norms == step_norms);
    REQUIRE(grouped.size() == stepped.size());
    CHECK(std::memcmp(grouped.data(), stepped.data(), sizeof(float) * grouped.size()) == 0);
  }
}

TEST_CASE("Recomputation: the same objective and gradients, in about one block's activations", "[model][recompute]") {
  // The block's second run must draw the same dropout and noise numbers, and the router
  // losses' gradients must reach it. Also with dense blocks (their dropout) and a tied head.
  // Under bf16 the block's second run must use bf16 products too.
  const bool layout = GENERATE(false, true);
  const bool bf16 = GENERATE(false, true);
  INFO((layout ? "dense blocks and a tied head" : "every block MoE") << (bf16 ? ", bf16" : ""));
  Graph g, again, plain;
  RoutingStats re_stats, plain_stats;
  ForwardOptions fo;
  fo.stats = &re_stats;
  fo.recompute = &again;
  const GradRun re = training_gradients(g, fo, ExpertFfn::kSwiglu, layout, bf16);
  fo.stats = &plain_stats;
  fo.recompute = nullptr;
  const GradRun pl = training_gradients(plain, fo, ExpertFfn::kSwiglu, layout, bf16);
  if (bf16) {  // bf16 did change the numbers
    Graph fp32;
    ForwardOptions no_stats = fo;
    no_stats.stats = nullptr;
    CHECK(training_gradients(fp32, no_stats, ExpertFfn::kSwiglu, layout).objective != pl.objective);
  }
  CHECK(re.objective == pl.objective);
  REQUIRE(re.grads.size() == pl.grads.size());
  CHECK(std::memcmp(re.grads.data(), pl.grads.data(), sizeof(float) * re.grads.size()) == 0);
  // Router statistics are gathered once, by the first run of each block.
  CHECK(re_stats.health().dump() == plain_stats.health().dump());
  // A dense block keeps less than an MoE block, so half the blocks dense save less.
  CHECK(double(g.arena().bytes_used() + again.arena().bytes_used()) * (layout ? 1.5 : 2.0) <
        double(plain.arena().bytes_used()));
}

TEST_CASE("The decode layout gives the decoder's logits bit for bit, every MoE option", "[model][generate]") {
  // Model::use_decode_layout transposes every Linear's weight to [in, out]: the one-row
  // products run gemv on the rows of the weight in order (a relu expert's second product over
  // its nonzero inputs only), the prefills gemm without transposing it. Each logit must keep
  // its bits, through prefills (n > 1) and single tokens, with router noise drawn.
  auto check = [](Config cfg, const char* name) {
    cfg.router.noise_at_eval = true;
    Model as_stored(cfg, 13), laid_out(cfg, 13);
    Rng init_a(3, 1), init_b(3, 1);
    as_stored.init(init_a);
    laid_out.init(init_b);
    laid_out.use_decode_layout();
    CHECK(laid_out.decode_layout());
    Rng noise_a(9, 4), noise_b(9, 4);
    ForwardOptions fa, fb;
    fa.noise_rng = &noise_a, fb.noise_rng = &noise_b;
    KVCache ca = as_stored.new_cache(), cb = laid_out.new_cache();
    const int64_t T = cfg.model.block_size;
    std::vector<int32_t> seq;
    for (int64_t i = 0; i < 3 * T; ++i) seq.push_back(int32_t(i * 5 % 13));
    const bool rolling = cfg.model.position == PositionKind::kRope;
    for (int64_t at = 0, step = 0; at + 3 <= int64_t(seq.size()); ++step) {
      // A prefill of 3 at the start of each window, then one token at a time.
      const int64_t n = ca.len == 0 || step % 7 == 0 ? 3 : 1;
      if (!rolling && ca.len + n > T) ca.len = cb.len = 0;
      const float* a = as_stored.decode(ca, seq.data() + at, n, fa);
      const float* b = laid_out.decode(cb, seq.data() + at, n, fb);
      INFO(name << ": position " << at << ", " << n << " token(s)");
      REQUIRE(std::memcmp(a, b, sizeof(float) * 13) == 0);
      at += n;
    }
    Graph g;
    const int32_t ids[2] = {1, 2};
    CHECK_THROWS_WITH(laid_out.forward(g, ids, nullptr, 1, 2, ForwardOptions{}), Catch::Contains("decoding"));
  };
  Config wide = tiny_config();  // an expert's second product 300 deep: more than gemm's 256-deep blocks
  wide.model.n_embed = 32;
  wide.model.expert_hidden = 300;
  Config gelu = tiny_config();
  gelu.model.expert_ffn = ExpertFfn::kGelu;
  Config rope = layout_config(all_features_config(), 4);  // dense blocks, tied head, swiglu, shared expert
  rope.model.position = PositionKind::kRope;
  check(tiny_config(), "makemoe (relu)");
  check(wide, "relu, 300 hidden");
  check(gelu, "gelu");
  check(all_features_config(), "every MoE option");
  check(rope, "rope, dense blocks, tied head");
}
