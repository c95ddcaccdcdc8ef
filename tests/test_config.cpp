// Config: makeMoE defaults, JSON round trip, and errors that name the field, value and fix.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "moe/io/config.hpp"

using namespace moe;
using moe_test::error_of;
using moe_test::TempDir;
using moe_test::write_file;
using nlohmann::json;

namespace {

std::string config_error(const json& j) {
  return error_of<ConfigError>([&] { config_from_json(j, "test.json"); });
}

std::string load_error(const std::string& path) { return error_of<ConfigError>([&] { load_config(path); }); }

}  // namespace

TEST_CASE("Config defaults are the makeMoE reference values", "[io][config]") {
  const Config c;
  CHECK(c.data.path == "data/tinyshakespeare.txt");
  CHECK(c.data.train_fraction == 0.9);
  CHECK(c.model.block_size == 32);
  CHECK(c.model.n_embed == 128);
  CHECK(c.model.n_head == 8);
  CHECK(c.model.n_layer == 8);
  CHECK(c.model.dropout == 0.1);
  CHECK(c.model.expert_hidden == 0);
  CHECK(c.model.attn_scale == AttnScale::kHead);
  CHECK(c.model.init == InitKind::kKaimingNormal);
  CHECK(c.model.init_std == 0.02);
  CHECK(c.model.norm == NormKind::kLayerNorm);
  CHECK(c.model.position == PositionKind::kLearned);
  CHECK(c.model.rope_theta == 10000);
  CHECK(c.model.n_kv_head == 0);
  CHECK(c.kv_heads() == c.model.n_head);
  CHECK(c.model.attention_kernel == AttentionKernel::kExact);
  CHECK_FALSE(c.model.qk_norm);
  CHECK(c.model.moe_every == 1);
  CHECK(c.model.dense_first == 0);
  CHECK(c.model.dense_hidden == 0);
  CHECK_FALSE(c.model.tie_embeddings);
  CHECK(c.router.num_experts == 8);
  CHECK(c.router.top_k == 2);
  CHECK(c.router.noisy);
  CHECK_FALSE(c.router.noise_at_eval);
  CHECK(c.optimizer.lr == 1e-3);
  CHECK(c.optimizer.beta1 == 0.9);
  CHECK(c.optimizer.beta2 == 0.999);
  CHECK(c.optimizer.eps == 1e-8);
  CHECK(c.optimizer.weight_decay == 0.01);
  CHECK_FALSE(c.optimizer.exempt_no_decay);
  CHECK(c.optimizer.grad_clip == 0);
  CHECK(c.training.precision == Precision::kFp32);
  CHECK(c.optimizer.schedule == LrSchedule::kConstant);
  CHECK(c.optimizer.warmup_steps == 0);
  CHECK(c.optimizer.min_lr == 0);
  CHECK(c.training.batch_size == 16);
  CHECK(c.training.max_steps == 5000);
  CHECK(c.training.seed == 1337);
  CHECK(c.training.threads == 0);
  CHECK(c.logging.log_interval == 10);
  CHECK(c.logging.eval_interval == 100);
  CHECK(c.logging.eval_iters == 400);
  CHECK(c.logging.checkpoint_interval == 1000);
  CHECK(c.logging.out_dir == "runs/default");

  CHECK(c.head_size() == 16);
  CHECK(c.expert_hidden_size() == 512);
  CHECK(c.attention_scale() == Approx(0.25f));  // head_size^-0.5
  Config e = c;
  e.model.attn_scale = AttnScale::kEmbed;  // makeMoE's quirk
  CHECK(e.attention_scale() == Approx(1 / std::sqrt(128.0)));
  e.model.expert_hidden = 300;
  CHECK(e.expert_hidden_size() == 300);
  CHECK_NOTHROW(validate(c));
}

