// The training loop: batches, forward/backward, clipping, AdamW, periodic evaluation,
// metrics (JSON lines), checkpoints (every N steps, best, last), exact resume and clean
// interruption by SIGINT/SIGTERM.
#pragma once

#include <atomic>
#include <cstdint>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "moe/data/dataset.hpp"
#include "moe/io/config.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/optim/group_update.hpp"
#include "moe/train/parallel.hpp"

namespace moe {

struct TrainOptions {
  std::string resume;   // checkpoint to resume from, or empty
  // Checkpoint whose weights (and router buffers) a fresh run starts from, in place of the
  // initialisation (moe upcycle's output); the optimizer and step start afresh. Not with resume.
  std::string init;
  std::string out_dir;  // overrides config.logging.out_dir when non-empty
  bool quiet = false;   // no progress lines (tests)
  // A fresh run refuses a run directory that already holds checkpoints unless this is set;
  // then the old checkpoints and metrics are deleted first.
  bool overwrite = false;
  // Check the config and data, build the model, report its size, and stop: no training and
  // nothing written.
  bool dry_run = false;
  // Under mpirun with several processes: shard each layer's experts across the ranks (see
  // moe/train/parallel.hpp); otherwise plain data parallelism.
  bool expert_parallel = false;
};

struct TrainResult {
  int64_t steps_done = 0;  // the step reached (next to run)
  double last_train_loss = 0;
  double last_val_loss = 0;  // from the last evaluation, or NaN
  double best_val_loss = 0;
  bool interrupted = false;
  bool out_of_time = false;  // stopped by training.time_limit
  double wall_seconds = 0;
  double median_step_ms = 0;
  int64_t parameters = 0, active_parameters = 0;  // active: per token (shared + top_k experts)
  int ranks = 1;                 // processes that trained together
  double reduce_ms_per_step = 0;  // mean time in the gradient all-reduce (ranks > 1)
};

// Set by the signal handlers; the loop saves and stops when it sees it.
extern std::atomic<int> g_stop_signal;
void install_stop_signal_handlers();

// Trains cfg's model into its run directory (cfg.logging.out_dir, or opt.out_dir), which the
// run keeps locked until it returns or throws (RunDirLock, moe/train/run_dir.hpp): a second
// run on the same directory throws naming this process. Collective under mpirun.
TrainResult train(const Config& cfg, const TrainOptions& opt);

struct StepResult {
  double loss = 0;       // cross-entropy of the global batch (all ranks' rows)
  double grad_norm = 0;  // global gradient norm before clipping; NaN when not asked for
  float lr = 0;
  int64_t top_k = 0;    // the step's k (router.top_k_anneal_steps)
  float l1_coef = 0;    // relu gating: the L1 coefficient the step's objective used
  // Some rank had seen a stop signal (g_stop_signal) when its forward pass ended: every rank
  // gets the same answer, so all stop after this step. A later signal shows in the next step.
  bool stop = false;
  // Some rank had passed training.time_limit (TrainStep::deadline) when its forward pass ended:
  // this step is the run's last, on every rank.
  bool out_of_time = false;
};

// One training step: the next batch, forward, backward, the gradients summed over the ranks,
// clipping, AdamW and the balancing bias. moe train runs it, moe bench times it and the
// allocation test counts it, so all three see the same step. Collective under MPI. In one
// process without clipping, AdamW runs group by group in the backward pass (GroupUpdate), and
// from construction on the model's gradients are shared (ParamStore::share_grads).
class TrainStep {
 public:
  // Keeps references to all of these: they must outlive it. stats, when set, accumulates the
  // router's figures of every step.
  TrainStep(const Config& cfg, Model& model, AdamW& adamw, ParallelTraining& par, BatchSampler& sampler,
            Rng& dropout_rng, Rng& noise_rng, Graph& g, RoutingStats* stats);
  // Runs step `step` (0-based; it sets the learning rate). Throws, before touching the weights,
  // when the loss is not finite, naming the step and the run directory cfg.logging.out_dir.
  // The gradient norm takes a pass over every gradient: without clipping it is computed only
  // when grad_norm is asked for (the steps that are logged). Every rank must ask alike.
  StepResult run(int64_t step, bool grad_norm);
  // Where training.recompute runs the blocks again. Idle between steps, so evaluations run a
  // thread's forwards in it too (with or without recomputation).
  const Graph& recompute_graph() const { return recompute_g_; }
  Graph& recompute_graph() { return recompute_g_; }
  // When training.time_limit ends (set by train()); none: no limit.
  std::optional<std::chrono::steady_clock::time_point> deadline;

 private:
  const Config& cfg_;
  Model& model_;
  AdamW& adamw_;
  ParallelTraining& par_;
  BatchSampler& sampler_;
  Graph& g_;
  ForwardOptions fo_;
  GroupUpdate group_;
  Graph recompute_g_;
  bool grouped_ = false;  // AdamW runs in the backward pass, through group_
  std::vector<int32_t> x_, y_;  // (B, T) inputs and targets
  bool grads_zero_ = false;     // the last step's AdamW left every gradient at 0
};

// The element at index size/2 of the sorted values (0 when empty): for step timings.
double median(std::vector<double> v);

}  // namespace moe
