#include "moe/tensor/streams.hpp"
#include "moe/train/evaluate.hpp"

#include <cmath>

namespace moe {

EvalEstimate estimate_loss(Model& model, const Dataset& data, const Config& cfg, Graph& g, int part, int parts) {
  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size;
  std::vector<int32_t> x(static_cast<size_t>(B * T)), y(size_t(B * T));
  EvalEstimate est;
  Rng noise_rng(cfg.training.seed, kStreamEvalNoise);  // only drawn with router.noise_at_eval
  const auto noise_per_batch = uint64_t(model.noise_per_forward(B * T, false));
  ForwardOptions fo;
  fo.noise_rng = &noise_rng;
  for (int split = 0; split < 2; ++split) {
    BatchSampler sampler(split == 0 ? data.train() : data.val(), B, T, Rng(cfg.training.seed, kStreamEvalData));
    double total = 0;
    for (int64_t i = 0; i < cfg.logging.eval_iters; ++i) {
      if (i % parts != part) {
        sampler.skip();
        continue;
      }
      noise_rng.set_state({uint64_t(cfg.training.seed), kStreamEvalNoise, uint64_t(split * cfg.logging.eval_iters + i) * noise_per_batch});
      sampler.next(x.data(), y.data());
      g.clear();
      NoGradGuard no_grad(g);
      total += model.forward(g, x.data(), y.data(), B, T, fo).loss.data[0];
    }
    (split == 0 ? est.train_loss : est.val_loss) = total / double(cfg.logging.eval_iters);
  }
  g.clear();
  return est;
}

SplitEvaluation evaluate_split(Model& model, const std::vector<int32_t>& ids, int64_t batch_size, Graph& g) {
  const int64_t T = model.config().model.block_size;
  const WindowBatcher windows(ids, batch_size, T);  // throws if the split is shorter than T + 1
  SplitEvaluation ev;
  ev.routing.reset(model.config().model.n_layer, model.config().router.num_experts);
  Rng noise_rng(model.config().training.seed, kStreamEvalNoise);
  ForwardOptions fo;
  fo.noise_rng = &noise_rng;
  fo.stats = &ev.routing;
  std::vector<int32_t> x(size_t(batch_size * T)), y(size_t(batch_size * T));
  double total = 0;  // sum of per-token losses
  for (int64_t i = 0; i < windows.batches(); ++i) {
    const int64_t B = windows.batch(i, x.data(), y.data());
    g.clear();
    NoGradGuard no_grad(g);
    total += double(model.forward(g, x.data(), y.data(), B, T, fo).loss.data[0]) * double(B * T);
  }
  g.clear();
  ev.tokens = windows.tokens();
  ev.loss = total / double(ev.tokens);
  ev.perplexity = std::exp(ev.loss);
  ev.bits_per_char = ev.loss / std::log(2.0);
  return ev;
}

}  // namespace moe
