// moe bench: timings of the training step, the forward pass and generation for a config,
// with the model FLOPs counted analytically.
#pragma once

#include <cstdint>

#include "moe/io/config.hpp"
#include "moe/tensor/profile.hpp"

namespace moe {

struct BenchResult {
  int64_t steps = 0;
  int threads = 0;
  const char* gemm_kernel = "";   // gemm_kernel_name(): the GEMM micro-kernel chosen at run time
  const char* precision = "";     // training.precision, and for bf16 its kernel (gemm_bf16.hpp)
  double step_ms_median = 0, step_ms_min = 0, step_ms_max = 0;
  double forward_ms_median = 0;
  double tokens_per_s = 0;        // B*T / median step
  double flops_per_step = 0;      // forward + backward (2x forward), analytic
  double forward_flops = 0;
  double gflops_per_s = 0;        // flops_per_step / median step
  double generate_chars_per_s = 0;
  double peak_rss_mb = 0;         // the process's peak resident memory after the training steps
  // Where a training step's memory goes (MB): the parameters, their gradients, AdamW's two
  // moments, and what is resident of the graphs' arenas after the timed steps (activations
  // kept for the backward pass with the kernels' scratch, and the activations' gradients).
  double params_mb = 0, grads_mb = 0, moments_mb = 0, activations_mb = 0, activation_grads_mb = 0;
  // With profiling asked for: the timed steps' time by part (summed over the steps), and the
  // steps' wall time it divides.
  bool profiled = false;
  StepProfile profile;
  double profiled_ms = 0;
};

// Matmul FLOPs of one forward pass over B*T tokens (attention over the full T x T scores,
// as dense implementations compute them; top_k experts per token).
double forward_flops(const Config& cfg, int64_t vocab_size);

// profile: time the timed steps by part (see moe/tensor/profile.hpp); they then cost a little more.
BenchResult run_bench(const Config& cfg, int64_t steps, int threads, int64_t generate_chars, bool profile = false);

}  // namespace moe
