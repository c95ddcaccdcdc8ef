// moe: the command-line front end (train, generate, eval, inspect, bench, serve).
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <omp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moe/data/dataset.hpp"
#include "moe/data/tokenizer.hpp"
#include "moe/dist/comm.hpp"
#include "moe/generate/generator.hpp"
#include "moe/inspect/inspect.hpp"
#include "moe/io/config.hpp"
#ifdef MOE_HAVE_SERVE
#include "moe/serve/server.hpp"
#endif
#include "moe/train/bench.hpp"
#include "moe/train/checkpoint.hpp"
#include "moe/train/evaluate.hpp"
#include "moe/train/upcycle.hpp"
#include "moe/train/trainer.hpp"

namespace {

using namespace moe;

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path + " (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// How OpenMP threads wait at barriers (see bound_openmp_spinning, before main).
std::string openmp_wait() {
  for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
    if (const char* v = std::getenv(name)) return std::string(name) + "=" + v;
  return "libgomp's default";
}

int run_train(const std::string& config_path, const std::string& resume, const std::string& init_from,
              const std::string& out_dir, bool overwrite, bool dry_run, bool expert_parallel) {
  Config cfg = load_config(config_path);
  install_stop_signal_handlers();
  TrainOptions opt;
  opt.resume = resume;
  opt.init = init_from;
  opt.out_dir = out_dir;
  opt.overwrite = overwrite;
  opt.dry_run = dry_run;
  opt.expert_parallel = expert_parallel;
  TrainResult r = train(cfg, opt);
  if (dry_run) {
    std::printf("%s\n", nlohmann::json{{"config", config_path},
                                       {"parameters", r.parameters},
                                       {"active_parameters", r.active_parameters},
                                       {"resolved", config_to_json(cfg)}}
                            .dump()
                            .c_str());
    return 0;
  }
  spdlog::info("final train loss {:.4f}, last val loss {:.4f}, best val loss {:.4f}; {:.1f} s, median step {:.1f} ms",
               r.last_train_loss, r.last_val_loss, r.best_val_loss, r.wall_seconds, r.median_step_ms);
  if (r.ranks > 1)
    spdlog::info("{} processes; gradient all-reduce {:.1f} ms per step on average", r.ranks, r.reduce_ms_per_step);
  return r.interrupted ? 128 + g_stop_signal.load() : 0;
}

// moe generate --profile: where the time went, to stderr.
void print_generate_profile(const DecodeProfile& p, double load_s, double checksum_s, double wall_s, int64_t chars) {
  std::fprintf(stderr, "moe generate --profile: %lld characters in %.3f s (%.0f characters/s), %d thread(s)\n",
               static_cast<long long>(chars), wall_s, double(chars) / wall_s, omp_get_max_threads());
  std::fprintf(stderr, "  load (header, weights, decode layout)  %8.1f ms\n", 1e3 * load_s);
  std::fprintf(stderr, "  checksum, on its own thread            %8.1f ms (overlaps the first characters)\n",
               1e3 * checksum_s);
  double accounted = load_s;
  for (int kind = 0; kind < 2; ++kind) {
    if (p.calls[kind] == 0 || p.seconds.empty()) continue;
    double sum = 0;
    for (int part = 0; part < DecodeProfile::kParts; ++part) sum += p.total(kind, part);
    accounted += sum;
    std::fprintf(stderr, "  %s: %lld calls, %lld positions, %.1f ms (%.1f us a call)\n",
                 kind == 0 ? "one-position decodes (a character each)" : "decodes of several positions (prompt, re-encoded contexts)",
                 static_cast<long long>(p.calls[kind]), static_cast<long long>(p.positions[kind]), 1e3 * sum,
                 1e6 * sum / double(p.calls[kind]));
    std::fprintf(stderr, "    %-8s", "layer");
    for (int part = 0; part < DecodeProfile::kParts; ++part) std::fprintf(stderr, " %15s", DecodeProfile::part_name(part));
    std::fprintf(stderr, "   (ms)\n");
    for (int64_t l = 0; l <= p.layers; ++l) {
      if (l == p.layers) std::fprintf(stderr, "    %-8s", "outside");
      else std::fprintf(stderr, "    %-8lld", static_cast<long long>(l));
      for (int part = 0; part < DecodeProfile::kParts; ++part) std::fprintf(stderr, " %15.1f", 1e3 * p.at(kind, l, part));
      std::fprintf(stderr, "\n");
    }
    std::fprintf(stderr, "    %-8s", "total");
    for (int part = 0; part < DecodeProfile::kParts; ++part) std::fprintf(stderr, " %15.1f", 1e3 * p.total(kind, part));
    std::fprintf(stderr, "\n");
  }
  accounted += p.sampling + p.output;
  std::fprintf(stderr, "  sampling %.1f ms, output %.1f ms, the rest %.1f ms\n", 1e3 * p.sampling, 1e3 * p.output,
               1e3 * (wall_s - accounted));
}

int run_generate(const std::string& ckpt, const std::string& prompt_arg, const std::string& prompt_file,
                 int64_t max_new, GenerateOptions gopt, bool profile) {
  // One thread unless OMP_NUM_THREADS says otherwise: a token's products are too small for a
  // team (two threads took 3.5x the CPU time and 3x the wall time of one on the shared 2-core
  // machine), and the bits are the same for any count.
  if (!std::getenv("OMP_NUM_THREADS")) omp_set_num_threads(1);
  const double t_start = DecodeProfile::now();
  InferenceModel l = load_for_inference(ckpt, true);
  l.model->use_decode_layout();  // decoding only from here: the same bits, faster
  const double load_s = DecodeProfile::now() - t_start;
  // The checksum covers the whole file (the AdamW moments too): checked on a thread of its
  // own while the first characters are computed. Nothing is printed until it has passed.
  double checksum_s = 0;
  std::future<void> checked = std::async(std::launch::async, [&] {
    const double t0 = DecodeProfile::now();
    l.check_checksum();
    checksum_s = DecodeProfile::now() - t0;
  });
  bool verified = false;
  std::string held;
  const bool tty = isatty(fileno(stdout));
  // Each character as it comes on a terminal; elsewhere a line at a time (a write per
  // character cost 10% of the time).
  const auto emit = [&](const std::string& s, bool flush) {
    if (!verified) {
      held += s;
      if (checked.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return;
      checked.get();  // throws on a mismatch: nothing was printed
      verified = true;
      std::fwrite(held.data(), 1, held.size(), stdout);
      held.clear();
    } else {
      std::fwrite(s.data(), 1, s.size(), stdout);
    }
    if (flush) std::fflush(stdout);
  };
  const std::string prompt = prompt_file.empty() ? prompt_arg : read_file(prompt_file);
  std::vector<int32_t> ids;
  try {
    ids = l.tokenizer.encode(prompt);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("prompt: ") + e.what());
  }
  DecodeProfile prof;
  if (profile) gopt.profile = &prof;
  Generator gen(*l.model, gopt);
  emit(prompt, tty);
  gen.generate(ids, max_new, [&](int32_t id) {
    const std::string s = l.tokenizer.decode({id});
    emit(s, tty || s == "\n");
  });
  if (!verified) {
    checked.get();
    verified = true;
  }
  held += '\n';
  std::fwrite(held.data(), 1, held.size(), stdout);
  std::fflush(stdout);
  if (profile) print_generate_profile(prof, load_s, checksum_s, DecodeProfile::now() - t_start, max_new);
  return 0;
}

int run_eval(const std::string& ckpt, const std::string& data_path, const std::string& split, bool as_json,
             int64_t batch_size) {
  InferenceModel l = load_for_inference(ckpt);
  const Config& cfg = l.header.config;
  const std::string path = data_path.empty() ? cfg.data.path : data_path;
  // Encoded with the checkpoint's vocabulary; split as in training.
  Dataset data = Dataset::load(path, cfg.data.train_fraction, cfg.model.block_size, &l.tokenizer);
  const TokenSpan part = split == "train" ? data.train() : data.val();
  Graph g;
  const int64_t B = batch_size > 0 ? batch_size : cfg.training.batch_size;
  SplitEvaluation ev = evaluate_split(*l.model, part, B, g);
  // Expert choice is not causal in training: its loss with the batch rule, beside the causal
  // rule's (the thresholds, which decoding uses too) that "loss" reports.
  const bool ec = cfg.router.gating == Gating::kExpertChoice;
  const double batch_loss = ec ? evaluate_split(*l.model, part, B, g, nullptr, true).loss : 0.0;
  const nlohmann::json health = ev.routing.health();
  nlohmann::json usage = nlohmann::json::array();
  for (const auto& layer : health) usage.push_back(layer.is_null() ? layer : layer["load"]);  // null: a dense block
  if (as_json) {
    nlohmann::json j{{"checkpoint", ckpt}, {"data", path},          {"split", split},
                     {"tokens", ev.tokens}, {"loss", ev.loss},      {"perplexity", ev.perplexity},
                     {"bits_per_char", ev.bits_per_char},           {"expert_usage", usage},
                     {"router", health}};
    if (ec) j["expert_choice"] = {{"loss_causal", ev.loss}, {"loss_batch", batch_loss}};
    std::cout << j.dump(2) << "\n";
  } else {
    std::printf("%s split of %s: %lld tokens\nloss %.4f | perplexity %.3f | bits/char %.4f\n", split.c_str(),
                path.c_str(), (long long)ev.tokens, ev.loss, ev.perplexity, ev.bits_per_char);
    if (ec)
      std::printf("expert choice: loss %.4f with the causal thresholds (above), %.4f with the batch rule of "
                  "training (not causal)\n", ev.loss, batch_loss);
    std::printf("router health per layer (load: fraction of routed slots per expert):\n");
    for (size_t l2 = 0; l2 < health.size(); ++l2) {
      const auto& h = health[l2];
      if (h.is_null()) {
        std::printf("  layer %zu: dense (no router)\n", l2);
        continue;
      }
      std::printf("  layer %zu: max violation %.3f | dropped %.3f | entropy %.3f | aux %.4f | z %.3f | load",
                  l2, h["max_violation"].get<double>(), h["dropped_frac"].get<double>(),
                  h["router_entropy"].get<double>(), h["aux_loss"].get<double>(), h["z_loss"].get<double>());
      for (const auto& f : h["load"]) std::printf(" %.3f", f.get<double>());
      if (h.contains("experts_per_token"))
        std::printf(" | experts/token %.2f ± %.2f [%lld, %lld]", h["experts_per_token"]["mean"].get<double>(),
                    h["experts_per_token"]["std"].get<double>(), (long long)h["experts_per_token"]["min"].get<int64_t>(),
                    (long long)h["experts_per_token"]["max"].get<int64_t>());
      std::printf("\n");
    }
  }
  return 0;
}

int run_inspect(const std::string& ckpt, const std::string& data_path, const std::string& split, bool as_json,
                const std::string& out_dir, const InspectOptions& opt) {
  InferenceModel l = load_for_inference(ckpt);
  const Config& cfg = l.header.config;
  const std::string path = data_path.empty() ? cfg.data.path : data_path;
  Dataset data = Dataset::load(path, cfg.data.train_fraction, cfg.model.block_size, &l.tokenizer);
  nlohmann::json report = inspect_split(*l.model, l.tokenizer, split == "train" ? data.train() : data.val(), opt);
  report["checkpoint"] = ckpt;
  report["data"] = path;
  report["split"] = split;
  if (!out_dir.empty()) {
    std::filesystem::create_directories(out_dir);
    const std::string file = out_dir + "/inspect.json";
    std::ofstream f(file);
    if (!(f << report.dump() << "\n")) throw std::runtime_error("cannot write " + file);
    spdlog::info("wrote {} (heatmaps: bash scripts/py.sh scripts/plot_inspect.py {})", file, file);
  }
  if (as_json)
    std::cout << report.dump(2) << "\n";
  else
    std::cout << inspect_summary(report);
  return 0;
}

// The profile's parts, per step (ms), in forward, backward and both, with each one's share of the step.
nlohmann::json profile_json(const BenchResult& r) {
  nlohmann::json parts = nlohmann::json::array();
  const double n = double(r.steps);
  for (int p = 0; p < int(Part::Count); ++p) {
    const StepProfile& sp = r.profile;
    parts.push_back({{"part", part_name(Part(p))},
                     {"forward_ms", sp.ms[int(Phase::Forward)][p] / n},
                     {"backward_ms", sp.ms[int(Phase::Backward)][p] / n},
                     {"ms", sp.part_ms(Part(p)) / n},
                     {"share", sp.part_ms(Part(p)) / r.profiled_ms}});
  }
  return {{"step_ms_mean", r.profiled_ms / n}, {"parts_ms", r.profile.total_ms() / n}, {"parts", parts}};
}

void print_profile(const BenchResult& r) {
  const double n = double(r.steps);
  std::printf("step profile   mean of %lld steps, %.1f ms a step (parts add up to %.1f)\n", (long long)r.steps,
              r.profiled_ms / n, r.profile.total_ms() / n);
  std::printf("  %-15s %9s %9s %9s %6s\n", "part", "forward", "backward", "total", "share");
  for (int p = 0; p < int(Part::Count); ++p) {
    const StepProfile& sp = r.profile;
    std::printf("  %-15s %9.2f %9.2f %9.2f %5.1f%%\n", part_name(Part(p)), sp.ms[int(Phase::Forward)][p] / n,
                sp.ms[int(Phase::Backward)][p] / n, sp.part_ms(Part(p)) / n, 100 * sp.part_ms(Part(p)) / r.profiled_ms);
  }
}

int run_bench_cmd(const std::string& config_path, int64_t steps, int threads, int64_t chars, bool as_json,
                  bool profile) {
  Config cfg = load_config(config_path);
  BenchResult r = run_bench(cfg, steps, threads, chars, profile);
  nlohmann::json j{{"config", config_path},
                   {"threads", r.threads},
                   {"gemm_kernel", r.gemm_kernel},
                   {"precision", r.precision},
                   {"steps", r.steps},
                   {"step_ms_median", r.step_ms_median},
                   {"step_ms_min", r.step_ms_min},
                   {"step_ms_max", r.step_ms_max},
                   {"forward_ms_median", r.forward_ms_median},
                   {"tokens_per_s", r.tokens_per_s},
                   {"gflop_per_step", r.flops_per_step / 1e9},
                   {"gflop_per_s", r.gflops_per_s},
                   {"generate_chars_per_s", r.generate_chars_per_s},
                   {"peak_rss_mb", r.peak_rss_mb},
                   {"memory_mb",
                    {{"parameters", r.params_mb},
                     {"gradients", r.grads_mb},
                     {"adamw_moments", r.moments_mb},
                     {"activations", r.activations_mb},
                     {"activation_gradients", r.activation_grads_mb}}},
                   {"openmp_wait", openmp_wait()}};
  if (r.profiled) j["profile"] = profile_json(r);
  if (as_json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("%s, %d thread(s), %lld timed steps, gemm kernel %s, precision %s, OpenMP waits %s\n",
              config_path.c_str(), r.threads, (long long)r.steps, r.gemm_kernel, r.precision, openmp_wait().c_str());
  std::printf("training step  median %.1f ms (min %.1f, max %.1f) | %.0f tokens/s\n", r.step_ms_median,
              r.step_ms_min, r.step_ms_max, r.tokens_per_s);
  std::printf("model FLOPs    %.2f GFLOP per step (forward %.2f) | %.1f GFLOP/s achieved\n", r.flops_per_step / 1e9,
              r.forward_flops / 1e9, r.gflops_per_s);
  std::printf("forward only   median %.1f ms\n", r.forward_ms_median);
  std::printf("generation     %.0f characters/s (KV cache)\n", r.generate_chars_per_s);
  std::printf("peak memory    %.1f MB resident in the training steps\n", r.peak_rss_mb);
  std::printf("  of which      parameters %.1f, gradients %.1f, AdamW moments %.1f, activations %.1f, "
              "activation gradients %.1f MB (resident)\n",
              r.params_mb, r.grads_mb, r.moments_mb, r.activations_mb, r.activation_grads_mb);
  if (r.profiled) print_profile(r);
  return 0;
}

std::string fmt_number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

#ifndef MOE_HAVE_SERVE
// `moe serve`: the server and its libraries live in moe-serve, beside this binary (see
// CMakeLists.txt), which gets the same arguments.
void exec_moe_serve(char** argv) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return;
  const std::string server = (self.parent_path() / "moe-serve").string();
  if (!std::filesystem::exists(server, ec)) return;
  argv[0] = const_cast<char*>(server.c_str());
  execv(server.c_str(), argv);
}
#endif

int run(int argc, char** argv) {
  CLI::App app{"moe: train, sample and evaluate character-level sparse Mixture-of-Experts language models"};
  app.require_subcommand(1);
  // Parse errors in the same one-line form as every other error, pointing at the right --help.
  app.failure_message([](const CLI::App* failed, const CLI::Error& e) {
    std::string help = "moe --help";
    for (const CLI::App* sub : failed->get_subcommands()) help = "moe " + sub->get_name() + " --help";
    return "moe: error: " + std::string(e.what()) + " (see " + help + ")\n";
  });
  spdlog::set_pattern("[%H:%M:%S] %v");

  std::string config_path, resume, out_dir;
  auto* train_cmd = app.add_subcommand("train", "train a model from a JSON config");
  train_cmd->add_option("--config", config_path, "JSON config file")->required();
  train_cmd->add_option("--resume", resume, "checkpoint to resume from (exact continuation)");
  train_cmd->add_option("--out", out_dir, "run directory (default: the config's logging.out_dir)");
  std::string init_from;
  train_cmd->add_option("--init", init_from, "start a fresh run (step 0, fresh optimizer) from this checkpoint's "
                                             "weights, e.g. moe upcycle's output; not with --resume");

  std::string up_from, up_config, up_out;
  UpcycleOptions up_opt;
  auto* up_cmd = app.add_subcommand("upcycle", "make an MoE checkpoint whose experts are copies of a dense model's FFN");
  up_cmd->add_option("--from", up_from, "dense checkpoint (router.num_experts 1)")->required();
  up_cmd->add_option("--config", up_config, "the MoE model's JSON config")->required();
  up_cmd->add_option("--out", up_out, "checkpoint to write (.safetensors)")->required();
  up_cmd->add_option("--noise", up_opt.noise, "std of Gaussian noise added to each expert copy (default 0)");
  up_cmd->add_option("--seed", up_opt.seed, "seed of that noise (default 0)");
  bool overwrite = false, dry_run = false, expert_parallel = false;
  train_cmd->add_flag("--dry-run", dry_run, "check the config and data, print the resolved config and the "
                                            "parameter counts as JSON, and exit");
  train_cmd->add_flag("--overwrite", overwrite, "start afresh in a run directory that holds an earlier run's "
                                                "checkpoints (they are deleted)");
  train_cmd->add_flag("--expert-parallel", expert_parallel,
                      "under mpirun: each process computes and updates only its share of every layer's "
                      "experts (router.num_experts must be a multiple of the number of processes)");

  std::string ckpt, prompt, prompt_file;
  int64_t max_new = 500;
  GenerateOptions gopt;
  auto* gen_cmd = app.add_subcommand("generate", "sample text from a checkpoint");
  gen_cmd->add_option("--checkpoint", ckpt, "checkpoint file (.safetensors)")->required();
  auto* p_opt = gen_cmd->add_option("--prompt", prompt, "text to continue");
  gen_cmd->add_option("--prompt-file", prompt_file, "file whose text to continue")->excludes(p_opt);
  gen_cmd->add_option("--max-new-tokens", max_new, "characters to generate");
  gen_cmd->add_option("--temperature", gopt.sampling.temperature, "softmax temperature; 0 is greedy");
  gen_cmd->add_option("--top-k", gopt.sampling.top_k, "keep the k most likely characters (0: all)");
  gen_cmd->add_option("--top-p", gopt.sampling.top_p, "nucleus sampling mass in (0, 1]");
  gen_cmd->add_option("--seed", gopt.seed, "random seed (same seed, same text)");
  bool gen_profile = false;
  gen_cmd->add_flag("--profile", gen_profile,
                    "print where the time went to stderr: load, checksum, and per layer attention, router, "
                    "experts, norms, thread wait, head, for one-character decodes and re-encoded contexts apart");
  gen_cmd->add_option("--context-keep", gopt.context_keep,
                      "when the context is full, keep this many characters (block_size: exact full-window "
                      "recomputation; default block_size/2). Learned positions only: with model.position "
                      "\"rope\" the cache rolls and this does not apply");

  std::string data_path, split = "val";
  bool as_json = false;
  int64_t eval_batch = 0;
  auto* eval_cmd = app.add_subcommand("eval", "measure a checkpoint's loss on a whole split");
  eval_cmd->add_option("--checkpoint", ckpt, "checkpoint file (.safetensors)")->required();
  eval_cmd->add_option("--data", data_path, "text file (default: the config's data.path)");
  eval_cmd->add_option("--split", split, "val or train")->check(CLI::IsMember({"val", "train"}));
  eval_cmd->add_option("--batch-size", eval_batch, "windows per forward pass (default: training batch size)");
  eval_cmd->add_flag("--json", as_json, "print JSON");

  std::string inspect_out;
  InspectOptions iopt;
  auto* inspect_cmd = app.add_subcommand("inspect", "what each expert takes over a whole split: characters, "
                                                    "classes, word positions, agreement across layers");
  inspect_cmd->add_option("--checkpoint", ckpt, "checkpoint file (.safetensors)")->required();
  inspect_cmd->add_option("--data", data_path, "text file (default: the config's data.path)");
  inspect_cmd->add_option("--split", split, "val or train")->check(CLI::IsMember({"val", "train"}));
  inspect_cmd->add_option("--batch-size", iopt.batch_size, "windows per forward pass (default: training batch size)");
  inspect_cmd->add_option("--top-chars", iopt.top_chars, "characters listed per expert, by lift");
  inspect_cmd->add_flag("--json", as_json, "print the whole report as JSON");
  inspect_cmd->add_option("--out", inspect_out, "also write DIR/inspect.json (for scripts/plot_inspect.py)");

  struct {
    std::string runs = "runs", host = "127.0.0.1", web, data;
    int port = 8080;
    int64_t max_new = 2000;
    int samplers = 2;
  } sv;
  auto* serve_cmd = app.add_subcommand("serve", "a local web dashboard over run and sweep directories (read-only)");
  serve_cmd->add_option("--runs", sv.runs, "directory of runs and sweeps (default: runs)");
  serve_cmd->add_option("--port", sv.port, "port (0: any free port; the address is printed)");
  serve_cmd->add_option("--host", sv.host, "address to bind (default 127.0.0.1: this machine only)");
  serve_cmd->add_option("--web", sv.web, "front-end directory (default: src/serve/web of the source tree)");
  serve_cmd->add_option("--data", sv.data, "text for the Inspect page (default: each checkpoint's data.path)");
  serve_cmd->add_option("--max-new-tokens", sv.max_new, "longest sample a request may ask for");
  serve_cmd->add_option("--max-samplers", sv.samplers, "sampling requests served at once");

  std::string bench_config;
  int64_t bench_steps = 20, bench_chars = 500;
  int bench_threads = 0;
  bool bench_profile = false;
  auto* bench_cmd = app.add_subcommand("bench", "time training steps, the forward pass and generation");
  bench_cmd->add_option("--config", bench_config, "JSON config file")->required();
  bench_cmd->add_option("--steps", bench_steps, "timed steps (after 3 warm-up steps)");
  bench_cmd->add_option("--threads", bench_threads, "OpenMP threads (0: default)");
  bench_cmd->add_option("--generate", bench_chars, "characters to generate for the generation timing");
  bench_cmd->add_flag("--json", as_json, "print JSON");
  bench_cmd->add_flag("--profile", bench_profile,
                      "time the training steps by part (GEMM, attention, routing, norms, AdamW...), forward and backward");

  CLI11_PARSE(app, argc, argv);
  // Numeric flags, checked here so every message says which flag, what it got and what is allowed.
  std::string bad;
  auto need = [&](bool ok, const std::string& flag, double got, const char* allowed) {
    if (!ok && bad.empty()) bad = flag + " must be " + allowed + ", got " + fmt_number(got);
  };
  if (*gen_cmd) {
    need(max_new >= 0, "--max-new-tokens", double(max_new), ">= 0");
    need(gopt.sampling.temperature >= 0, "--temperature", gopt.sampling.temperature, ">= 0 (0 is greedy)");
    need(gopt.sampling.top_k >= 0, "--top-k", double(gopt.sampling.top_k), ">= 0 (0 keeps all)");
    need(gopt.sampling.top_p > 0 && gopt.sampling.top_p <= 1, "--top-p", gopt.sampling.top_p, "in (0, 1]");
    need(gopt.context_keep >= 0, "--context-keep", double(gopt.context_keep), ">= 0");
  }
  if (*up_cmd) need(up_opt.noise >= 0, "--noise", up_opt.noise, ">= 0");
  if (*eval_cmd) need(eval_batch >= 1 || eval_cmd->count("--batch-size") == 0, "--batch-size", double(eval_batch), ">= 1");
  if (*inspect_cmd) {
    need(iopt.batch_size >= 1 || inspect_cmd->count("--batch-size") == 0, "--batch-size", double(iopt.batch_size), ">= 1");
    need(iopt.top_chars >= 0, "--top-chars", double(iopt.top_chars), ">= 0");
  }
  if (*serve_cmd) {
    need(sv.port >= 0 && sv.port <= 65535, "--port", double(sv.port), "in [0, 65535]");
    need(sv.max_new >= 1, "--max-new-tokens", double(sv.max_new), ">= 1");
    need(sv.samplers >= 1, "--max-samplers", double(sv.samplers), ">= 1");
  }
  if (*bench_cmd) {
    need(bench_steps >= 1, "--steps", double(bench_steps), ">= 1");
    need(bench_threads >= 0, "--threads", double(bench_threads), ">= 0 (0: the default)");
    need(bench_chars >= 0, "--generate", double(bench_chars), ">= 0");
  }
  if (!bad.empty()) {
    std::fprintf(stderr, "moe: error: %s\n", bad.c_str());
    return 2;
  }
  try {
    if (dist::size() > 1 && !*train_cmd)
      throw std::runtime_error(app.get_subcommands().front()->get_name() +
                               " runs in one process: start it without mpirun (only train runs across processes)");
    if (dist::rank() > 0) spdlog::set_level(spdlog::level::warn);  // rank 0 reports for all
    if (*train_cmd) return run_train(config_path, resume, init_from, out_dir, overwrite, dry_run, expert_parallel);
    if (*up_cmd) {
      upcycle(up_from, load_config(up_config), up_out, up_opt);
      std::printf("wrote %s: %s upcycled to the config %s\n", up_out.c_str(), up_from.c_str(), up_config.c_str());
      return 0;
    }
    if (*gen_cmd) return run_generate(ckpt, prompt, prompt_file, max_new, gopt, gen_profile);
    if (*eval_cmd) return run_eval(ckpt, data_path, split, as_json, eval_batch);
    if (*inspect_cmd) return run_inspect(ckpt, data_path, split, as_json, inspect_out, iopt);
    if (*serve_cmd) {
#ifdef MOE_HAVE_SERVE
      ServeOptions so;
      so.runs_dir = sv.runs, so.host = sv.host, so.port = sv.port, so.web_dir = sv.web, so.data = sv.data;
      so.max_new_tokens = sv.max_new, so.max_samplers = sv.samplers;
      serve(so);
      return 0;
#else
      exec_moe_serve(argv);  // returns only when there is none
      throw std::runtime_error("moe serve needs moe-serve beside moe, built with cpp-httplib: run bash scripts/setup.sh "
                               "--serve and build again");
#endif
    }
    if (*bench_cmd) return run_bench_cmd(bench_config, bench_steps, bench_threads, bench_chars, as_json, bench_profile);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe: error: %s\n", e.what());
    return 1;
  }
  return 0;
}

// libgomp lets a thread that waits at a barrier spin 300,000 times before it sleeps. When
// another process holds one of the cores, the waiting thread burns its time slice while the
// thread it waits for cannot run: on 2 cores with one busy process, a makemoe.json step took
// 2865 ms instead of 108 ms. A bound of 10,000 costs nothing on a free machine (108.4 ms) and
// gives 506 ms there (1000: 217 ms busy, 146 ms free). libgomp reads GOMP_SPINCOUNT only when
// it starts, so moe sets it and starts itself again, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT
// is already set (set one of them to keep your own, e.g. under valgrind).
static void bound_openmp_spinning(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  setenv("GOMP_SPINCOUNT", "10000", 1);
  execv("/proc/self/exe", argv);  // returns only on failure (no /proc): keep the default then
}

int main(int argc, char** argv) {
  bound_openmp_spinning(argv);
  try {
    moe::dist::init(&argc, &argv);  // MPI, when started by mpirun
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe: error: %s\n", e.what());
    return 1;
  }
  const int rc = run(argc, argv);
  // An error on one process (its message is printed) must not leave the others waiting.
  if ((rc == 1 || rc == 2) && moe::dist::size() > 1) moe::dist::abort_all(rc);
  moe::dist::finalize();
  return rc;
}
