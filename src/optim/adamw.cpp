#include "moe/optim/adamw.hpp"

#include <algorithm>
#include <cmath>

#include "moe/tensor/profile.hpp"

namespace moe {

AdamW::AdamW(const OptimizerConfig& cfg, const ParamStore& params)
    : cfg_(cfg), m_(size_t(params.numel()), 0.f), v_(size_t(params.numel()), 0.f) {
  // Runs of parameters alike in decay; each runs to the next one's offset (padding included).
  const std::vector<ParamInfo>& infos = params.infos();
  for (size_t i = 0; i < infos.size(); ++i) {
    const bool decay = !cfg.exempt_no_decay || infos[i].decay;
    const int64_t end = i + 1 < infos.size() ? infos[i + 1].offset : params.numel();
    if (!decay_runs_.empty() && decay_runs_.back().decay == decay)
      decay_runs_.back().end = end;
    else
      decay_runs_.push_back({infos[i].offset, end, decay});
  }
}

namespace {

template <bool ZeroGrads>
void adamw_update(float* p, float* g, float* m, float* v, bool decay, int64_t n, float lr, float wd, float b1,
                  float b2, float eps, float bc2_sqrt, float step_size) {
  const float shrink = 1.f - float(decay) * (lr * wd);  // 1 where no decay
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    p[i] *= shrink;
    m[i] = b1 * m[i] + (1.f - b1) * g[i];
    v[i] = b2 * v[i] + (1.f - b2) * g[i] * g[i];
    const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    p[i] += -step_size * (m[i] / denom);  // torch's addcdiv_ order
    if (ZeroGrads) g[i] = 0.f;
  }
}

}  // namespace

void AdamW::begin_step(float lr) {
  ++t_;
  lr_ = lr;
  // The powers of the betas as floats, as the update uses them.
  bc1_ = 1.f - float(std::pow(double(float(cfg_.beta1)), double(t_)));
  bc2_sqrt_ = float(std::sqrt(1.0 - std::pow(double(float(cfg_.beta2)), double(t_))));
}

void AdamW::update(ParamStore& params, const FloatRange& r, float* g, bool zero_grads) {
  PartScope part(Part::Optimizer);
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps);
  const float wd = float(cfg_.weight_decay), step_size = lr_ / bc1_;
  for (const DecayRun& run : decay_runs_) {
    const int64_t lo = std::max(r.begin, run.begin), hi = std::min(r.end, run.end);
    if (lo >= hi) continue;
    (zero_grads ? adamw_update<true> : adamw_update<false>)(params.data() + lo, g + (lo - r.begin), m_.data() + lo,
                                                            v_.data() + lo, run.decay, hi - lo, lr_, wd, b1, b2,
                                                            eps, bc2_sqrt_, step_size);
  }
}

void AdamW::step(ParamStore& params, float lr, const std::vector<FloatRange>* only, bool zero_grads) {
  PartScope part(Part::Optimizer);
  MOE_CHECK(!params.grads_shared(), "AdamW::step",
            "the gradients share one region (ParamStore::share_grads): update each group as it completes");
  begin_step(lr);
  const FloatRange all{0, params.numel()};
  const FloatRange* ranges = only ? only->data() : &all;
  for (size_t k = 0, n_ranges = only ? only->size() : 1; k < n_ranges; ++k)
    update(params, ranges[k], params.grad() + ranges[k].begin, zero_grads);
}

float learning_rate(const OptimizerConfig& cfg, int64_t step, int64_t max_steps) {
  const double lr = cfg.lr;
  if (cfg.warmup_steps > 0 && step < cfg.warmup_steps)
    return float(lr * double(step + 1) / double(cfg.warmup_steps));
  switch (cfg.schedule) {
    case LrSchedule::kConstant: return float(lr);
    case LrSchedule::kCosine: break;
  }
  // Cosine decay from lr to min_lr over the steps after warmup.
  const double span = double(std::max<int64_t>(1, max_steps - cfg.warmup_steps));
  const double progress = std::min(1.0, double(step - cfg.warmup_steps) / span);
  return float(cfg.min_lr + 0.5 * (lr - cfg.min_lr) * (1.0 + std::cos(M_PI * progress)));
}

double sum_of_squares(const float* x, int64_t n) {
  const int64_t chunks = (n + kSquaresChunk - 1) / kSquaresChunk;
  thread_local std::vector<double> scratch;  // reused: no allocation per step
  scratch.assign(size_t(chunks), 0.0);
  double* partial = scratch.data();  // the calling thread's, shared with the team
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c)
    partial[size_t(c)] = add_squares(0.0, x + c * kSquaresChunk, std::min(n - c * kSquaresChunk, kSquaresChunk));
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}

double add_squares(double s, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
  return s;
}

void clip_to_norm(ParamStore& params, double norm, double max_norm) {
  if (!(max_norm > 0 && norm > max_norm)) return;
  const float f = float(max_norm / (norm + 1e-6));
  float* g = params.grad();
  const int64_t n = params.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] *= f;
}

double clip_grad_norm(ParamStore& params, double max_norm) {
  PartScope part(Part::Optimizer);
  MOE_CHECK(!params.grads_shared(), "clip_grad_norm", "the gradients share one region (ParamStore::share_grads)");
  const double norm = std::sqrt(sum_of_squares(params.grad(), params.numel()));
  clip_to_norm(params, norm, max_norm);
  return norm;
}

}  // namespace moe
