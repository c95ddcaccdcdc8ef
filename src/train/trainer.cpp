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
#include <stdexcept>

#include "moe/data/dataset.hpp"
#include "moe/dist/comm.hpp"
#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/train/checkpoint.hpp"
#include "moe/train/evaluate.hpp"
#include "moe/train/parallel.hpp"

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

// Makes `to` name the same bytes as `from`, atomically: a hard link (or, where the file system
// has none, a copy) to a temporary name, then a rename over `to`.
void link_atomically(const std::filesystem::path& from, const std::filesystem::path& to) {
  namespace fs = std::filesystem;
  fs::path tmp = to;
  tmp += ".tmp";
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_hard_link(from, tmp, ec);
  if (ec) fs::copy_file(from, tmp, fs::copy_options::overwrite_existing);
  fs::rename(tmp, to);
}

// A fresh run must not silently mix with, or overwrite, another run's checkpoints.
void prepare_fresh_run_dir(const std::filesystem::path& out, bool overwrite) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(out)) return;
  std::vector<fs::path> old;
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() == ".safetensors" || name == "metrics.jsonl") old.push_back(e.path());
  }
  const bool has_checkpoints = std::any_of(old.begin(), old.end(), [](const fs::path& p) {
    return p.extension() == ".safetensors";
  });
  if (has_checkpoints && !overwrite)
    throw std::runtime_error("run directory " + out.string() +
                             " already holds checkpoints of an earlier run; continue it with --resume " +
                             (out / "last.safetensors").string() +
                             ", start afresh with --overwrite, or choose another --out");
  for (const fs::path& p : old) fs::remove(p);
}

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
  Model::Output o = model_.forward(g_, x_.data(), y_.data(), cfg_.training.batch_size, cfg_.model.block_size, fo_);
  // The global batch's loss, so that every rank takes the same decisions, and whether any rank
  // has seen a signal, in one all-reduce: a second one per step for the flag alone costs a
  // round trip between the processes.
  double sums[2] = {o.loss.data[0], g_stop_signal.load() != 0 ? 1.0 : 0.0};
  if (R > 1) par_.sum(sums, 2);
  res.loss = sums[0] / double(R);
  res.stop = sums[1] > 0;
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
  model_.update_balance_bias();  // no-op unless router.bias_update_rate > 0
  return res;
}

