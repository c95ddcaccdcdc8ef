// Routers beyond noisy top-k: relu (ReMoE), expert choice, dense-to-sparse k, and sparse
// upcycling. Their gradients are in test_moe_features.cpp ([jitter]) and their PyTorch twins in
// test_twin.cpp; here: config errors, the k schedule, the router state across a resume, the
// upcycled model's forward and its errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "moe/io/config.hpp"
#include "moe/model/model.hpp"
#include "moe/tensor/graph.hpp"
#include "moe/tensor/streams.hpp"
#include "moe/train/checkpoint.hpp"
#include "moe/train/trainer.hpp"
#include "moe/train/upcycle.hpp"

using namespace moe;
using Catch::Matchers::Contains;
using moe_test::error_of;
using moe_test::TempDir;
using nlohmann::json;

namespace {

json tiny_json(const json& router) {
  return {{"data", {{"path", std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt"}}},
          {"model", {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 2}, {"dropout", 0.0}}},
          {"router", router},
          {"training", {{"batch_size", 4}, {"max_steps", 6}, {"seed", 3}}},
          {"logging", {{"log_interval", 1}, {"eval_interval", 100}, {"eval_iters", 2}, {"checkpoint_interval", 3}}}};
}

// The largest |difference| of two checkpoints' logits on the same two windows of 8.
double logits_diff(const std::string& a_path, const std::string& b_path) {
  InferenceModel a = load_for_inference(a_path), b = load_for_inference(b_path);
  const std::vector<int32_t> x = {1, 2, 3, 4, 5, 6, 7, 0, 3, 3, 2, 1, 0, 5, 6, 2};
  Graph g1, g2;
  ForwardOptions fo;
  const Model::Output la = a.model->forward(g1, x.data(), x.data(), 2, 8, fo);
  const Model::Output lb = b.model->forward(g2, x.data(), x.data(), 2, 8, fo);
  double worst = 0;
  for (int64_t i = 0; i < la.logits.numel(); ++i) worst = std::max(worst, double(std::fabs(la.logits.data[i] - lb.logits.data[i])));
  return worst;
}

std::string config_error(const json& router) {
  return error_of<ConfigError>([&] { config_from_json(tiny_json(router), "test.json"); });
}

}  // namespace

TEST_CASE("Router options beyond top-k: bad combinations name the field", "[routers][config]") {
  CHECK_THAT(config_error({{"gating", "relu"}, {"bias_update_rate", 0.1}}), Contains("router.bias_update_rate"));
  CHECK_THAT(config_error({{"gating", "expert_choice"}}), Contains("needs router.capacity_factor > 0"));
  CHECK_THAT(config_error({{"gating", "expert_choice"}, {"capacity_factor", 1.0}, {"n_groups", 2}}),
             Contains("router.n_groups"));
  CHECK_THAT(config_error({{"gating", "relu"}, {"top_k_anneal_steps", 10}}), Contains("router.top_k_anneal_steps"));
  CHECK_THAT(config_error({{"gating", "relu"}, {"relu_l1_growth", 1.0}}), Contains("router.relu_l1_growth"));
  CHECK_THAT(config_error({{"gating", "nope"}}), Contains("\"relu\" \"expert_choice\""));
  CHECK_NOTHROW(config_from_json(tiny_json({{"num_experts", 4}, {"top_k", 4}}), "dense"));  // K = E
}

TEST_CASE("top_k_anneal_steps: k from E down to top_k, linearly", "[routers]") {
  RouterConfig r;
  r.num_experts = 8, r.top_k = 2, r.top_k_anneal_steps = 6;
  const int64_t want[] = {8, 7, 6, 5, 4, 3, 2, 2, 2};
  for (int64_t s = 0; s < 9; ++s) CHECK(top_k_at(r, s) == want[s]);
  r.top_k_anneal_steps = 0;
  CHECK(top_k_at(r, 0) == 2);
}

TEST_CASE("relu's L1 coefficient, expert choice's thresholds and the annealed k resume exactly", "[routers][resume]") {
  for (const json& router : {json{{"num_experts", 4}, {"top_k", 2}, {"gating", "relu"}},
                             json{{"num_experts", 4}, {"top_k", 2}, {"gating", "expert_choice"}, {"capacity_factor", 1.0}},
                             json{{"num_experts", 4}, {"top_k", 1}, {"top_k_anneal_steps", 4}}}) {
    INFO(router.dump());
    TempDir dir("routers_resume");
    const Config cfg = config_from_json(tiny_json(router), "test");
    TrainOptions whole;
    whole.out_dir = dir / "whole";
    whole.quiet = true;
    train(cfg, whole);
    TrainOptions resumed = whole;
    resumed.out_dir = dir / "resumed";
    resumed.resume = dir / "whole/step_3.safetensors";
    train(cfg, resumed);
    const auto a = load_safetensors(dir / "whole/last.safetensors"), b = load_safetensors(dir / "resumed/last.safetensors");
    for (const std::string& name : a.names()) {
      INFO(name);
      const auto& ia = a.info(name);
      CHECK(std::memcmp(a.bytes(name), b.bytes(name), ia.end - ia.begin) == 0);
    }
    // The buffers moved from their start: λ from relu_l1_init, the thresholds from -1.
    InferenceModel m = load_for_inference(dir / "whole/last.safetensors");
    for (const Model::Buffer& buf : m.model->buffers())
      for (int64_t i = 0; i < buf.size; ++i) CHECK(m.model->buffer_data()[buf.offset + i] != (buf.name == "router.l1_coef" ? 1e-8f : -1.f));
    const std::string metrics = moe_test::read_file(dir / "whole/metrics.jsonl");
    if (router.contains("top_k_anneal_steps")) CHECK_THAT(metrics, Contains("\"top_k\":3") && Contains("\"top_k\":1"));
    if (router.value("gating", "") == "relu") CHECK_THAT(metrics, Contains("experts_per_token") && Contains("l1_coef"));
  }
}

TEST_CASE("moe upcycle: every expert a copy of the dense FFN; with weights summing to 1 the forward is the dense one",
          "[routers][upcycle]") {
  TempDir dir("upcycle");
  const json dense_json = tiny_json({{"num_experts", 1}, {"top_k", 1}});
  const Config dense_cfg = config_from_json(dense_json, "dense");
  TrainOptions opt;
  opt.out_dir = dir / "dense";
  opt.quiet = true;
  train(dense_cfg, opt);
  const std::string dense = dir / "dense/last.safetensors";
  for (const char* gating : {"topk_softmax", "softmax_topk"}) {
    INFO(gating);
    json moe_json = tiny_json({{"num_experts", 4}, {"top_k", 2}, {"gating", gating}});
    if (std::string(gating) == "softmax_topk") moe_json["router"]["renormalize"] = true;
    const Config moe_cfg = config_from_json(moe_json, "moe");
    upcycle(dense, moe_cfg, dir / "up.safetensors", {});
    const double worst = logits_diff(dense, dir / "up.safetensors");
    INFO("logits max abs diff " << worst);
    CHECK(worst < 1e-5);
    // Train from it: --init takes the weights, a fresh optimizer at step 0.
    TrainOptions from;
    from.out_dir = dir / "from";
    from.init = dir / "up.safetensors";
    from.quiet = true;
    from.overwrite = true;
    CHECK(train(moe_cfg, from).steps_done == 6);
    from.resume = dense;
    CHECK_THROWS_WITH(train(moe_cfg, from), Contains("--init and --resume do not go together"));
  }
  // A dense-FFN source (model.dense_first = n_layer: "blocks.{l}.ffn.*", no router at all) upcycles
  // the same way; its FFN width must be the experts'.
  {
    json all_dense = tiny_json({{"num_experts", 4}, {"top_k", 2}});
    all_dense["model"]["dense_first"] = 2;
    all_dense["model"]["dense_hidden"] = 64;  // 4 * n_embed, the experts' default width
    TrainOptions o;
    o.out_dir = dir / "all_dense";
    o.quiet = true;
    train(config_from_json(all_dense, "all dense"), o);
    const Config moe_cfg = config_from_json(tiny_json({{"num_experts", 4}, {"top_k", 2}}), "moe");
    upcycle(dir / "all_dense/last.safetensors", moe_cfg, dir / "up_ffn.safetensors", {});
    const double worst = logits_diff(dir / "all_dense/last.safetensors", dir / "up_ffn.safetensors");
    INFO("dense-FFN source: logits max abs diff " << worst);
    CHECK(worst < 1e-5);
    json wide = all_dense;
    wide["model"]["dense_hidden"] = 32;
    o.out_dir = dir / "narrow";
    train(config_from_json(wide, "narrow"), o);
    CHECK_THROWS_WITH(upcycle(dir / "narrow/last.safetensors", moe_cfg, dir / "bad.safetensors", {}),
                      Contains("the dense blocks' width against the experts'"));
  }
  // Noise breaks the symmetry: the experts differ.
  const Config moe_cfg = config_from_json(tiny_json({{"num_experts", 4}, {"top_k", 2}}), "moe");
  upcycle(dense, moe_cfg, dir / "noisy.safetensors", {0.01, 5});
  const auto f = load_safetensors(dir / "noisy.safetensors");
  CHECK(std::memcmp(f.bytes("blocks.0.moe.experts.0.fc1.weight"), f.bytes("blocks.0.moe.experts.1.fc1.weight"), 16) != 0);
  // What does not fit.
  const auto upcycle_error = [&](const json& changes, const std::string& from) {
    json j = tiny_json({{"num_experts", 4}, {"top_k", 2}});
    for (auto& [sec, body] : changes.items())
      for (auto& [k, v] : body.items()) j[sec][k] = v;
    return error_of<std::runtime_error>([&] { upcycle(from, config_from_json(j, "moe"), dir / "bad.safetensors", {}); });
  };
  CHECK_THAT(upcycle_error({{"model", {{"n_embed", 32}}}}, dense), Contains("model.n_embed is 16 in the source, 32"));
  CHECK_THAT(upcycle_error({{"model", {{"expert_hidden", 8}}}}, dense), Contains("hidden width"));
  CHECK_THAT(upcycle_error({{"model", {{"expert_ffn", "swiglu"}}}}, dense), Contains("model.expert_ffn"));
  CHECK_THAT(upcycle_error({{"model", {{"n_layer", 3}}}}, dense), Contains("model.n_layer"));
  CHECK_THAT(upcycle_error({}, dir / "noisy.safetensors"), Contains("must be dense"));
  CHECK(upcycle_source_name("blocks.3.moe.experts.7.fc2.bias") == "blocks.3.moe.experts.0.fc2.bias");
  CHECK(upcycle_source_name("blocks.0.moe.router.route.weight").empty());
  CHECK(upcycle_source_name("blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight");
  CHECK(upcycle_source_name("blocks.2.moe.experts.3.fc3.weight", "ffn.") == "blocks.2.ffn.fc3.weight");
}

TEST_CASE("relu and expert choice's causal rule: KV-cache decoding equals full-context recomputation",
          "[routers][generate]") {
  // Expert choice decodes by its thresholds, as the evaluation forward routes: the same experts
  // for a token whatever comes after it.
  for (const json& router : {json{{"num_experts", 4}, {"top_k", 2}, {"gating", "relu"}},
                             json{{"num_experts", 4}, {"top_k", 2}, {"gating", "expert_choice"}, {"capacity_factor", 1.0}}}) {
    INFO(router.dump());
    const Config cfg = config_from_json(tiny_json(router), "test");
    Model model(cfg, 13);
    Rng init(1, 1);
    model.init(init);
    for (const Model::Buffer& b : model.buffers())  // thresholds that take some experts, not all
      if (b.name.find("threshold") != std::string::npos)
        for (int64_t i = 0; i < b.size; ++i) model.buffer_data()[b.offset + i] = 0.2f + 0.02f * float(i);
    const std::vector<int32_t> seq = {1, 5, 2, 12, 0, 7, 7, 3};
    KVCache cache = model.new_cache();
    ForwardOptions fo;
    RoutingStats stats;
    for (int64_t len = 1; len <= 8; ++len) {
      const float* inc = model.decode(cache, &seq[size_t(len - 1)], 1, fo);
      Graph g;
      NoGradGuard ng(g);
      ForwardOptions with_stats;
      with_stats.stats = &stats;
      const Model::Output full = model.forward(g, seq.data(), nullptr, 1, len, with_stats);
      double d = 0;
      for (int64_t v = 0; v < 13; ++v) d = std::max(d, double(std::fabs(inc[v] - full.logits.data[(len - 1) * 13 + v])));
      INFO("length " << len << " max abs diff " << d);
      REQUIRE(d < 1e-5);
    }
    const json health = stats.health();
    for (const auto& layer : health) {  // a variable number of experts per token, reported
      REQUIRE(layer.contains("experts_per_token"));
      CHECK(layer["experts_per_token"]["min"].get<int64_t>() < layer["experts_per_token"]["max"].get<int64_t>());
    }
  }
}

TEST_CASE("training.time_limit ends the run after the step that passes it, evaluated and saved", "[trainer]") {
  TempDir dir("time_limit");
  json j = tiny_json({{"num_experts", 4}, {"top_k", 2}});
  j["training"]["max_steps"] = 1000000;
  j["training"]["time_limit"] = 0.3;
  TrainOptions o;
  o.out_dir = dir / "run";
  o.quiet = true;
  const TrainResult r = train(config_from_json(j, "time limit"), o);
  CHECK(r.out_of_time);
  CHECK_FALSE(r.interrupted);
  CHECK(r.steps_done > 0);
  CHECK(r.steps_done < 1000000);
  CHECK(r.wall_seconds < 30);
  CHECK(std::isfinite(r.last_val_loss));
  CHECK(std::filesystem::exists(dir / "run/last.safetensors"));
  CHECK_THAT(error_of<ConfigError>([&] {
               json bad = j;
               bad["training"]["time_limit"] = -1;
               config_from_json(bad, "bad");
             }),
             Contains("training.time_limit = -1.0"));
}