TEST_CASE("Config round-trips through JSON, missing sections and keys take defaults", "[io][config]") {
  const json defaults = config_to_json(Config{});
  for (const char* section : {"data", "model", "router", "optimizer", "training", "logging"})
    CHECK(defaults.contains(section));
  CHECK(defaults["model"]["n_embed"] == 128);
  CHECK(defaults["router"]["noisy"] == true);
  CHECK(config_to_json(config_from_json(json::object(), "empty")) == defaults);

  Config c;
  c.model.n_layer = 3;
  c.model.attn_scale = AttnScale::kEmbed;
  c.router.noise_at_eval = true;
  c.optimizer.lr = 3e-4;
  c.optimizer.schedule = LrSchedule::kCosine;
  c.logging.out_dir = "runs/x";
  const json j = config_to_json(c);
  const Config back = config_from_json(j, "rt");
  CHECK(config_to_json(back) == j);
  CHECK(back.optimizer.lr == 3e-4);
  CHECK(back.model.attn_scale == AttnScale::kEmbed);
  // Through text too, as a checkpoint stores it.
  CHECK(config_to_json(config_from_json(json::parse(j.dump()), "text")) == j);

  const Config partial = config_from_json({{"model", {{"n_layer", 2}}}, {"router", json::object()}}, "partial");
  CHECK(partial.model.n_layer == 2);
  CHECK(partial.model.n_embed == 128);
  CHECK(partial.training.batch_size == 16);
  CHECK(config_from_json({{"model", {{"n_layer", 4.0}}}}, "x").model.n_layer == 4);  // integral float is fine
}

