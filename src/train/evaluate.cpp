#include "moe/tensor/streams.hpp"
#include "moe/train/evaluate.hpp"
#include "moe/ops/ops.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>

namespace moe {

int64_t eval_group(const Config& cfg) {
  if (cfg.router.capacity_factor > 0 && cfg.router.capacity_at_eval) return 1;
  if (cfg.training.recompute) return 1;  // asked for little memory: a batch per forward
  constexpr int64_t kRows = 2048;
  return std::max<int64_t>(1, kRows / (cfg.training.batch_size * cfg.model.block_size));
}

namespace {

// body(t, graph) for t < threads on as many OpenMP threads: thread 0 with g, thread 1 with
// *spare when given, and thread t > 0 otherwise with others[t - 1] (at least threads - 1 of
// them, kept by the caller so that their memory serves every call). The first exception a
// thread throws is rethrown after.
template <class Body>
void on_threads(int64_t threads, Graph& g, Graph* spare, std::vector<Graph>& others, Body&& body) {
  std::exception_ptr error;
#pragma omp parallel num_threads(int(threads)) if (threads > 1)
  {
    const int64_t t = omp_get_thread_num();
    try {
      body(t, t == 0 ? g : t == 1 && spare ? *spare : others[size_t(t - 1)]);
    } catch (...) {
#pragma omp critical(moe_on_threads)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// Batches i ≡ part (mod parts) of both splits' estimates: each one's mean token loss into
// losses[split · iters + i], `group` batches per forward.
void estimate_part(Model& model, const Dataset& data, const Config& cfg, Graph& g, int64_t part, int64_t parts,
                   int64_t group, double* losses) {
  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size, BT = B * T, iters = cfg.logging.eval_iters;
  std::vector<int32_t> x(static_cast<size_t>(group * BT)), y(size_t(group * BT));
  Rng noise_rng(cfg.training.seed, kStreamEvalNoise);  // only drawn with router.noise_at_eval
  const auto noise_per_batch = uint64_t(model.noise_per_forward(BT, false));
  ForwardOptions fo;
  fo.noise_rng = &noise_rng;
  for (int64_t split = 0; split < 2; ++split) {
    BatchSampler sampler(split == 0 ? data.train() : data.val(), B, T, Rng(cfg.training.seed, kStreamEvalData));
    int64_t first = 0, n = 0;  // the batches in x and y: first, first + parts, ... (n of them)
    const auto run = [&] {
      // Batch i's noise starts at (split·iters + i)·noise_per_batch, as if it ran alone.
      noise_rng.set_state({uint64_t(cfg.training.seed), kStreamEvalNoise,
                           uint64_t(split * iters + first) * noise_per_batch});
      noise_rng.set_segments(uint64_t(n), uint64_t(parts) * noise_per_batch);
      g.clear();
      NoGradGuard no_grad(g);
      const Model::Output o = model.forward(g, x.data(), y.data(), n * B, T, fo);
      for (int64_t j = 0; j < n; ++j) losses[split * iters + first + j * parts] = mean_loss(o.token_losses + j * BT, BT);
      n = 0;
    };
    for (int64_t i = 0; i < iters; ++i) {
      if (i % parts != part) {
        sampler.skip();
        continue;
      }
      if (n == 0) first = i;
      sampler.next(x.data() + n * BT, y.data() + n * BT);
      if (++n == group) run();
    }
    if (n > 0) run();
  }
  g.clear();
}

}  // namespace

EvalEstimate estimate_loss(Model& model, const Dataset& data, const Config& cfg, Graph& g, int part, int parts,
                           int64_t group, Graph* spare) {
  const int64_t iters = cfg.logging.eval_iters;
  // The threads split this process's batches as the processes split them all: thread t runs
  // part + parts·t of parts·threads, each its own forwards, serially inside. Every batch's
  // loss has its bits whoever runs it, and they are added in batch order below.
  const int64_t threads = omp_in_parallel() ? 1 : std::min<int64_t>(omp_get_max_threads(), (iters + parts - 1) / parts);
  if (group <= 0) group = std::max<int64_t>(1, eval_group(cfg) / threads);
  std::vector<double> losses(size_t(2 * iters), 0.0);
  std::vector<Graph> others(size_t(threads - 1));
  on_threads(threads, g, spare, others, [&](int64_t t, Graph& gt) {
    estimate_part(model, data, cfg, gt, part + parts * t, parts * threads, group, losses.data());
  });
  EvalEstimate est;
  for (int64_t split = 0; split < 2; ++split) {
    double total = 0;
    for (int64_t i = part; i < iters; i += parts) total += losses[size_t(split * iters + i)];
    (split == 0 ? est.train_loss : est.val_loss) = total / double(iters);
  }
  return est;
}

SplitEvaluation evaluate_split(Model& model, TokenSpan ids, int64_t batch_size, Graph& g,
                               const RoutedBatchObserver& observe, bool batch_routing) {
  const Config& cfg = model.config();
  const int64_t T = cfg.model.block_size;
  const WindowBatcher windows(ids, batch_size, T);  // throws if the split is shorter than T + 1
  SplitEvaluation ev;
  ev.routing.reset(model.experts_per_layer());
  // Rounds of one batch per thread, each with its own graph, noise generator (batch i's noise
  // starts where the batches before it leave it) and router statistics; the rounds' losses
  // and statistics are added in batch order, so every figure has its bits for any thread count.
  const int64_t batches = windows.batches();
  const int64_t threads = omp_in_parallel() ? 1 : std::min<int64_t>(omp_get_max_threads(), batches);
  const auto noise_per_batch = uint64_t(model.noise_per_forward(batch_size * T, false));
  std::vector<std::vector<int32_t>> xs(size_t(threads), std::vector<int32_t>(size_t(batch_size * T)));
  std::vector<std::vector<int32_t>> ys = xs;
  std::vector<RoutingStats> stats(static_cast<size_t>(threads));
  std::vector<double> sums(static_cast<size_t>(threads));  // Σ of the batch's per-token losses
  std::vector<int64_t> rows(static_cast<size_t>(threads));
  using PerLayer = std::vector<std::vector<int32_t>>;
  std::vector<PerLayer> chosen(size_t(threads), PerLayer(size_t(cfg.model.n_layer)));
  std::vector<std::vector<std::vector<float>>> weights(size_t(threads),
                                                       std::vector<std::vector<float>>(size_t(cfg.model.n_layer)));
  std::vector<Graph> others(size_t(threads - 1));
  double total = 0;
  for (int64_t first = 0; first < batches; first += threads) {
    const int64_t n = std::min(threads, batches - first);
    on_threads(n, g, nullptr, others, [&](int64_t t, Graph& gt) {
      const int64_t i = first + t;
      const int64_t B = rows[size_t(t)] = windows.batch(i, xs[size_t(t)].data(), ys[size_t(t)].data());
      Rng noise_rng(cfg.training.seed, kStreamEvalNoise);
      noise_rng.set_state({uint64_t(cfg.training.seed), kStreamEvalNoise, uint64_t(i) * noise_per_batch});
      stats[size_t(t)].reset(model.experts_per_layer());
      ForwardOptions fo;
      fo.noise_rng = &noise_rng;
      fo.stats = &stats[size_t(t)];
      fo.batch_routing = batch_routing;
      if (observe) {
        fo.chosen = &chosen[size_t(t)];
        fo.chosen_weights = &weights[size_t(t)];
      }
      gt.clear();
      NoGradGuard no_grad(gt);
      sums[size_t(t)] =
          double(model.forward(gt, xs[size_t(t)].data(), ys[size_t(t)].data(), B, T, fo).loss.data[0]) * double(B * T);
    });
    for (int64_t t = 0; t < n; ++t) {
      total += sums[size_t(t)];
      ev.routing.add(stats[size_t(t)]);
      if (observe)
        observe(RoutedBatch{(first + t) * batch_size, rows[size_t(t)], T, xs[size_t(t)].data(), &chosen[size_t(t)],
                            &weights[size_t(t)]});
    }
  }
  g.clear();
  ev.tokens = windows.tokens();
  ev.loss = total / double(ev.tokens);
  ev.perplexity = std::exp(ev.loss);
  ev.bits_per_char = ev.loss / std::log(2.0);
  return ev;
}

}  // namespace moe