TrainResult train(const Config& cfg_in, const TrainOptions& opt) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  Config cfg = cfg_in;
  TrainState state;
  CheckpointHeader resumed;
  if (!opt.resume.empty()) {
    resumed = read_checkpoint_header(opt.resume);
    check_resume_compatible(resumed.config, cfg, opt.resume);
    state = resumed.state;
  }
  if (!opt.out_dir.empty()) cfg.logging.out_dir = opt.out_dir;
  if (cfg.training.threads > 0) omp_set_num_threads(int(cfg.training.threads));

  const int64_t B = cfg.training.batch_size, T = cfg.model.block_size;
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, T);
  if (!opt.resume.empty() && data.tokenizer().vocab() != resumed.vocab)
    throw std::runtime_error("--resume " + opt.resume + ": the data file " + cfg.data.path +
                             " has a different vocabulary than the checkpoint");
  Model model(cfg, int64_t(data.tokenizer().vocab().size()));
  ParallelTraining par(model, opt.expert_parallel);  // one process unless started by mpirun
  const int64_t R = par.ranks();
  const bool lead = par.rank() == 0;  // writes the logs, metrics and checkpoints
  const bool quiet = opt.quiet || !lead;
  // Several processes on one machine share its cores: unless told otherwise (training.threads
  // or OMP_NUM_THREADS), each takes its share, since more threads than cores make every
  // OpenMP barrier wait for a thread that is not running.
  if (cfg.training.threads == 0 && dist::local_size() > 1 && !std::getenv("OMP_NUM_THREADS"))
    omp_set_num_threads(std::max(1, omp_get_num_procs() / dist::local_size()));
  TrainResult res;
  res.ranks = par.ranks();
  res.parameters = model.params().parameter_count();
  res.active_parameters = model.active_param_count();
  if (opt.dry_run) return res;
  AdamW adamw(cfg.optimizer, model.params());
  BatchSampler sampler(data.train(), B, T, Rng(cfg.training.seed, kStreamData));
  Rng dropout_rng(cfg.training.seed, kStreamDropout), noise_rng(cfg.training.seed, kStreamNoise);
  // Each rank draws its rows' share of one global batch of R·B rows, and their share of the
  // dropout and noise numbers, so R ranks draw what one process with batch R·B would.
  sampler.set_shard(par.rank(), R);
  dropout_rng.set_shard(uint64_t(par.rank()), uint64_t(R));
  noise_rng.set_shard(uint64_t(par.rank()), uint64_t(R));
  if (opt.resume.empty()) {
    Rng init_rng(cfg.training.seed, kStreamInit);
    model.init(init_rng);
  } else {
    load_checkpoint_tensors(opt.resume, model, &adamw);
    sampler.set_state(state.data_rng);
    dropout_rng.set_state(state.dropout_rng);
    noise_rng.set_state(state.noise_rng);
  }

  namespace fs = std::filesystem;
  const fs::path out = cfg.logging.out_dir;
  std::ofstream metrics;  // stays closed on the other ranks: writes to it do nothing
  if (lead) {
    if (opt.resume.empty()) prepare_fresh_run_dir(out, opt.overwrite);
    fs::create_directories(out);
    {
      std::ofstream f(out / "config.json");
      f << config_to_json(cfg).dump(2) << "\n";
      if (!f) throw std::runtime_error("cannot write " + (out / "config.json").string());
    }
    metrics.open(out / "metrics.jsonl", std::ios::app);
    if (!metrics) throw std::runtime_error("cannot open " + (out / "metrics.jsonl").string() + " for writing");
  }

  if (opt.expert_parallel && R == 1 && !opt.quiet)
    spdlog::warn("--expert-parallel has no effect in one process: start moe with mpirun -np N (N > 1)");
  if (!quiet) {
    if (R > 1)
      spdlog::info("{} over {} processes ({} on this machine, {} thread(s) each): batch {} per process, {} in all",
                   par.expert_parallel() ? "expert parallel" : "data parallel", R, dist::local_size(),
                   omp_get_max_threads(), B, R * B);
    spdlog::info("config:\n{}", config_to_json(cfg).dump(2));
    spdlog::info("model: {} parameters ({} active per token), vocabulary {}, {} train / {} val tokens",
                 model.params().parameter_count(), model.active_param_count(), model.vocab_size(),
                 data.train().size(), data.val().size());
    if (!opt.resume.empty()) spdlog::info("resumed from {} at step {}", opt.resume, state.step);
  }

  auto save = [&](const fs::path& path) {
    par.share_experts(&adamw);  // collective: every rank saves at the same steps
    if (!lead) return;
    state.data_rng = sampler.state();
    state.dropout_rng = dropout_rng.state();
    state.noise_rng = noise_rng.state();
    save_checkpoint(path.string(), model, &adamw, data.tokenizer().vocab(), state);
  };

  // A signal reaches each rank at its own moment: they stop together when any has seen one.
  auto stop_requested = [&] {
    double any = g_stop_signal.load() != 0 ? 1 : 0;
    if (R > 1) par.sum(&any, 1);
    return any > 0;
  };

  res.last_val_loss = std::numeric_limits<double>::quiet_NaN();
  Graph g;
  RoutingStats stats;  // over the logging window
  TrainStep train_step(cfg, model, adamw, par, sampler, dropout_rng, noise_rng, g, &stats);
  std::vector<double> step_ms;
  const int64_t max_steps = cfg.training.max_steps;
  double window_tokens = 0, window_seconds = 0;
  const int64_t first_step = state.step;
  const auto t_loop = clock::now();
  for (int64_t step = state.step; step < max_steps; ++step) {
    if (step % cfg.logging.eval_interval == 0 || step == max_steps - 1) {
      par.share_experts(nullptr);
      // Each rank runs its share of the batches; the sums make the estimate on every rank.
      // The step's graphs, idle now, run the first two threads' forwards. Evaluations and steps
      // lay out their memory differently: the graphs give their pages back before and after,
      // so that the peak is the larger of the two layouts, not their union (a few ms a time).
      const auto release = [&] {
        g.release();
        train_step.recompute_graph().release();
      };
      release();
      EvalEstimate est = estimate_loss(model, data, cfg, g, par.rank(), par.ranks(), 0, &train_step.recompute_graph());
      release();
      if (R > 1) {
        double both[2] = {est.train_loss, est.val_loss};
        par.sum(both, 2);
        est.train_loss = both[0], est.val_loss = both[1];
      }
      res.last_val_loss = est.val_loss;
      metrics << nlohmann::json{{"step", step}, {"train_loss", est.train_loss}, {"val_loss", est.val_loss}}.dump()
              << "\n" << std::flush;
      if (!quiet)
        spdlog::info("step {}: train loss {:.4f}, val loss {:.4f}", step, est.train_loss, est.val_loss);
      if (est.val_loss < state.best_val_loss) {
        state.best_val_loss = est.val_loss;
        state.step = step;
        save(out / "best.safetensors");
      }
      if (stop_requested()) {  // a signal during the evaluation: stop before the next step
        res.interrupted = true;
        break;
      }
    }

    const bool log_now = (step + 1) % cfg.logging.log_interval == 0 || step + 1 == max_steps;
    const auto t0 = clock::now();
    const StepResult sr = train_step.run(step, log_now);
    const double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    step_ms.push_back(ms);
    window_tokens += double(R * B * T);
    window_seconds += ms / 1000.0;
    res.last_train_loss = sr.loss;
    state.step = step + 1;

    if (log_now) {
      const double tok_s = window_tokens / std::max(1e-9, window_seconds);
      // Wall clock so far (evaluations and checkpoints included) per step done in this run.
      const double elapsed = std::chrono::duration<double>(clock::now() - t_loop).count();
      const double eta = elapsed / double(step + 1 - first_step) * double(max_steps - step - 1);
      nlohmann::json j{{"step", step + 1}, {"loss", sr.loss}, {"lr", sr.lr}, {"grad_norm", sr.grad_norm},
                       {"tokens_per_s", tok_s}};
      j["tokens_per_expert"] = stats.tokens_per_expert;
      const nlohmann::json health = stats.health();
      j["router"] = health;
      double worst_violation = 0, dropped = 0;
      for (const auto& layer : health) {
        worst_violation = std::max(worst_violation, layer["max_violation"].get<double>());
        dropped += layer["dropped_frac"].get<double>() / double(health.size());
      }
      metrics << j.dump() << "\n" << std::flush;
      if (!quiet)
        spdlog::info("step {}/{} | loss {:.4f} | lr {:.2e} | grad norm {:.3f} | max load {:+.0f}%{} | {:.0f} tok/s | ETA {}",
                     step + 1, max_steps, sr.loss, sr.lr, sr.grad_norm, 100 * worst_violation,
                     cfg.router.capacity_factor > 0 ? fmt::format(" | dropped {:.1f}%", 100 * dropped) : "",
                     tok_s, format_duration(eta));
      window_tokens = window_seconds = 0;
      stats = RoutingStats();
    }
    if (cfg.logging.checkpoint_interval > 0 && (step + 1) % cfg.logging.checkpoint_interval == 0) {
      const fs::path step_file = out / ("step_" + std::to_string(step + 1) + ".safetensors");
      save(step_file);
      if (lead) link_atomically(step_file, out / "last.safetensors");  // last.safetensors: always the newest
    }
    if (sr.stop) {
      res.interrupted = true;
      break;
    }
  }
  save(out / "last.safetensors");
  if (!quiet)
    spdlog::info("{} at step {}: checkpoint {}", res.interrupted ? "interrupted" : "done", state.step,
                 (out / "last.safetensors").string());
  res.steps_done = state.step;
  res.best_val_loss = state.best_val_loss;
  res.median_step_ms = median(step_ms);
  if (!step_ms.empty()) res.reduce_ms_per_step = 1000 * par.reduce_seconds() / double(step_ms.size());
  res.wall_seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  return res;
}

}  // namespace moe
