// A training step (TrainStep, the one moe train runs) allocates nothing once the buffers have
// grown to their size: activations and gradients come from the Graph's arena, kernels reuse
// their scratch. Counted by replacing the global operator new for this test binary (malloc
// itself, which OpenMP's runtime uses, is not counted).
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <nlohmann/json.hpp>
#include <vector>

#include "moe/data/dataset.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/tensor/streams.hpp"
#include "moe/train/parallel.hpp"
#include "moe/train/trainer.hpp"

namespace {
std::atomic<int64_t> g_news{0};
}  // namespace

// The replacements below pair malloc with free, which GCC cannot see through.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

void* operator new(std::size_t n) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  g_news.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void* operator new(std::size_t n, std::align_val_t a) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace moe;

TEST_CASE("a training step allocates nothing after the first few", "[alloc]") {
  const bool features = GENERATE(false, true);
  INFO((features ? "every MoE option on" : "makeMoE-like"));
  nlohmann::json j = {
      {"data", {{"path", std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt"}}},
      {"model", {{"block_size", 16}, {"n_embed", 32}, {"n_head", 4}, {"n_layer", 2}, {"dropout", 0.1}}},
      {"router", {{"num_experts", 4}, {"top_k", 2}}},
      {"optimizer", {{"lr", 1e-2}, {"grad_clip", 1.0}}},
      {"training", {{"batch_size", 8}, {"seed", 3}}}};
  if (features) {
    j["model"]["expert_ffn"] = "swiglu";
    j["model"]["shared_experts"] = 1;
    j["router"].update({{"aux_loss_coef", 0.01}, {"z_loss_coef", 1e-3}, {"capacity_factor", 1.0},
                        {"bias_update_rate", 1e-3}});
  }
  const Config cfg = config_from_json(j, "alloc_config");
  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size;
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, T);
  Model model(cfg, int64_t(data.tokenizer().vocab().size()));
  Rng init(3, kStreamInit), dropout(3, kStreamDropout), noise(3, kStreamNoise);
  model.init(init);
  AdamW adamw(cfg.optimizer, model.params());
  BatchSampler sampler(data.train(), B, T, Rng(3, kStreamData));
  ParallelTraining par(model, false);
  Graph g;
  RoutingStats stats;
  TrainStep step(cfg, model, adamw, par, sampler, dropout, noise, g, &stats);
  for (int i = 0; i < 20; ++i) step.run(i, true);  // buffers grow to the largest routing seen
  const int64_t before = g_news.load();
  for (int i = 20; i < 40; ++i) step.run(i, i % 2 == 0);
  CHECK(g_news.load() - before == 0);
}
