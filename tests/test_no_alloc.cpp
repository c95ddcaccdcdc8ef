// A training step (TrainStep, the one moe train runs) allocates nothing once the buffers have
// grown to their size: activations and gradients come from the Graph's arena, kernels reuse
// their scratch. Counted by replacing the global operator new for this test binary (malloc
// itself, which OpenMP's runtime uses, is not counted).
#include <catch2/catch.hpp>

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>
#include <nlohmann/json.hpp>
#include <vector>

#include "moe/data/dataset.hpp"
#include "moe/kernels/gemm.hpp"
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
  // makeMoE-like (AdamW group by group in the backward pass); every MoE option with clipping
  // (AdamW after it); every option with recomputation.
  const int mode = GENERATE(0, 1, 2);
  INFO((mode == 0 ? "makeMoE-like" : mode == 1 ? "every MoE option, clipping" : "every MoE option, recompute"));
  const bool features = mode > 0;
  nlohmann::json j = {
      {"data", {{"path", std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt"}}},
      {"model", {{"block_size", 16}, {"n_embed", 32}, {"n_head", 4}, {"n_layer", 2}, {"dropout", 0.1}}},
      {"router", {{"num_experts", 4}, {"top_k", 2}}},
      {"optimizer", {{"lr", 1e-2}, {"grad_clip", mode == 1 ? 1.0 : 0.0}}},
      {"training", {{"batch_size", 8}, {"seed", 3}, {"recompute", mode == 2}}}};
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

// grouped_linear's experts go to threads by timing (a dynamic schedule), so a thread's first
// product of a shape can come at any step. gemm_reserve_thread, which each of those threads
// calls first, must cover every product up to its width: here in the threads of a fresh
// team (a new std::thread gets its own OpenMP workers, with empty scratch), for every
// kernel, form and depth, run serially in the region as grouped_linear runs them.
TEST_CASE("gemm_reserve_thread covers any product up to its width", "[alloc][gemm]") {
  std::vector<GemmKernel> kernels{GemmKernel::portable};
  if (gemm_cpu_has_avx2()) kernels.push_back(GemmKernel::avx2);
  if (gemm_cpu_has_avx512()) kernels.push_back(GemmKernel::avx512);
  constexpr int64_t kWidth = 70, kRows = 97, kMaxDepth = 600;
  const std::vector<float> a(kMaxDepth * kRows, 0.5f), b(kMaxDepth * kWidth, 0.25f);
  std::vector<float> c(2 * kRows * kWidth);
  int64_t before = 0, reserved = -1, products = -1;
  std::thread([&] {
    before = g_news.load();
#pragma omp parallel num_threads(2)
    {
      gemm_reserve_thread(kWidth);
#pragma omp barrier
#pragma omp master
      reserved = g_news.load() - before;
#pragma omp barrier
      float* ct = c.data() + omp_get_thread_num() * kRows * kWidth;
      for (const GemmKernel k : kernels)
        for (const int64_t n : {int64_t{1}, int64_t{17}, int64_t{33}, kWidth})
          for (const int64_t depth : {int64_t{3}, int64_t{256}, kMaxDepth})
            for (const bool ta : {false, true})
              for (const bool tb : {false, true})
                gemm(k, ta, tb, kRows, n, depth, 1.f, a.data(), ta ? kRows : depth, b.data(), tb ? depth : n, 0.f,
                     ct, n);
#pragma omp barrier
#pragma omp master
      products = g_news.load() - before - reserved;
    }
  }).join();
  CHECK(reserved > 0);
  CHECK(products == 0);
}
