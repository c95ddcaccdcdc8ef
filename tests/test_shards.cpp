// Data-parallel random draws: processes that each take their share of a batch draw exactly
// what one process with the whole batch draws (the basis of tests/test_mpi.cpp).
#include <catch2/catch.hpp>
#include <omp.h>

#include <vector>

#include <nlohmann/json.hpp>

#include "moe/data/dataset.hpp"
#include "moe/model/model.hpp"
#include "moe/tensor/rng.hpp"
#include "moe/tensor/streams.hpp"
#include "moe/train/evaluate.hpp"

using namespace moe;

TEST_CASE("Rng shards and windows split one fill between processes", "[rng][parallel]") {
  const int64_t n = 1000;  // > 8, with a tail, for the 8-lane uniform path
  Rng whole(5, 3);
  std::vector<float> u(3 * n), z(3 * n);
  whole.fill_uniform(u.data(), 3 * n);
  whole.fill_normal(z.data(), 3 * n);
  for (uint64_t r = 0; r < 3; ++r) {
    Rng part(5, 3);
    part.set_shard(r, 3);
    std::vector<float> pu(n), pz(n);
    part.fill_uniform(pu.data(), n);
    part.fill_normal(pz.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      REQUIRE(pu[size_t(i)] == u[size_t(int64_t(r) * n + i)]);
      REQUIRE(pz[size_t(i)] == z[size_t(int64_t(r) * n + i)]);
    }
    CHECK(part.state().counter == whole.state().counter);  // every process ends at the same counter
  }
  // A window: numbers [offset, offset + m) of the next `total`, as a generator of its own; the
  // stream moves past all of them, whatever its shard.
  Rng w(5, 3);
  w.set_shard(1, 3);
  std::vector<float> part(7);
  Rng window = w.take_window(10, 3 * n);
  window.fill_uniform(part.data(), 7);
  for (int64_t i = 0; i < 7; ++i) CHECK(part[size_t(i)] == u[size_t(10 + i)]);
  CHECK(w.state().counter == uint64_t(3 * n));
  w.skip(3 * n);
  CHECK(w.state().counter == whole.state().counter);
  CHECK_THROWS(w.set_shard(3, 3));
}

TEST_CASE("BatchSampler shards draw the rows of one larger batch", "[data][parallel]") {
  std::vector<int32_t> ids(5000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i * 7 % 65);
  const int64_t B = 4, T = 8;
  BatchSampler whole(ids, 2 * B, T, Rng(9, 2));
  BatchSampler a(ids, B, T, Rng(9, 2)), b(ids, B, T, Rng(9, 2));
  a.set_shard(0, 2);
  b.set_shard(1, 2);
  for (int step = 0; step < 3; ++step) {
    std::vector<int32_t> wx(size_t(2 * B * T)), wy(wx.size()), x(size_t(2 * B * T)), y(x.size());
    whole.next(wx.data(), wy.data());
    a.next(x.data(), y.data());
    b.next(x.data() + B * T, y.data() + B * T);
    REQUIRE(x == wx);
    REQUIRE(y == wy);
    CHECK(a.state().counter == whole.state().counter);
    CHECK(b.state().counter == whole.state().counter);
  }
}

namespace {

// The estimate as it was computed before the split and the batching: one sampler and one noise
// generator per call, one forward per batch, drawn in order. Then estimate_loss with every
// batching, split and thread count must give it.
void check_estimate(const nlohmann::json& j) {
  const Config cfg = config_from_json(j, "estimate_config");
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, cfg.model.block_size);
  Model model(cfg, int64_t(data.tokenizer().vocab().size()));
  Rng init(5, kStreamInit);
  model.init(init);
  Graph g;
  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size, iters = cfg.logging.eval_iters;
  std::vector<int32_t> x(size_t(B * T)), y(size_t(B * T));
  Rng noise(5, kStreamEvalNoise);
  ForwardOptions fo;
  fo.noise_rng = &noise;
  double reference[2];
  for (int split = 0; split < 2; ++split) {
    BatchSampler sampler(split == 0 ? data.train() : data.val(), B, T, Rng(5, kStreamEvalData));
    double total = 0;
    for (int64_t i = 0; i < iters; ++i) {
      sampler.next(x.data(), y.data());
      g.clear();
      NoGradGuard no_grad(g);
      total += model.forward(g, x.data(), y.data(), B, T, fo).loss.data[0];
    }
    reference[split] = total / double(iters);
  }
  // Each process's batches are split between its threads too: any thread count, the same bits.
  const int threads_before = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    INFO("threads " << threads);
    for (int64_t group : {0, 1, 2, 3, 100}) {
      INFO("batches per forward " << group);
      const EvalEstimate whole = estimate_loss(model, data, cfg, g, 0, 1, group);
      CHECK(whole.train_loss == reference[0]);
      CHECK(whole.val_loss == reference[1]);
    }
  }
  omp_set_num_threads(threads_before);
  for (int64_t group : {0, 1, 2, 3, 100}) {
    INFO("batches per forward " << group);
    for (int parts : {2, 3}) {
      double train = 0, val = 0;
      for (int p = 0; p < parts; ++p) {
        const EvalEstimate e = estimate_loss(model, data, cfg, g, p, parts, group);
        train += e.train_loss, val += e.val_loss;
      }
      CHECK(train == Approx(reference[0]).epsilon(1e-12));
      CHECK(val == Approx(reference[1]).epsilon(1e-12));
    }
  }
}

}  // namespace

