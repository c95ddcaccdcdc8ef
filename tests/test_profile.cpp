// The step profiler (moe/tensor/profile.hpp): parts tagged by the ops, forward and backward,
// adding up to the wall time; off, it charges nothing.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "cli_util.hpp"
#include "moe/ops/ops.hpp"
#include "moe/tensor/profile.hpp"

using namespace moe;
namespace fs = std::filesystem;

namespace {
// A linear layer, a layernorm and a sum over [64, 256] floats, with gradients.
void run_step(Graph& g) {
  g.clear();
  Tensor x = g.new_tensor({64, 256}, true), w = g.new_tensor({256, 256}, true), b = g.new_tensor({256}, true);
  Tensor lw = g.new_tensor({256}, true), lb = g.new_tensor({256}, true);
  for (Tensor* t : {&x, &w, &b, &lw, &lb})
    for (int64_t i = 0; i < t->numel(); ++i) t->data[i] = 0.01f * float(i % 17) - 0.05f;
  const Tensor y = layernorm(g, linear(g, x, w, b), lw, lb, 1e-5f);
  g.backward(sum(g, y));
}
}  // namespace

TEST_CASE("step profiler: parts by op, forward and backward, adding up to the wall time", "[profile]") {
  Graph g;
  run_step(g);
  const StepProfile before = profile_result();
  run_step(g);  // off: nothing is charged
  for (int ph = 0; ph < int(Phase::Count); ++ph)
    for (int p = 0; p < int(Part::Count); ++p) CHECK(profile_result().ms[ph][p] == before.ms[ph][p]);

  using Clock = std::chrono::steady_clock;
  const auto ms = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  // The profile covers [start, stop]: at least the inner interval, at most the outer one.
  const auto outer0 = Clock::now();
  profile_start();
  const auto inner0 = Clock::now();
  for (int i = 0; i < 3; ++i) run_step(g);
  const auto inner1 = Clock::now();
  profile_stop();
  run_step(g);  // stopped: not counted
  const auto outer1 = Clock::now();
  profile_continue();
  const auto inner2 = Clock::now();
  for (int i = 0; i < 2; ++i) run_step(g);
  const auto inner3 = Clock::now();
  profile_stop();
  const auto outer2 = Clock::now();
  const StepProfile& r = profile_result();
  CHECK(r.ms[int(Phase::Forward)][int(Part::GemmDense)] > 0);
  CHECK(r.ms[int(Phase::Backward)][int(Part::GemmDense)] > 0);
  CHECK(r.ms[int(Phase::Forward)][int(Part::Norm)] > 0);
  CHECK(r.ms[int(Phase::Backward)][int(Part::Norm)] > 0);
  CHECK(r.ms[int(Phase::Forward)][int(Part::Elementwise)] > 0);  // the sum
  CHECK(r.ms[int(Phase::Backward)][int(Part::Zeroing)] > 0);     // the gradients, zeroed by backward()
  CHECK(r.part_ms(Part::GemmExpert) == 0);
  CHECK(r.part_ms(Part::Attention) == 0);
  // Exclusive times: they add up to the time profiled, no more.
  CHECK(r.total_ms() >= ms(inner0, inner1) + ms(inner2, inner3));
  CHECK(r.total_ms() <= ms(outer0, outer1) + ms(outer1, outer2));
  CHECK(current_part() == Part::Other);  // every scope closed
}

TEST_CASE("moe bench --profile: every part, per step, as text and JSON", "[profile][cli]") {
  const fs::path dir = fs::temp_directory_path() / "moe_test_profile";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string data = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";
  std::ofstream(dir / "c.json") << R"({"data": {"path": ")" << data << R"("},
    "model": {"block_size": 8, "n_embed": 16, "n_head": 2, "n_layer": 2},
    "router": {"num_experts": 4, "top_k": 2, "noisy": true},
    "training": {"batch_size": 4, "max_steps": 12}})";
  const std::string cfg = (dir / "c.json").string();
  const moe_test::Run j = moe_test::run_moe("bench --config " + cfg + " --steps 3 --generate 0 --profile --json");
  INFO(j.out);
  REQUIRE(j.code == 0);
  const auto prof = nlohmann::json::parse(j.out.substr(j.out.find('{')))["profile"];
  REQUIRE(prof["parts"].size() == size_t(Part::Count));
  double sum = 0, share = 0;
  for (const auto& p : prof["parts"]) {
    CHECK(p["ms"].get<double>() == Approx(p["forward_ms"].get<double>() + p["backward_ms"].get<double>()));
    sum += p["ms"].get<double>();
    share += p["share"].get<double>();
  }
  const auto ms_of = [&](const char* name) {
    for (const auto& p : prof["parts"])
      if (p["part"] == name) return p["ms"].get<double>();
    FAIL("no part " << name);
    return 0.0;
  };
  for (const char* part : {"gemm_dense", "gemm_expert", "attention", "routing", "gather_scatter", "norm",
                           "elementwise", "loss", "optimizer", "zeroing"})
    CHECK(ms_of(part) > 0);
  CHECK(sum == Approx(prof["parts_ms"].get<double>()));
  // The parts cover the timed steps (from just before each step's clock to just after).
  CHECK(sum >= prof["step_ms_mean"].get<double>());
  CHECK(sum == Approx(prof["step_ms_mean"].get<double>()).epsilon(0.02).margin(0.05));
  CHECK(share == Approx(sum / prof["step_ms_mean"].get<double>()));

  const moe_test::Run t = moe_test::run_moe("bench --config " + cfg + " --steps 2 --generate 0 --profile");
  REQUIRE(t.code == 0);
  CHECK_THAT(t.out, Catch::Contains("step profile") && Catch::Contains("gemm_expert") && Catch::Contains("optimizer"));
  const moe_test::Run plain = moe_test::run_moe("bench --config " + cfg + " --steps 1 --generate 0 --json");
  CHECK_THAT(plain.out, !Catch::Contains("\"profile\""));
  fs::remove_all(dir);
}
