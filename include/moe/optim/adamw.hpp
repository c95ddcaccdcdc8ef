// AdamW (decoupled weight decay) over the ParamStore's contiguous blocks, exactly as
// torch.optim.AdamW: p *= 1 - lr·wd; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
// p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps).
// Also the learning-rate schedule and gradient clipping by global norm.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/io/config.hpp"
#include "moe/tensor/params.hpp"

namespace moe {

// Floats [begin, end) of the parameter block (and of the gradient and moment blocks).
struct FloatRange {
  int64_t begin = 0, end = 0;
};

class AdamW {
 public:
  AdamW(const OptimizerConfig& cfg, const ParamStore& params);
  // One update with learning rate lr; increments the step count. With `only`, just those
  // ranges change (expert parallelism: the experts another process owns are left alone).
  // zero_grads: each gradient it reads is set to 0 in the same pass, which saves the next
  // step a pass over all of them (ParamStore::zero_grad) when no range was left out.
  void step(ParamStore& params, float lr, const std::vector<FloatRange>* only = nullptr, bool zero_grads = false);
  // step() in parts, for updating groups of parameters as the backward pass completes their
  // gradients: begin_step increments the step count and fixes lr; each update() then changes
  // the floats of r, reading their gradients from g (r.end - r.begin floats).
  void begin_step(float lr);
  void update(ParamStore& params, const FloatRange& r, float* g, bool zero_grads);
  int64_t steps() const { return t_; }
  // Moments, same layout as the parameter block (for checkpoints).
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }
  void set_steps(int64_t t) { t_ = t; }

 private:
  OptimizerConfig cfg_;
  std::vector<float> m_, v_;
  struct DecayRun {
    int64_t begin = 0, end = 0;  // floats of the block
    bool decay = true;           // weight decay applies
  };
  std::vector<DecayRun> decay_runs_;
  int64_t t_ = 0;
  float lr_ = 0, bc1_ = 1, bc2_sqrt_ = 1;  // of the step begun last
};

// Learning rate at `step` (0-based) for the config's schedule.
float learning_rate(const OptimizerConfig& cfg, int64_t step, int64_t max_steps);

// Global L2 norm of all gradients (double accumulation in a fixed order: independent of the
// thread count). When max_norm > 0 and the norm exceeds it, scales the gradients down to it.
// Returns the norm before clipping.
double clip_grad_norm(ParamStore& params, double max_norm);
// Σ x[i]² in double, over chunks of kSquaresChunk floats each summed by add_squares, the
// chunks' sums then added in order: the same bits for any thread count.
constexpr int64_t kSquaresChunk = int64_t(1) << 14;
double sum_of_squares(const float* x, int64_t n);
// s + x[0]² + x[1]² + ... in double, in order.
double add_squares(double s, const float* x, int64_t n);
// When max_norm > 0 and norm exceeds it, scales every gradient by max_norm / (norm + 1e-6).
void clip_to_norm(ParamStore& params, double norm, double max_norm);

}  // namespace moe
