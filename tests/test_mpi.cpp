// Training across processes: `mpirun -np 2 moe train` against one process with the whole
// batch. Built when moe is built with MPI (MOE_HAVE_MPI); the runs use --oversubscribe so
// that two ranks fit on any machine.
#include <catch2/catch.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "cli_util.hpp"
#include "io_test_util.hpp"
#include "moe/train/checkpoint.hpp"

#ifdef MOE_HAVE_MPI

using namespace moe_test;

namespace {

const std::string kData = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";

// Everything that draws random numbers or couples the ranks is on: dropout (attention,
// residual and inside the experts), router noise, the aux and z losses, the balancing bias.
// model_extra: more model fields (`, "name": value` each).
std::string config_json(int64_t batch, int64_t steps, int64_t experts = 4, const std::string& model_extra = "") {
  return R"({"data": {"path": ")" + kData + R"("},
    "model": {"block_size": 16, "n_embed": 32, "n_head": 4, "n_layer": 2, "dropout": 0.1)" + model_extra + R"(},
    "router": {"num_experts": )" + std::to_string(experts) + R"(, "top_k": 2, "noisy": true,
               "aux_loss_coef": 0.01, "z_loss_coef": 0.001, "bias_update_rate": 0.001},
    "optimizer": {"lr": 3e-3, "grad_clip": 1.0},
    "training": {"batch_size": )" + std::to_string(batch) + R"(, "max_steps": )" + std::to_string(steps) +
         R"(, "seed": 7, "threads": 1},
    "logging": {"log_interval": 1, "eval_interval": 1000, "eval_iters": 2, "checkpoint_interval": 10}})";
}

// `moe args` on `ranks` processes (plain `moe` for 1), one thread each unless one_thread is
// false (then moe chooses). Root may run mpirun in containers.
Run moe_on(int ranks, const std::string& args, bool one_thread = true) {
  if (ranks == 1) return run_moe(args);
  return run_shell("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 mpirun -np " +
                   std::to_string(ranks) + " --oversubscribe --bind-to none " +
                   (one_thread ? "-x OMP_NUM_THREADS=1 " : "") + std::string(MOE_BINARY) + " " + args);
}

