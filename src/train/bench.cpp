#include "moe/tensor/streams.hpp"
#include "moe/train/bench.hpp"

#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "moe/data/dataset.hpp"
#include "moe/generate/generator.hpp"
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/gemm_bf16.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/train/parallel.hpp"
#include "moe/train/trainer.hpp"

namespace moe {

double forward_flops(const Config& cfg, int64_t V) {
  const double C = double(cfg.model.n_embed), T = double(cfg.model.block_size), E = double(cfg.router.num_experts),
               K = double(cfg.router.top_k), F = double(cfg.expert_hidden_size());
  // Per token: each of the k chosen and the shared experts, two C x F matrices (three for SwiGLU).
  const double expert_matrices = double(cfg.expert_matrices());
  const double KC = double(cfg.kv_heads() * cfg.head_size());  // key (and value) columns: C, or fewer with GQA
  const double attention = 2 * C * (C + 2 * KC)  // qkv
                           + 2 * C * C        // output projection
                           + 2 * 2 * T * C;   // q·kᵀ and att·v over all heads
  const double moe = 2 * 2 * C * E            // router and noise logits
                     + (K + double(cfg.model.shared_experts)) * expert_matrices * 2 * C * F;  // experts
  const double dense = expert_matrices * 2 * C * double(cfg.dense_hidden_size());  // a dense block's feed-forward
  const double L = double(cfg.model.n_layer), L_moe = double(cfg.moe_blocks());
  const double per_token = L * attention + L_moe * moe + (L - L_moe) * dense + 2 * C * double(V);
  return per_token * double(cfg.training.batch_size) * T;
}

BenchResult run_bench(const Config& cfg, int64_t steps, int threads, int64_t generate_chars, bool profile) {
  using clock = std::chrono::steady_clock;
  if (threads > 0) omp_set_num_threads(threads);
  BenchResult r;
  r.steps = steps;
  r.threads = omp_get_max_threads();
  r.gemm_kernel = gemm_kernel_name();
  r.precision = cfg.training.precision == Precision::kFp32        ? "fp32"
                : bf16_kernel() == Bf16Kernel::avx512bf16 ? "bf16 (avx512bf16)"
                                                                  : "bf16 (emulated)";
  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size;
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, T);
  Model model(cfg, data.tokenizer().size());
  Rng init(cfg.training.seed, kStreamInit), drop(cfg.training.seed, kStreamDropout), noise(cfg.training.seed, kStreamNoise);
  model.init(init);
  AdamW adamw(cfg.optimizer, model.params());
  BatchSampler sampler(data.train(), B, T, Rng(cfg.training.seed, kStreamData));
  ParallelTraining par(model, false);  // one process: only moe train runs under mpirun
  Graph g;
  RoutingStats stats;  // gathered as moe train gathers them, so that the same work is timed
  TrainStep train_step(cfg, model, adamw, par, sampler, drop, noise, g, &stats);
  std::vector<double> step_ms, fwd_ms;
  const int64_t warmup = 3;
  for (int64_t i = 0; i < warmup + steps; ++i) {
    if (profile && i >= warmup) i == warmup ? profile_start() : profile_continue();  // the timed steps alone
    const auto t0 = clock::now();
    train_step.run(i, false);  // as the steps between log lines
    const auto t1 = clock::now();
    if (profile && i >= warmup) profile_stop();
    if (i >= warmup) step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  if (profile) {
    r.profiled = true;
    r.profile = profile_result();
    for (double ms : step_ms) r.profiled_ms += ms;
  }
  // The training steps' peak, before the forwards and the generation add theirs.
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  r.peak_rss_mb = double(ru.ru_maxrss) / 1024.0;
  constexpr double kMB = 1024.0 * 1024.0;
  r.params_mb = double(model.params().numel()) * sizeof(float) / kMB;
  r.grads_mb = double(model.params().grad_numel()) * sizeof(float) / kMB;
  r.moments_mb = double(adamw.m().size() + adamw.v().size()) * sizeof(float) / kMB;
  size_t activations = 0, activation_grads = 0;
  for (const Graph* graph : {&g, &train_step.recompute_graph()}) {
    activations += graph->arena().bytes_resident();
    activation_grads += graph->grad_arena().bytes_resident() + graph->scope_grad_arena().bytes_resident() +
                        graph->scope_scratch_arena().bytes_resident();
  }
  r.activations_mb = double(activations) / kMB;
  r.activation_grads_mb = double(activation_grads) / kMB;
  std::vector<int32_t> x(static_cast<size_t>(B * T)), y(static_cast<size_t>(B * T));
  ForwardOptions eval;
  eval.noise_rng = &noise;
  for (int64_t i = 0; i < warmup + steps; ++i) {
    sampler.next(x.data(), y.data());
    const auto t0 = clock::now();
    g.clear();
    NoGradGuard ng(g);
    model.forward(g, x.data(), y.data(), B, T, eval);
    if (i >= warmup) fwd_ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
  }
  g.clear();
  r.step_ms_median = median(step_ms);
  r.step_ms_min = *std::min_element(step_ms.begin(), step_ms.end());
  r.step_ms_max = *std::max_element(step_ms.begin(), step_ms.end());
  r.forward_ms_median = median(fwd_ms);
  r.tokens_per_s = double(B * T) / (r.step_ms_median / 1000.0);
  r.forward_flops = forward_flops(cfg, data.tokenizer().size());
  r.flops_per_step = 3 * r.forward_flops;
  r.gflops_per_s = r.flops_per_step / (r.step_ms_median / 1000.0) / 1e9;
  if (generate_chars > 0) {
    model.use_decode_layout();  // as moe generate decodes (the model trains no more here)
    GenerateOptions go;
    Generator gen(model, go);
    int64_t n = 0;
    const auto t0 = clock::now();
    gen.generate({0}, generate_chars, [&](int32_t) { ++n; });
    r.generate_chars_per_s = double(n) / std::chrono::duration<double>(clock::now() - t0).count();
  }
  return r;
}

}  // namespace moe