TEST_CASE("estimate_loss split between processes and batched into fewer forwards gives the estimate as before",
          "[parallel]") {
  const std::string small = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";
  check_estimate({{"data", {{"path", small}}},
                  {"model", {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 2}}},
                  {"router", {{"num_experts", 4}, {"top_k", 2}, {"noisy", true}, {"noise_at_eval", true}}},
                  {"training", {{"batch_size", 4}, {"seed", 5}}},
                  {"logging", {{"eval_iters", 7}}}});
  // 16 tokens a batch over 16 experts: many get one token (a one-row product), others none.
  // Expert hidden width 600 > gemm's k block (256); shared expert, SwiGLU, softmax gating.
  check_estimate({{"data", {{"path", small}}},
                  {"model",
                   {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 2}, {"expert_hidden", 600},
                    {"shared_experts", 1}, {"expert_ffn", "swiglu"}}},
                  {"router",
                   {{"num_experts", 16}, {"top_k", 1}, {"noisy", true}, {"noise_at_eval", true},
                    {"gating", "softmax_topk"}}},
                  {"training", {{"batch_size", 2}, {"seed", 5}}},
                  {"logging", {{"eval_iters", 9}}}});
}

// moe eval's pass over a split: as one forward per batch in order, with one noise generator and
// one set of router statistics through all of them, for any thread count (the threads take a
// batch each, with the noise where the batches before leave it, and their figures are added in
// batch order). 13 windows in batches of 4: the last batch is short.
TEST_CASE("evaluate_split gives the sequential pass's figures for any thread count", "[parallel]") {
  const std::string small = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";
  const Config cfg = config_from_json(
      {{"data", {{"path", small}}},
       {"model", {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 2}}},
       {"router", {{"num_experts", 4}, {"top_k", 2}, {"noisy", true}, {"noise_at_eval", true}}},
       {"training", {{"batch_size", 4}, {"seed", 5}}}},
      "split_config");
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, cfg.model.block_size);
  Model model(cfg, int64_t(data.tokenizer().vocab().size()));
  Rng init(5, kStreamInit);
  model.init(init);
  const int64_t B = 4, T = cfg.model.block_size;
  std::vector<int32_t> ids = data.val().to_vector();
  ids.resize(size_t(13 * T + 1));
  Graph g;
  const WindowBatcher windows(ids, B, T);
  REQUIRE(windows.batches() == 4);
  Rng noise(5, kStreamEvalNoise);
  ForwardOptions fo;
  fo.noise_rng = &noise;
  RoutingStats stats;
  stats.reset(cfg.model.n_layer, cfg.router.num_experts);
  fo.stats = &stats;
  std::vector<int32_t> x(size_t(B * T)), y(size_t(B * T));
  double total = 0;
  for (int64_t i = 0; i < windows.batches(); ++i) {
    const int64_t rows = windows.batch(i, x.data(), y.data());
    g.clear();
    NoGradGuard no_grad(g);
    total += double(model.forward(g, x.data(), y.data(), rows, T, fo).loss.data[0]) * double(rows * T);
  }
  const int threads_before = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    INFO("threads " << threads);
    const SplitEvaluation ev = evaluate_split(model, ids, B, g);
    CHECK(ev.tokens == 13 * T);
    CHECK(ev.loss == total / double(13 * T));
    CHECK(ev.routing.health().dump() == stats.health().dump());
  }
  omp_set_num_threads(threads_before);
}