TEST_CASE("Config errors name the field, the value and what is allowed", "[io][config]") {
  using Catch::Contains;
  CHECK_THAT(config_error({{"model", {{"n_embd", 64}}}}),
             Contains("test.json") && Contains("unknown key 'model.n_embd'; did you mean 'model.n_embed'?"));
  CHECK_THAT(config_error({{"optimizer", {{"weight_decy", 0}}}}), Contains("did you mean 'optimizer.weight_decay'?"));
  CHECK_THAT(config_error({{"model", {{"zzzzzzzz", 1}}}}), Contains("unknown key 'model.zzzzzzzz'") && !Contains("did you mean"));
  CHECK_THAT(config_error({{"modle", json::object()}}), Contains("unknown section 'modle'; did you mean 'model'?"));
  CHECK_THAT(config_error({{"model", 5}}), Contains("section 'model' must be a JSON object"));
  CHECK_THAT(config_error(json::array()), Contains("must be a JSON object"));

  // Wrong JSON types.
  CHECK_THAT(config_error({{"model", {{"n_embed", "big"}}}}), Contains("model.n_embed = \"big\": must be an integer"));
  CHECK_THAT(config_error({{"model", {{"n_embed", 64.5}}}}), Contains("model.n_embed = 64.5: must be an integer"));
  CHECK_THAT(config_error(json::parse(R"({"training": {"seed": 18446744073709551615}})")),
             Contains("training.seed = 18446744073709551615: must be an integer"));
  CHECK_THAT(config_error({{"router", {{"noisy", 1}}}}), Contains("router.noisy = 1: must be a boolean"));
  CHECK_THAT(config_error({{"optimizer", {{"lr", "1e-3"}}}}), Contains("optimizer.lr = \"1e-3\": must be a number"));
  CHECK_THAT(config_error({{"data", {{"path", 3}}}}), Contains("data.path = 3: must be a string"));
  // Every field, given the wrong type, is named by its dotted path (the table covers them all).
  const json all_fields = config_to_json(Config{});
  for (auto& [section, body] : all_fields.items())
    for (auto& [key, value] : body.items()) {
      INFO(section << "." << key);
      CHECK_THAT(config_error({{section, {{key, json::array()}}}}), Contains(section + "." + key + " = []: must be"));
    }

  // Impossible values.
  CHECK_THAT(config_error({{"model", {{"n_embed", 100}, {"n_head", 8}}}}),
             Contains("model.n_embed = 100 must be divisible by model.n_head = 8"));
  CHECK_THAT(config_error({{"router", {{"top_k", 9}}}}), Contains("router.top_k = 9 must be at most router.num_experts = 8"));
  CHECK_THAT(config_error({{"router", {{"top_k", 0}}}}), Contains("router.top_k = 0: must be a positive integer"));
  CHECK_THAT(config_error({{"model", {{"block_size", 0}}}}), Contains("model.block_size = 0: must be a positive integer"));
  CHECK_THAT(config_error({{"training", {{"batch_size", -4}}}}), Contains("training.batch_size = -4: must be a positive integer"));
  CHECK_THAT(config_error({{"model", {{"dropout", 1.0}}}}), Contains("model.dropout = 1.0: must be in [0, 1)"));
  CHECK_THAT(config_error({{"model", {{"dropout", -0.1}}}}), Contains("model.dropout = -0.1: must be in [0, 1)"));
  CHECK_THAT(config_error({{"training", {{"recompute", true}, {"keep_activations", true}}}}),
             Contains("training.recompute and training.keep_activations"));
  CHECK_THAT(config_error({{"data", {{"train_fraction", 1.0}}}}), Contains("data.train_fraction = 1.0: must be in (0, 1)"));
  CHECK_THAT(config_error({{"data", {{"train_fraction", 0}}}}), Contains("data.train_fraction = 0.0: must be in (0, 1)"));
  CHECK_THAT(config_error({{"optimizer", {{"lr", 0}}}}), Contains("optimizer.lr = 0.0: must be a number > 0"));
  CHECK_THAT(config_error({{"optimizer", {{"lr", -1}}}}), Contains("optimizer.lr = -1.0"));
  CHECK_THAT(config_error({{"optimizer", {{"beta2", 1}}}}), Contains("optimizer.beta2 = 1.0: must be in [0, 1)"));
  CHECK_THAT(config_error({{"optimizer", {{"min_lr", 0.1}}}}), Contains("optimizer.min_lr = 0.1 must not exceed optimizer.lr"));
  // Values from the file are quoted without recursing into them (found by fuzz_config: dump()
  // of [[[...]]] 60000 deep overflowed the stack); long ones are cut.
  const std::string deep = std::string(60000, '[') + std::string(60000, ']');
  CHECK_THAT(error_of<ConfigError>([&] { parse_config(R"({"data": )" + deep + "}", "deep.json"); }),
             Contains("deep.json: section 'data' must be a JSON object, got an array nested over 64 levels deep"));
  CHECK_THAT(error_of<ConfigError>([&] { parse_config(R"({"data": {"path": )" + deep + "}}", "deep.json"); }),
             Contains("data.path = an array nested over 64 levels deep: must be a string"));
  CHECK_THAT(config_error({{"data", {{"path", std::vector<int>(1000, 7)}}}}),
             Contains("data.path = [7,7,7") && Contains(",7...: must be a string"));
  // Sizes whose products would overflow int64 (found by tests/fuzz/fuzz_config.cpp: 4 * n_embed overflowed).
  CHECK_THAT(config_error({{"model", {{"n_embed", 4444444444666660112LL}, {"n_head", 1}}}}),
             Contains("the model is too large") && Contains("over the limit of 2^40"));
  CHECK_THAT(config_error({{"model", {{"block_size", 1 << 20}}}, {"training", {{"batch_size", 1 << 20}}}}),
             Contains("the model is too large: batch_size * "));

  // Unknown enum strings list the allowed ones.
  CHECK_THAT(config_error({{"optimizer", {{"schedule", "linear"}}}}),
             Contains("optimizer.schedule = \"linear\": must be one of \"constant\" \"cosine\""));
  CHECK_THAT(config_error({{"model", {{"attn_scale", "both"}}}}), Contains("model.attn_scale = \"both\"") && Contains("\"embed\""));
  CHECK_THAT(config_error({{"model", {{"init", "he"}}}}),
             Contains("model.init = \"he\": must be one of \"kaiming_normal\" \"xavier\" \"normal\""));
  CHECK_THAT(config_error({{"router", {{"gating", "sigmoid"}}}}),
             Contains("router.gating = \"sigmoid\": must be one of \"topk_softmax\" \"softmax_topk\" \"sigmoid_topk\""));
  // Group-limited routing and the sigmoid gating's scale.
  CHECK_THAT(config_error({{"router", {{"num_experts", 8}, {"n_groups", 3}}}}),
             Contains("router.num_experts = 8 must be a multiple of router.n_groups = 3"));
  CHECK_THAT(config_error({{"router", {{"num_experts", 8}, {"n_groups", 4}, {"topk_groups", 5}}}}),
             Contains("router.topk_groups = 5 must be at most router.n_groups = 4"));
  CHECK_THAT(config_error({{"router", {{"num_experts", 8}, {"top_k", 3}, {"n_groups", 4}, {"topk_groups", 1}}}}),
             Contains("router.top_k = 3 must be at most the experts of the chosen groups"));
  CHECK_THAT(config_error({{"router", {{"route_scale", 2.0}}}}),
             Contains("router.route_scale applies to router.gating = \"sigmoid_topk\" only"));
  CHECK_THAT(config_error({{"router", {{"jitter", 1.5}}}}), Contains("router.jitter = 1.5: must be in [0, 1)"));
  // training.precision: fp32 or bf16, spelt so.
  CHECK_THAT(config_error({{"training", {{"precision", "fp16"}}}}),
             Contains("training.precision = \"fp16\": must be one of \"fp32\" \"bf16\""));
  CHECK_THAT(config_error({{"training", {{"precision", "BF16"}}}}), Contains("must be one of \"fp32\" \"bf16\""));
  CHECK_THAT(config_error({{"training", {{"precision", 16}}}}), Contains("training.precision = 16: must be"));
  CHECK_THAT(config_error({{"training", {{"precison", "bf16"}}}}), Contains("did you mean 'training.precision'?"));
  // Attention and norm options.
  CHECK_THAT(config_error({{"model", {{"norm", "batchnorm"}}}}),
             Contains("model.norm = \"batchnorm\": must be one of \"layernorm\" \"rmsnorm\""));
  CHECK_THAT(config_error({{"model", {{"position", "alibi"}}}}),
             Contains("model.position = \"alibi\": must be one of \"learned\" \"rope\""));
  CHECK_THAT(config_error({{"model", {{"rope_theta", 0}}}}), Contains("model.rope_theta = 0.0: must be a number > 0"));
  CHECK_THAT(config_error({{"model", {{"rope_theta", -5}}}}), Contains("model.rope_theta = -5.0: must be a number > 0"));
  CHECK_THAT(config_error({{"model", {{"n_kv_head", -1}}}}), Contains("model.n_kv_head = -1: must be >= 0"));
  CHECK_THAT(config_error({{"model", {{"n_head", 8}, {"n_kv_head", 3}}}}),
             Contains("model.n_head = 8 must be a multiple of model.n_kv_head = 3"));
  CHECK_THAT(config_error({{"model", {{"n_head", 8}, {"n_kv_head", 16}}}}),
             Contains("model.n_kv_head = 16 must be at most model.n_head = 8"));
  CHECK_THAT(config_error({{"model", {{"n_embed", 24}, {"n_head", 8}, {"position", "rope"}}}}),
             Contains("model.position = \"rope\" needs an even head size (n_embed / n_head), got 3"));
  CHECK_NOTHROW(config_from_json({{"model", {{"n_embed", 24}, {"n_head", 8}}}}, "odd head, learned positions"));
  const Config gqa = config_from_json({{"model", {{"n_head", 8}, {"n_kv_head", 2}, {"position", "rope"}, {"norm", "rmsnorm"},
                                                  {"qk_norm", true}, {"rope_theta", 500}}}},
                                      "gqa");
  CHECK(gqa.kv_heads() == 2);
  CHECK(config_from_json(config_to_json(gqa), "round trip").model.position == PositionKind::kRope);
  CHECK_THAT(config_error({{"model", {{"attention_kernel", "flash"}}}}),
             Contains("model.attention_kernel = \"flash\": must be one of \"exact\" \"tiled\""));
  const Config tiled = config_from_json({{"model", {{"attention_kernel", "tiled"}}}}, "tiled");
  CHECK(config_from_json(config_to_json(tiled), "round trip").model.attention_kernel == AttentionKernel::kTiled);

  // Where the MoE layers go, the dense blocks' width.
  CHECK_THAT(config_error({{"model", {{"moe_every", 0}}}}), Contains("model.moe_every = 0: must be a positive integer"));
  CHECK_THAT(config_error({{"model", {{"moe_every", -2}}}}), Contains("model.moe_every = -2: must be a positive integer"));
  CHECK_THAT(config_error({{"model", {{"dense_first", -1}}}}), Contains("model.dense_first = -1: must be >= 0"));
  CHECK_THAT(config_error({{"model", {{"dense_first", 9}}}}),
             Contains("model.dense_first = 9 must be at most model.n_layer = 8 (n_layer: an all-dense model)"));
  CHECK_THAT(config_error({{"model", {{"dense_hidden", -64}, {"moe_every", 2}}}}),
             Contains("model.dense_hidden = -64: must be >= 0"));
  CHECK_THAT(config_error({{"model", {{"dense_hidden", 256}}}}),
             Contains("model.dense_hidden = 256 applies to dense blocks only, and every block is MoE"));
  CHECK_THAT(config_error({{"model", {{"n_layer", 4}, {"moe_every", 8}, {"dense_first", 1}}}}),
             Contains("model.moe_every = 8 with model.dense_first = 1 leaves no MoE block among the 4") &&
                 Contains("for an all-dense model set model.dense_first = model.n_layer"));
  CHECK_THAT(config_error({{"model", {{"tie_embeddings", 1}}}}), Contains("model.tie_embeddings = 1: must be a boolean"));

  // validate() checks a struct built in code the same way.
  Config c;
  c.model.n_head = 3;
  CHECK_THROWS_WITH(validate(c), Contains("model.n_embed = 128 must be divisible by model.n_head = 3"));
}

