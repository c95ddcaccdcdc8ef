// Learning-rate schedule, gradient clipping, and the moe binary's verbs end to end.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cli_util.hpp"
#include "io_test_util.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/train/bench.hpp"

using namespace moe;
namespace fs = std::filesystem;

TEST_CASE("learning-rate schedules", "[optim]") {
  OptimizerConfig c;
  c.lr = 1e-3;
  CHECK(learning_rate(c, 0, 100) == Approx(1e-3));
  CHECK(learning_rate(c, 99, 100) == Approx(1e-3));
  c.schedule = LrSchedule::kCosine;
  c.warmup_steps = 10;
  c.min_lr = 1e-4;
  CHECK(learning_rate(c, 0, 110) == Approx(1e-4));   // warmup: (step + 1) / warmup · lr
  CHECK(learning_rate(c, 9, 110) == Approx(1e-3));
  CHECK(learning_rate(c, 10, 110) == Approx(1e-3));  // cosine starts at lr
  CHECK(learning_rate(c, 60, 110) == Approx(5.5e-4));  // halfway: (lr + min_lr) / 2
  CHECK(learning_rate(c, 110, 110) == Approx(1e-4));   // floor
}

TEST_CASE("gradient clipping by global norm", "[optim]") {
  ParamStore ps;
  int a = ps.add("a", {2});
  int b = ps.add("b", {1});
  ps.finalize();
  ps.get(a).grad[0] = 3;
  ps.get(a).grad[1] = 0;
  ps.get(b).grad[0] = 4;
  CHECK(clip_grad_norm(ps, 0) == Approx(5));  // 0: measure only
  CHECK(ps.get(b).grad[0] == 4);
  CHECK(clip_grad_norm(ps, 1.0) == Approx(5));
  CHECK(ps.get(a).grad[0] == Approx(0.6));
  CHECK(ps.get(b).grad[0] == Approx(0.8));
}

using moe_test::Run;

namespace {

Run run(const std::string& args) { return moe_test::run_moe(args); }

}  // namespace