// The training loss of every step in a run's metrics.jsonl, by step.
std::vector<double> losses(const std::string& metrics) {
  std::vector<double> out;
  std::ifstream f(metrics);
  for (std::string line; std::getline(f, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    out.resize(size_t(j["step"].get<int64_t>()));
    out.back() = j["loss"].get<double>();
  }
  return out;
}

void check_same_losses(const std::vector<double>& a, const std::vector<double>& b, size_t steps) {
  REQUIRE(a.size() == steps);
  REQUIRE(b.size() == steps);
  double worst = 0;
  for (size_t i = 0; i < steps; ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  INFO("largest loss difference over " << steps << " steps: " << worst);
  CHECK(worst < 1e-5);
}

// `moe eval --json` loss of a checkpoint on the validation split.
double eval_loss(const std::string& checkpoint) {
  const Run r = run_moe("eval --checkpoint " + checkpoint + " --json");
  INFO(r.out);
  REQUIRE(r.code == 0);
  return nlohmann::json::parse(r.out.substr(r.out.find('{')))["loss"].get<double>();
}

// The runs "one" (1 rank), "dp" and "ep" (2 ranks, data and expert parallel) under d trained
// alike: the same losses over `steps`, and whole models with the same eval loss (rank 0 wrote
// them; under expert parallelism with the other rank's experts).
void check_one_dp_ep_alike(const TempDir& d, size_t steps) {
  const std::vector<double> l1 = losses(d / "one/metrics.jsonl");
  check_same_losses(l1, losses(d / "dp/metrics.jsonl"), steps);
  check_same_losses(l1, losses(d / "ep/metrics.jsonl"), steps);
  const double e1 = eval_loss(d / "one/last.safetensors");
  CHECK(std::abs(eval_loss(d / "dp/last.safetensors") - e1) < 1e-4);
  CHECK(std::abs(eval_loss(d / "ep/last.safetensors") - e1) < 1e-4);
}

// Trains "one" (1 rank, b8.json) and "dp" (2 data-parallel ranks, b4.json) under d, both to
// the end; the data-parallel run's output.
std::string train_one_and_dp(const TempDir& d) {
  const Run one = moe_on(1, "train --config " + (d / "b8.json") + " --out " + (d / "one"));
  INFO(one.out);
  REQUIRE(one.code == 0);
  const Run dp = moe_on(2, "train --config " + (d / "b4.json") + " --out " + (d / "dp"));
  INFO(dp.out);
  REQUIRE(dp.code == 0);
  return dp.out;
}

}  // namespace

TEST_CASE("2 ranks with batch B train like 1 rank with batch 2B, data and expert parallel", "[mpi]") {
  // And with the attention and norm options (the attention is replicated on every rank).
  const std::string extra = GENERATE(as<std::string>{}, "",
                                     R"(, "position": "rope", "n_kv_head": 2, "norm": "rmsnorm", "qk_norm": true)");
  INFO("model options" << extra);
  TempDir d("mpi_same");
  write_file(d / "b8.json", config_json(8, 20, 4, extra));
  write_file(d / "b4.json", config_json(4, 20, 4, extra));
  const std::string dp_out = train_one_and_dp(d);
  CHECK_THAT(dp_out, Catch::Contains("data parallel over 2 processes") && Catch::Contains("batch 4 per process, 8 in all"));
  const Run ep = moe_on(2, "train --config " + (d / "b4.json") + " --out " + (d / "ep") + " --expert-parallel");
  INFO(ep.out);
  REQUIRE(ep.code == 0);
  CHECK_THAT(ep.out, Catch::Contains("expert parallel over 2 processes"));

  check_one_dp_ep_alike(d, 20);
}

TEST_CASE("dense blocks and a tied head under 2 ranks: data and expert parallel train like 1 rank", "[mpi]") {
  // Blocks MoE, dense, MoE (the dense feed-forward replicated like attention, its gradients
  // summed), a tied head; then an all-dense model data parallel, and refused expert parallel.
  TempDir d("mpi_layout");
  const std::string mixed = R"(, "n_layer": 3, "moe_every": 2, "dense_hidden": 48, "tie_embeddings": true)";
  const std::string dense = R"(, "dense_first": 2)";
  write_file(d / "b8.json", config_json(8, 12, 4, mixed));
  write_file(d / "b4.json", config_json(4, 12, 4, mixed));
  write_file(d / "dense8.json", config_json(8, 12, 4, dense));
  write_file(d / "dense4.json", config_json(4, 12, 4, dense));
  for (const auto& [name, config, ranks, flags] :
       {std::tuple{"one", "b8", 1, ""}, std::tuple{"dp", "b4", 2, ""}, std::tuple{"ep", "b4", 2, " --expert-parallel"},
        std::tuple{"dense_one", "dense8", 1, ""}, std::tuple{"dense_dp", "dense4", 2, ""}}) {
    const Run r = moe_on(ranks, "train --config " + (d / (std::string(config) + ".json")) + " --out " + (d / name) + flags);
    INFO(name << ": " << r.out);
    REQUIRE(r.code == 0);
  }
  check_one_dp_ep_alike(d, 12);
  check_same_losses(losses(d / "dense_one/metrics.jsonl"), losses(d / "dense_dp/metrics.jsonl"), 12);
  const Run ep = moe_on(2, "train --config " + (d / "dense4.json") + " --out " + (d / "dense_ep") + " --expert-parallel");
  CHECK(ep.code != 0);
  CHECK_THAT(ep.out, Catch::Contains("expert parallelism needs MoE blocks, and this model is all dense"));
}

TEST_CASE("relu routing and expert choice under 2 ranks, data and expert parallel", "[mpi]") {
  // relu: the L1 coefficient reads the global batch's counts, so 2 ranks of B train like 1 of 2B.
  // Expert choice: each rank chooses within its own batch (documented), so 2 ranks differ from
  // 1 rank, but data and expert parallel agree, and the thresholds are the same on every rank.
  for (const char* gating : {"relu", "expert_choice"}) {
    INFO("gating " << gating);
    TempDir d(std::string("mpi_") + gating);
    for (const int64_t batch : {8, 4}) {
      nlohmann::json j = nlohmann::json::parse(config_json(batch, 10));
      j["router"] = {{"num_experts", 4}, {"top_k", 2}, {"noisy", false}, {"gating", gating}};
      if (std::string(gating) == "expert_choice") j["router"]["capacity_factor"] = 1.0;
      write_file(d / ("b" + std::to_string(batch) + ".json"), j.dump());
    }
    for (const auto& [name, config, ranks, flags] :
         {std::tuple{"one", "b8", 1, ""}, std::tuple{"dp", "b4", 2, ""}, std::tuple{"ep", "b4", 2, " --expert-parallel"}}) {
      const Run r = moe_on(ranks, "train --config " + (d / (std::string(config) + ".json")) + " --out " + (d / name) + flags);
      INFO(name << ": " << r.out);
      REQUIRE(r.code == 0);
    }
    const std::vector<double> dp = losses(d / "dp/metrics.jsonl");
    check_same_losses(dp, losses(d / "ep/metrics.jsonl"), 10);
    if (std::string(gating) == "relu") check_same_losses(losses(d / "one/metrics.jsonl"), dp, 10);
    CHECK(std::abs(eval_loss(d / "dp/last.safetensors") - eval_loss(d / "ep/last.safetensors")) < 1e-4);
  }
}

TEST_CASE("resume with a different number of ranks continues the same run", "[mpi]") {
  TempDir d("mpi_resume");
  write_file(d / "b8.json", config_json(8, 20));
  write_file(d / "b4.json", config_json(4, 20));
  write_file(d / "b4_10.json", config_json(4, 10));
  write_file(d / "b8_10.json", config_json(8, 10));
  REQUIRE(moe_on(1, "train --config " + (d / "b8.json") + " --out " + (d / "straight")).code == 0);
  const std::vector<double> straight = losses(d / "straight/metrics.jsonl");

  // 2 expert-parallel ranks for 10 steps, then 1 rank with the same global batch.
  REQUIRE(moe_on(2, "train --config " + (d / "b4_10.json") + " --out " + (d / "a") + " --expert-parallel").code == 0);
  const Run a = moe_on(1, "train --config " + (d / "b8.json") + " --out " + (d / "a") + " --resume " +
                              (d / "a/last.safetensors"));
  INFO(a.out);
  REQUIRE(a.code == 0);
  check_same_losses(straight, losses(d / "a/metrics.jsonl"), 20);

  // 1 rank for 10 steps, then 2 data-parallel ranks.
  REQUIRE(moe_on(1, "train --config " + (d / "b8_10.json") + " --out " + (d / "b")).code == 0);
  const Run b = moe_on(2, "train --config " + (d / "b4.json") + " --out " + (d / "b") + " --resume " +
                              (d / "b/last.safetensors"));
  INFO(b.out);
  REQUIRE(b.code == 0);
  check_same_losses(straight, losses(d / "b/metrics.jsonl"), 20);
}

TEST_CASE("a signal to one rank stops every rank after the same step, with the last checkpoint", "[mpi][reliability]") {
  TempDir d("mpi_signal");
  std::string cfg = config_json(4, 1000000);
  // Only best.safetensors (step 0) and last.safetensors: the latter exists only if rank 0 stopped.
  cfg.replace(cfg.find("\"checkpoint_interval\": 10"), 25, "\"checkpoint_interval\": 0");
  write_file(d / "c.json", cfg);
  // SIGINT to rank 1 alone, found by the rank mpirun puts in its environment. Rank 0 learns of
  // it from the step's all-reduce; without that it would wait for rank 1 in the next step
  // until the timeout, and never write last.safetensors.
  const std::string run = d / "run";
  const Run r = run_shell(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 60 mpirun -np 2 --oversubscribe "
      "--bind-to none -x OMP_NUM_THREADS=1 " + std::string(MOE_BINARY) + " train --config " + (d / "c.json") +
      " --out " + run + R"( > /dev/null 2>&1 & mp=$!; sleep 2;
      for p in /proc/[0-9]*; do
        grep -qsaF -- ')" + run + R"(' $p/cmdline && tr '\0' '\n' < $p/environ 2>/dev/null |
          grep -qx OMPI_COMM_WORLD_RANK=1 && kill -INT ${p#/proc/}
      done
      wait $mp; echo exit=$?)");
  INFO(r.out);
  CHECK_THAT(r.out, Catch::Contains("exit="));
  CHECK_THAT(r.out, !Catch::Contains("exit=124"));  // not the timeout: no rank was left waiting
  moe::CheckpointHeader h;
  REQUIRE_NOTHROW(h = moe::read_checkpoint_header(d / "run/last.safetensors"));
  CHECK(h.state.step > 0);
  CHECK(h.state.step < 1000000);
  // Rank 0 logged every step up to the one both stopped after.
  CHECK(int64_t(losses(d / "run/metrics.jsonl").size()) == h.state.step);
}

TEST_CASE("ranks on one machine share its cores unless told otherwise", "[mpi]") {
  TempDir d("mpi_threads");
  std::string cfg = config_json(4, 2);
  cfg.replace(cfg.find("\"threads\": 1"), 12, "\"threads\": 0");  // moe's choice
  write_file(d / "c.json", cfg);
  unsetenv("OMP_NUM_THREADS");
  const Run r = moe_on(2, "train --config " + (d / "c.json") + " --out " + (d / "run"), false);
  INFO(r.out);
  REQUIRE(r.code == 0);
  const int each = std::max(1, omp_get_num_procs() / 2);
  CHECK_THAT(r.out, Catch::Contains("(2 on this machine, " + std::to_string(each) + " thread(s) each)"));
}

TEST_CASE("training.average_start: 2 data-parallel ranks average as 1 rank does; expert parallelism refuses it",
          "[mpi][average]") {
  TempDir d("mpi_average");
  const auto averaged = [](int64_t batch) {
    nlohmann::json j = nlohmann::json::parse(config_json(batch, 12));
    j["training"]["average_start"] = 6;
    return j.dump();
  };
  write_file(d / "b8.json", averaged(8));
  write_file(d / "b4.json", averaged(4));
  train_one_and_dp(d);
  check_same_losses(losses(d / "one/metrics.jsonl"), losses(d / "dp/metrics.jsonl"), 12);
  // The saved weights are the average (of 7 steps' weights), the same on both.
  CHECK(moe::read_safetensors_header(d / "dp/last.safetensors").metadata().at("average.count") == "7");
  CHECK(std::abs(eval_loss(d / "dp/last.safetensors") - eval_loss(d / "one/last.safetensors")) < 1e-4);
  const Run ep = moe_on(2, "train --config " + (d / "b4.json") + " --out " + (d / "ep") + " --expert-parallel");
  INFO(ep.out);
  CHECK(ep.code != 0);
  CHECK(ep.code != 124);
  CHECK_THAT(ep.out, Catch::Contains("training.average_start does not run with --expert-parallel"));
}

TEST_CASE("errors under mpirun end every rank with one message", "[mpi][errors]") {
  TempDir d("mpi_errors");
  write_file(d / "e3.json", config_json(4, 4, 3));
  // 3 experts cannot be split over 2 ranks.
  Run r = moe_on(2, "train --config " + (d / "e3.json") + " --out " + (d / "run") + " --expert-parallel");
  INFO(r.out);
  CHECK(r.code != 0);
  CHECK(r.code != 124);  // not the timeout: no rank was left waiting
  CHECK_THAT(r.out, Catch::Contains("router.num_experts (3) to be a multiple of 2"));
  // Only train runs across processes.
  r = moe_on(2, "generate --checkpoint " + (d / "none.safetensors"));
  CHECK(r.code != 0);
  CHECK(r.code != 124);
  CHECK_THAT(r.out, Catch::Contains("generate runs in one process"));
}

#endif  // MOE_HAVE_MPI