TEST_CASE("model.moe_every and model.dense_first place the MoE blocks as DeepSeek-V3 and nanoMoE do", "[io][config]") {
  // Block l is MoE when l >= dense_first and l % moe_every == 0.
  const auto layout = [](int64_t n_layer, int64_t every, int64_t first) {
    Config c;
    c.model.n_layer = n_layer, c.model.moe_every = every, c.model.dense_first = first;
    validate(c);
    std::string s;
    for (int64_t l = 0; l < n_layer; ++l) s += c.moe_block(l) ? 'M' : 'd';
    CHECK(int64_t(std::count(s.begin(), s.end(), 'M')) == c.moe_blocks());
    return s;
  };
  CHECK(layout(8, 1, 0) == "MMMMMMMM");  // the default: every block
  CHECK(layout(8, 2, 0) == "MdMdMdMd");  // nanoMoE's stride 2
  CHECK(layout(8, 1, 3) == "dddMMMMM");  // DeepSeek-V3's first three dense
  CHECK(layout(8, 2, 3) == "ddddMdMd");  // both: DeepSeek's rule counts from block 0
  CHECK(layout(4, 8, 0) == "Mddd");
  CHECK(layout(4, 1, 4) == "dddd");      // all dense
  CHECK(layout(4, 3, 4) == "dddd");
  // The closed-form count agrees with the rule far beyond any model (validate needs it before
  // it has refused absurd sizes).
  Config big;
  big.model.n_layer = int64_t(1) << 60, big.model.moe_every = 3, big.model.dense_first = 5;
  CHECK(big.moe_blocks() == ((int64_t(1) << 60) - 1) / 3 + 1 - 2);
}