TEST_CASE("moe train, generate and eval from the command line", "[cli]") {
  const moe_test::TempDir tmp_dir("cli");  // per process: suites running at once do not share it
  const fs::path dir = tmp_dir.path;
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string data = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";
  std::ofstream(dir / "c.json") << R"({"data": {"path": ")" << data << R"("},
    "model": {"block_size": 8, "n_embed": 16, "n_head": 2, "n_layer": 1},
    "router": {"num_experts": 4, "top_k": 2},
    "training": {"batch_size": 4, "max_steps": 12},
    "logging": {"log_interval": 4, "eval_interval": 6, "eval_iters": 2, "checkpoint_interval": 6}})";
  const std::string out = (dir / "run").string();
  Run t = run("train --config " + (dir / "c.json").string() + " --out " + out);
  INFO(t.out);
  REQUIRE(t.code == 0);
  CHECK_THAT(t.out, Catch::Contains("step 12/12") && Catch::Contains("tok/s") && Catch::Contains("ETA"));
  for (const char* f : {"best.safetensors", "last.safetensors", "step_6.safetensors", "metrics.jsonl", "config.json"})
    CHECK(fs::exists(fs::path(out) / f));

  const std::string ckpt = out + "/last.safetensors";
  Run g1 = run("generate --checkpoint " + ckpt + " --prompt 'First' --max-new-tokens 40 --seed 3");
  Run g2 = run("generate --checkpoint " + ckpt + " --prompt 'First' --max-new-tokens 40 --seed 3");
  REQUIRE(g1.code == 0);
  CHECK(g1.out == g2.out);
  CHECK(g1.out.rfind("First", 0) == 0);
  // --profile: the same text, then where the time went (stderr), every part named.
  Run gp = run("generate --checkpoint " + ckpt + " --prompt 'First' --max-new-tokens 40 --seed 3 --profile");
  INFO(gp.out);
  REQUIRE(gp.code == 0);
  CHECK(gp.out.rfind(g1.out, 0) == 0);
  for (const char* part : {"moe generate --profile: 40 characters", "load", "checksum", "one-position decodes",
                           "decodes of several positions", "embeddings", "norms+residual", "attention", "router",
                           "experts", "thread wait", "head", "sampling"})
    CHECK_THAT(gp.out, Catch::Contains(part));
  Run bad_char = run("generate --checkpoint " + ckpt + " --prompt 'héllo'");
  CHECK(bad_char.code != 0);
  CHECK_THAT(bad_char.out, Catch::Contains("prompt") && Catch::Contains("U+00E9"));
  Run bad_p = run("generate --checkpoint " + ckpt + " --top-p 1.5");
  CHECK(bad_p.code != 0);
  CHECK_THAT(bad_p.out, Catch::Contains("--top-p must be in (0, 1]"));

  Run e = run("eval --checkpoint " + ckpt + " --json");
  INFO(e.out);
  REQUIRE(e.code == 0);
  CHECK_THAT(e.out, Catch::Contains("\"perplexity\"") && Catch::Contains("\"expert_usage\""));

  Run b = run("bench --config " + (dir / "c.json").string() + " --steps 2 --generate 20 --json");
  INFO(b.out);
  REQUIRE(b.code == 0);
  CHECK_THAT(b.out, Catch::Contains("\"step_ms_median\"") && Catch::Contains("\"generate_chars_per_s\"") &&
                        Catch::Contains("\"peak_rss_mb\""));
  {  // the memory breakdown: moments are two copies of the parameters, the arenas hold something;
    // without clipping AdamW runs group by group, so the gradients are those of the block
    const auto mem = nlohmann::json::parse(b.out.substr(b.out.find('{')))["memory_mb"];
    CHECK(mem["parameters"].get<double>() > 0);
    CHECK(mem["gradients"].get<double>() > 0);
    CHECK(mem["gradients"].get<double>() < mem["parameters"].get<double>());
    CHECK(mem["adamw_moments"].get<double>() == 2 * mem["parameters"].get<double>());
    CHECK(mem["activations"].get<double>() > 0);
    CHECK(mem["activation_gradients"].get<double>() > 0);
  }
  // moe bounds OpenMP's spinning at barriers unless the user chose a policy.
  CHECK_THAT(b.out, Catch::Contains("\"openmp_wait\":\"GOMP_SPINCOUNT=10000\""));
  Run b2 = moe_test::run_moe("bench --config " + (dir / "c.json").string() + " --steps 1 --generate 0 --json",
                             "OMP_WAIT_POLICY=passive");
  CHECK_THAT(b2.out, Catch::Contains("\"openmp_wait\":\"OMP_WAIT_POLICY=passive\""));

  Run missing = run("eval --checkpoint " + (dir / "nope.safetensors").string());
  CHECK(missing.code != 0);
  CHECK_THAT(missing.out, Catch::Contains("nope.safetensors") && Catch::Contains("cannot open"));
  Run bad_cfg = run("train --config " + (dir / "missing.json").string());
  CHECK(bad_cfg.code != 0);
  CHECK_THAT(bad_cfg.out, Catch::Contains("missing.json"));
  fs::remove_all(dir);
}

TEST_CASE("analytic FLOPs of the makeMoE reference step", "[bench]") {
  // Per token and layer: qkv 98304 + proj 32768 + attention 16384 + router 4096 + 2 experts 524288;
  // 8 layers + lm_head 16640 = 5,423,360 per token, times 16 x 32 tokens.
  Config c;
  CHECK(forward_flops(c, 65) == 2776760320.0);
  CHECK(3 * forward_flops(c, 65) / 1e9 == Approx(8.33).epsilon(0.001));  // the reference's "about 8.3 GFLOP"
  // Blocks 0, 2, 4, 6 MoE, the others dense (fc1 and fc2 of 4·128, 262144 a token): four
  // layers' router and experts (528384) traded for four dense feed-forwards. A tied head costs the same.
  c.model.moe_every = 2;
  c.model.tie_embeddings = true;
  CHECK(forward_flops(c, 65) == 2776760320.0 - 4 * (528384.0 - 262144.0) * 16 * 32);
}
