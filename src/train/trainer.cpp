#include "moe/tensor/streams.hpp"
#include "moe/train/trainer.hpp"

#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/data/dataset.hpp"
#include "moe/dist/comm.hpp"
#include "moe/kernels/gemm_bf16.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/tensor/parallel.hpp"
#include "moe/train/checkpoint.hpp"
#include "moe/train/evaluate.hpp"
#include "moe/train/parallel.hpp"
#include "moe/train/run_dir.hpp"

namespace moe {

std::atomic<int> g_stop_signal{0};

namespace {

void on_stop_signal(int sig) { g_stop_signal.store(sig); }

std::string format_duration(double s) {
  const int64_t t = int64_t(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(t / 3600), (long long)(t % 3600 / 60));
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

using Clock = std::chrono::steady_clock;

// training.threads when set. Otherwise, when several processes of the run share this machine's
// cores, each takes its share unless OMP_NUM_THREADS says otherwise, since more threads than
// cores make every OpenMP barrier wait for a thread that is not running.
void set_thread_count(const Config& cfg) {
  if (cfg.training.threads > 0)
    omp_set_num_threads(int(cfg.training.threads));
  else if (dist::local_size() > 1 && !std::getenv("OMP_NUM_THREADS"))
    omp_set_num_threads(std::max(1, omp_get_num_procs() / dist::local_size()));
}

// Runs f on rank 0 alone (where the run's files are written). Collective over several
// processes: when f throws, every rank throws its message, so each stops with the reason
// instead of waiting for rank 0 in the next collective.
template <class F>
void on_rank0(ParallelTraining& par, F&& f) {
  if (par.ranks() == 1) return f();
  std::string error;
  if (par.rank() == 0) {
    try {
      f();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  // The message travels as a sum of doubles in which only rank 0's are non-zero.
  double size = double(error.size());
  par.sum(&size, 1);
  if (size == 0) return;
  std::vector<double> chars(size_t(size), 0.0);
  for (size_t i = 0; i < error.size(); ++i) chars[i] = double(static_cast<unsigned char>(error[i]));
  par.sum(chars.data(), int64_t(chars.size()));
  throw std::runtime_error(std::string(chars.begin(), chars.end()));
}

// What a run tells: config.json, metrics.jsonl and the progress lines, in its run directory,
// which it keeps locked until it ends. Only rank 0 writes; on the other ranks every call but
// the constructor does nothing.
class RunLog {
 public:
  // Collective. Rank 0 locks the run directory (RunDirLock) before it changes anything in it,
  // then, for a fresh run, empties it of an earlier run's checkpoints (prepare_fresh_run_dir),
  // writes config.json and opens metrics.jsonl for appending.
  RunLog(const Config& cfg, const TrainOptions& opt, ParallelTraining& par)
      : cfg_(cfg), quiet_(opt.quiet || par.rank() > 0) {
    const std::filesystem::path out = cfg.logging.out_dir;
    on_rank0(par, [&] {
      lock_.emplace(out);
      if (opt.resume.empty()) prepare_fresh_run_dir(out, opt.overwrite);
      std::ofstream f(out / "config.json");
      f << config_to_json(cfg).dump(2) << "\n";
      if (!f) throw std::runtime_error("cannot write " + (out / "config.json").string());
      metrics_.open(out / "metrics.jsonl", std::ios::app);
      if (!metrics_) throw std::runtime_error("cannot open " + (out / "metrics.jsonl").string() + " for writing");
    });
  }

  // The lines that open a run: processes, config, model size; the step it resumes at.
  void header(const TrainOptions& opt, const Model& model, const Dataset& data, const ParallelTraining& par,
              int64_t first_step) {
    const int64_t R = par.ranks(), B = cfg_.training.batch_size;
    if (opt.expert_parallel && R == 1 && !opt.quiet)
      spdlog::warn("--expert-parallel has no effect in one process: start moe with mpirun -np N (N > 1)");
    if (cfg_.training.precision == Precision::kBf16 && bf16_kernel() == Bf16Kernel::emulated && !opt.quiet)
      spdlog::warn("training.precision bf16: this CPU lacks AVX512-BF16, so the bf16 products run in an emulation "
                   "(the same numbers, slower than fp32)");
    if (quiet_) return;
    if (R > 1)
      spdlog::info("{} over {} processes ({} on this machine, {} thread(s) each): batch {} per process, {} in all",
                   par.expert_parallel() ? "expert parallel" : "data parallel", R, dist::local_size(),
                   omp_get_max_threads(), B, R * B);
    spdlog::info("config:\n{}", config_to_json(cfg_).dump(2));
    spdlog::info("model: {} parameters ({} active per token), vocabulary {}, {} train / {} val tokens",
                 model.params().parameter_count(), model.active_param_count(), model.vocab_size(),
                 data.train().size(), data.val().size());
    if (!opt.resume.empty()) spdlog::info("resumed from {} at step {}", opt.resume, first_step);
  }

  // The training loop starts at first_step: the ETA counts from here.
  void start_loop(int64_t first_step) {
    first_step_ = first_step;
    t_loop_ = Clock::now();
  }

  // averaged: the weights in the running average evaluated instead of the trained ones (0: none).
  void evaluation(int64_t step, const EvalEstimate& est, int64_t averaged) {
    nlohmann::json j{{"step", step}, {"train_loss", est.train_loss}, {"val_loss", est.val_loss}};
    if (averaged > 0) j["average_count"] = averaged;
    metrics_ << j.dump() << "\n" << std::flush;
    if (quiet_) return;
    const std::string of = averaged > 0 ? " (the average of " + std::to_string(averaged) + " steps' weights)" : "";
    spdlog::info("step {}: train loss {:.4f}, val loss {:.4f}{}", step, est.train_loss, est.val_loss, of);
  }

  // Step `step` took `ms` and `tokens`. At a logged step, the metrics line and the progress line,
  // with the throughput and the router's figures (stats) over the steps since the last one;
  // then stats starts again.
  void step(int64_t step, const StepResult& sr, double ms, double tokens, RoutingStats& stats, bool log_now) {
    window_tokens_ += tokens;
    window_seconds_ += ms / 1000.0;
    if (!log_now) return;
    const int64_t max_steps = cfg_.training.max_steps;
    const double tok_s = window_tokens_ / std::max(1e-9, window_seconds_);
    // Wall clock so far (evaluations and checkpoints included) per step done in this run.
    const double elapsed = std::chrono::duration<double>(Clock::now() - t_loop_).count();
    const double eta = elapsed / double(step + 1 - first_step_) * double(max_steps - step - 1);
    nlohmann::json j{{"step", step + 1}, {"loss", sr.loss}, {"lr", sr.lr}, {"grad_norm", sr.grad_norm},
                     {"tokens_per_s", tok_s}};
    if (cfg_.router.top_k_anneal_steps > 0) j["top_k"] = sr.top_k;
    if (cfg_.router.gating == Gating::kRelu) j["l1_coef"] = sr.l1_coef;
    j["tokens_per_expert"] = stats.counts();
    const nlohmann::json health = stats.health();  // null for a dense block
    j["router"] = health;
    double worst_violation = 0, dropped = 0;
    const double moe_layers = double(cfg_.moe_blocks());
    for (const auto& layer : health) {
      if (layer.is_null()) continue;
      worst_violation = std::max(worst_violation, layer["max_violation"].get<double>());
      dropped += layer["dropped_frac"].get<double>() / moe_layers;
    }
    metrics_ << j.dump() << "\n" << std::flush;
    if (!quiet_)
      spdlog::info("step {}/{} | loss {:.4f} | lr {:.2e} | grad norm {:.3f}{}{} | {:.0f} tok/s | ETA {}",
                   step + 1, max_steps, sr.loss, sr.lr, sr.grad_norm,
                   moe_layers > 0 ? fmt::format(" | max load {:+.0f}%", 100 * worst_violation) : "",
                   cfg_.router.capacity_factor > 0 && moe_layers > 0 ? fmt::format(" | dropped {:.1f}%", 100 * dropped) : "",
                   tok_s, format_duration(eta));
    window_tokens_ = window_seconds_ = 0;
    stats = RoutingStats();
  }

  void done(bool interrupted, bool out_of_time, int64_t step, const std::filesystem::path& last) {
    if (!quiet_)
      spdlog::info("{} at step {}: checkpoint {}",
                   interrupted ? "interrupted" : out_of_time ? "time limit reached" : "done", step, last.string());
  }

 private:
  const Config& cfg_;
  const bool quiet_;
  std::optional<RunDirLock> lock_;  // rank 0: held until the run ends, however it ends
  std::ofstream metrics_;           // stays closed on the other ranks: writes to it do nothing
  int64_t first_step_ = 0;
  Clock::time_point t_loop_;
  double window_tokens_ = 0, window_seconds_ = 0;  // since the last logged step
};

// What a run trains besides the model: AdamW, the generators of the batches, the dropout and
// the router noise (each rank drawing its share), the step and the best validation loss, and
// the training step that moves them. Its checkpoints hold all of these.
class Training {
 public:
  // Initialises the model's weights, or loads them, the moments and the generators' states
  // from the checkpoint `resume` (whose state is `resumed`).
  Training(const Config& cfg, Model& model, ParallelTraining& par, const Dataset& data, const std::string& resume,
           const TrainState& resumed, const std::string& init_from)
      : cfg_(cfg),
        model_(model),
        par_(par),
        data_(data),
        adamw_(cfg.optimizer, model.params()),
        sampler_(data.train(), cfg.training.batch_size, cfg.model.block_size, Rng(cfg.training.seed, kStreamData)),
        dropout_rng_(cfg.training.seed, kStreamDropout),
        noise_rng_(cfg.training.seed, kStreamNoise) {
    // Each rank draws its rows' share of one global batch of R·B rows, and their share of the
    // dropout and noise numbers, so R ranks draw what one process with batch R·B would.
    const int R = par.ranks();
    sampler_.set_shard(par.rank(), R);
    dropout_rng_.set_shard(uint64_t(par.rank()), uint64_t(R));
    noise_rng_.set_shard(uint64_t(par.rank()), uint64_t(R));
    if (cfg.training.average_start > 0) {
      if (par.expert_parallel())
        throw std::invalid_argument("training.average_start does not run with --expert-parallel yet (each process "
                                    "holds only its experts' current weights); use data parallelism or set it to 0");
      average_.assign(size_t(model.params().numel()), 0.f);
    }
    if (resume.empty()) {
      Rng init_rng(cfg.training.seed, kStreamInit);
      model.init(init_rng);
      if (!init_from.empty()) load_checkpoint_tensors(init_from, model, nullptr);
    } else {
      state = resumed;
      load_checkpoint_tensors(resume, model, &adamw_, average_.empty() ? nullptr : average_.data());
      sampler_.set_state(state.data_rng);
      dropout_rng_.set_state(state.dropout_rng);
      noise_rng_.set_state(state.noise_rng);
    }
    step_.emplace(cfg, model, adamw_, par, sampler_, dropout_rng_, noise_rng_, g_, &stats);
  }

  // Step `step`; state.step moves past it. With grad_norm, the result holds the gradient norm.
  StepResult run_step(int64_t step, bool grad_norm) {
    const StepResult sr = step_->run(step, grad_norm);
    state.step = step + 1;
    if (!average_.empty() && state.step >= cfg_.training.average_start) update_average();
    return sr;
  }

  // Weights in the running average so far (0: evaluations and checkpoints use the trained ones).
  int64_t averaged() const { return state.average_count; }

  // The losses over cfg.logging.eval_iters batches of each split, the same on every rank.
  // Collective: each rank runs its share of the batches; the sums make the estimate.
  EvalEstimate evaluate() {
    par_.share_experts(nullptr);
    // The step's graphs, idle now, run the first two threads' forwards. Evaluations and steps
    // lay out their memory differently: the graphs give their pages back before and after,
    // so that the peak is the larger of the two layouts, not their union (a few ms a time).
    const auto release = [&] {
      g_.release();
      step_->recompute_graph().release();
    };
    release();
    swap_average();
    EvalEstimate est = estimate_loss(model_, data_, cfg_, g_, par_.rank(), par_.ranks(), 0, &step_->recompute_graph());
    swap_average();
    release();
    if (par_.ranks() > 1) {
      double both[2] = {est.train_loss, est.val_loss};
      par_.sum(both, 2);
      est.train_loss = both[0], est.val_loss = both[1];
    }
    return est;
  }

  // Collective: every rank saves at the same steps; rank 0 writes the file.
  void save(const std::filesystem::path& path) {
    par_.share_experts(&adamw_);
    if (par_.rank() > 0) return;
    state.data_rng = sampler_.state();
    state.dropout_rng = dropout_rng_.state();
    state.noise_rng = noise_rng_.state();
    swap_average();  // the model's weights saved are the average's, the trained ones beside them
    save_checkpoint(path.string(), model_, &adamw_, data_.tokenizer().vocab(), state, average_.data());
    swap_average();
  }

  // Collective. After the evaluation of step `step`: best.safetensors when val_loss is the best yet.
  void save_if_best(int64_t step, double val_loss, const std::filesystem::path& out) {
    if (!(val_loss < state.best_val_loss)) return;
    state.best_val_loss = val_loss;
    state.step = step;
    save(out / "best.safetensors");
  }

  // Collective. After a step: step_N.safetensors (N = state.step), and last.safetensors, which
  // always names the newest, linked to it.
  void save_step(const std::filesystem::path& out) {
    const std::filesystem::path step_file = out / ("step_" + std::to_string(state.step) + ".safetensors");
    save(step_file);
    if (par_.rank() == 0) link_atomically(step_file, out / "last.safetensors");
  }

  // A signal reaches each rank at its own moment: they stop together when any has seen one.
  bool stop_requested() const {
    double any = g_stop_signal.load() != 0 ? 1 : 0;
    if (par_.ranks() > 1) par_.sum(&any, 1);
    return any > 0;
  }

  // training.time_limit: the steps stop at `deadline`.
  void set_deadline(Clock::time_point deadline) { step_->deadline = deadline; }

  TrainState state;    // the next step, the best validation loss; generators' states when saved
  RoutingStats stats;  // the router's figures since the last logged step

 private:
  const Config& cfg_;
  Model& model_;
  ParallelTraining& par_;
  const Dataset& data_;
  AdamW adamw_;
  BatchSampler sampler_;
  Rng dropout_rng_, noise_rng_;
  Graph g_;
  std::optional<TrainStep> step_;  // made after the weights are in place
  // training.average_start: the running average of the weights, laid out as the model's.
  std::vector<float> average_;

  // Moves the average one step towards the weights just trained (the first one: them).
  void update_average() {
    float* a = average_.data();
    const float* w = model_.params().data();
    const auto n = int64_t(average_.size());
    if (state.average_count == 0) {
      std::copy(w, w + n, a);
    } else {
      const auto rate = float(std::max(1.0 - cfg_.training.average_decay, 1.0 / double(state.average_count + 1)));
      parallel_for(n, n > kParallelMinWork, [&](int64_t i) { a[i] += rate * (w[i] - a[i]); });
    }
    ++state.average_count;
  }

  // Exchanges the model's weights and the average, when there is one.
  void swap_average() {
    if (state.average_count == 0) return;
    std::swap_ranges(average_.begin(), average_.end(), model_.params().data());
  }
};

}  // namespace

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

void install_stop_signal_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

TrainStep::TrainStep(const Config& cfg, Model& model, AdamW& adamw, ParallelTraining& par, BatchSampler& sampler,
                     Rng& dropout_rng, Rng& noise_rng, Graph& g, RoutingStats* stats)
    : cfg_(cfg),
      model_(model),
      adamw_(adamw),
      par_(par),
      sampler_(sampler),
      g_(g),
      group_(adamw, model.params()),
      x_(size_t(cfg.training.batch_size * cfg.model.block_size)),
      y_(x_.size()) {
  fo_.training = true;
  fo_.dropout_rng = &dropout_rng;
  fo_.noise_rng = &noise_rng;
  fo_.stats = stats;
  fo_.distributed = par.ranks() > 1;
  fo_.grads_ready = par.overlap();
  g_.set_remake(!cfg.training.keep_activations);
  if (cfg.training.recompute) {
    if (par.ranks() > 1)
      throw std::invalid_argument("training.recompute runs in one process only; set it to false under mpirun");
    fo_.recompute = &recompute_g_;
  }
  grouped_ = par.ranks() == 1 && !(cfg.optimizer.grad_clip > 0);
  if (grouped_) {
    if (!model.params().grads_shared()) model.params().share_grads(model.grad_groups());
    fo_.grads_ready = &group_;
  }
}

StepResult TrainStep::run(int64_t step, bool grad_norm) {
  const int64_t R = par_.ranks();
  g_.clear();
  if (!grads_zero_) model_.params().zero_grad();
  grads_zero_ = false;
  sampler_.next(x_.data(), y_.data());
  StepResult res;
  res.lr = learning_rate(cfg_.optimizer, step, cfg_.training.max_steps);
  res.top_k = fo_.top_k = top_k_at(cfg_.router, step);
  res.l1_coef = model_.l1_coef();
  Model::Output o = model_.forward(g_, x_.data(), y_.data(), cfg_.training.batch_size, cfg_.model.block_size, fo_);
  // The global batch's loss, so that every rank takes the same decisions, and whether any rank
  // has seen a signal, in one all-reduce: a second one per step for the flag alone costs a
  // round trip between the processes.
  const bool late = deadline && Clock::now() >= *deadline;
  double sums[3] = {o.loss.data[0], g_stop_signal.load() != 0 ? 1.0 : 0.0, late ? 1.0 : 0.0};
  if (R > 1) par_.sum(sums, 3);
  res.loss = sums[0] / double(R);
  res.stop = sums[1] > 0;
  res.out_of_time = sums[2] > 0;
  if (!std::isfinite(res.loss))
    throw std::runtime_error("training diverged: loss is " + std::to_string(res.loss) + " at step " +
                             std::to_string(step) + "; the last good checkpoint is kept in " +
                             cfg_.logging.out_dir + " (try a lower optimizer.lr or optimizer.grad_clip)");
  if (grouped_) {
    group_.begin(res.lr, grad_norm);
    g_.backward(o.objective);
    res.grad_norm = group_.finish();
    grads_zero_ = true;
  } else {
    g_.backward(o.objective);
    par_.reduce_gradients();
    res.grad_norm = grad_norm || cfg_.optimizer.grad_clip > 0 ? par_.clip_grad_norm(cfg_.optimizer.grad_clip)
                                                               : std::numeric_limits<double>::quiet_NaN();
    adamw_.step(model_.params(), res.lr, par_.update_ranges(), true);
    grads_zero_ = par_.update_ranges() == nullptr;  // expert parallelism leaves other experts' ranges
  }
  model_.update_router_state();  // balancing bias, relu's L1 coefficient, expert choice's thresholds
  return res;
}

TrainResult train(const Config& cfg_in, const TrainOptions& opt) {
  const auto t_start = Clock::now();
  Config cfg = cfg_in;
  if (!opt.init.empty() && !opt.resume.empty())
    throw std::invalid_argument("--init and --resume do not go together: --resume continues a run (weights, optimizer, "
                                "step), --init starts a fresh one from a checkpoint's weights");
  CheckpointHeader resumed;
  if (!opt.resume.empty()) {
    resumed = read_checkpoint_header(opt.resume);
    check_resume_compatible(resumed.config, cfg, opt.resume);
  }
  CheckpointHeader init_header;
  if (!opt.init.empty()) init_header = read_checkpoint_header(opt.init);
  if (!opt.out_dir.empty()) cfg.logging.out_dir = opt.out_dir;
  set_thread_count(cfg);

  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size;
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, T);
  if (!opt.resume.empty() && data.tokenizer().vocab() != resumed.vocab)
    throw std::runtime_error("--resume " + opt.resume + ": the data file " + cfg.data.path +
                             " has a different vocabulary than the checkpoint");
  if (!opt.init.empty() && data.tokenizer().vocab() != init_header.vocab)
    throw std::runtime_error("--init " + opt.init + ": the data file " + cfg.data.path +
                             " has a different vocabulary than the checkpoint");
  Model model(cfg, int64_t(data.tokenizer().vocab().size()));
  ParallelTraining par(model, opt.expert_parallel);  // one process unless started by mpirun
  const int64_t R = par.ranks();
  TrainResult res;
  res.ranks = par.ranks();
  res.parameters = model.params().parameter_count();
  res.active_parameters = model.active_param_count();
  if (opt.dry_run) return res;

  RunLog log(cfg, opt, par);  // from here on the run directory is this run's alone
  Training run(cfg, model, par, data, opt.resume, resumed.state, opt.init);
  log.header(opt, model, data, par, run.state.step);
  if (cfg.training.time_limit > 0)
    run.set_deadline(t_start + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(cfg.training.time_limit)));

  const std::filesystem::path out = cfg.logging.out_dir;
  const int64_t max_steps = cfg.training.max_steps;
  res.last_val_loss = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> step_ms;
  log.start_loop(run.state.step);
  // Collective: the estimate at `step`, logged, and best.safetensors when it is the best.
  const auto evaluate_at = [&](int64_t step) {
    const EvalEstimate est = run.evaluate();
    res.last_val_loss = est.val_loss;
    log.evaluation(step, est, run.averaged());
    run.save_if_best(step, est.val_loss, out);
  };
  for (int64_t step = run.state.step; step < max_steps; ++step) {
    if (step % cfg.logging.eval_interval == 0 || step == max_steps - 1) {
      evaluate_at(step);
      if (run.stop_requested()) {  // a signal during the evaluation: stop before the next step
        res.interrupted = true;
        break;
      }
    }

    const bool log_now = (step + 1) % cfg.logging.log_interval == 0 || step + 1 == max_steps;
    const auto t0 = Clock::now();
    const StepResult sr = run.run_step(step, log_now);
    step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    res.last_train_loss = sr.loss;
    log.step(step, sr, step_ms.back(), double(R * B * T), run.stats, log_now);

    if (cfg.logging.checkpoint_interval > 0 && (step + 1) % cfg.logging.checkpoint_interval == 0)
      run.save_step(out);
    if (sr.stop) {
      res.interrupted = true;
      break;
    }
    if (sr.out_of_time) {  // training.time_limit: this step was the last; evaluate it as at max_steps
      res.out_of_time = true;
      evaluate_at(step + 1);
      break;
    }
  }
  run.save(out / "last.safetensors");
  log.done(res.interrupted, res.out_of_time, run.state.step, out / "last.safetensors");

  res.steps_done = run.state.step;
  res.best_val_loss = run.state.best_val_loss;
  res.median_step_ms = median(step_ms);
  if (!step_ms.empty()) res.reduce_ms_per_step = 1000 * par.reduce_seconds() / double(step_ms.size());
  res.wall_seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  return res;
}

}  // namespace moe