TEST_CASE("load_config names the file, and the line and column of invalid JSON", "[io][config]") {
  using Catch::Contains;
  TempDir d("config");
  const std::string bad = d / "bad.json";
  write_file(bad, "{\n  \"model\": {\n    \"n_embed\": 64,,\n  }\n}\n");
  CHECK_THAT(load_error(bad), Contains(bad) && Contains("invalid JSON at line 3, column 19"));
  write_file(d / "bad2.json", "{\"model\": {\"n_layer\": 2}");  // unterminated
  CHECK_THAT(load_error(d / "bad2.json"), Contains("invalid JSON at line 1"));
  write_file(d / "empty.json", "  \n");
  CHECK_THAT(load_error(d / "empty.json"), Contains(d / "empty.json") && Contains("empty"));
  CHECK_THAT(load_error(d / "missing.json"), Contains(d / "missing.json") && Contains("cannot open") && Contains("No such file"));
  CHECK_THAT(load_error(d.path.string()), Contains("is a directory"));
  write_file(d / "typo.json", R"({"model": {"n_embd": 64}})");
  CHECK_THAT(load_error(d / "typo.json"), Contains(d / "typo.json") && Contains("did you mean 'model.n_embed'?"));
  write_file(d / "good.json", R"({"model": {"n_layer": 2}, "optimizer": {"schedule": "cosine"}})");
  const Config c = load_config(d / "good.json");
  CHECK(c.model.n_layer == 2);
  CHECK(c.optimizer.schedule == LrSchedule::kCosine);
  CHECK(c.model.n_embed == 128);
}
