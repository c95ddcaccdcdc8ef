// moe serve: a local, read-only web dashboard over a directory of runs and sweeps.
//
// The server only reads: run directories (config.json, metrics.jsonl, *.safetensors), sweep
// directories (results.json) and the front end (src/serve/web, with uPlot from npm). Every
// path a request names is relative to the runs directory and must stay inside it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe {

struct ServeOptions {
  std::string runs_dir = "runs";
  std::string host = "127.0.0.1";
  int port = 8080;                // 0: any free port (printed at start)
  std::string web_dir;            // empty: the source tree's src/serve/web
  std::string data;               // text for Inspect (empty: each checkpoint's data.path)
  int64_t max_new_tokens = 2000;  // longest sample a request may ask for
  int max_samplers = 2;           // sampling requests served at once; more get 429
  int max_cached_models = 4;      // checkpoints kept loaded
};

// Runs until the process is stopped; throws when it cannot listen.
void serve(const ServeOptions& opt);

// An error that becomes an HTTP response: status (4xx) and message.
struct HttpError : std::runtime_error {
  int status;
  HttpError(int s, const std::string& msg) : std::runtime_error(msg), status(s) {}
};

// root / rel, after checking that rel is relative, has no "..", and (symlinks resolved) stays
// inside root and exists. Throws HttpError 400 or 404 naming rel.
std::filesystem::path resolve_inside(const std::filesystem::path& root, const std::string& rel);

// The complete lines of `path` from byte `offset` on, parsed as JSON (a line still being
// written, without its newline, is left for later); next_offset is where the next call starts.
// An offset past the end (the file was started again) reads from 0 and sets reset.
struct MetricsChunk {
  std::vector<nlohmann::json> lines;
  uint64_t next_offset = 0;
  bool reset = false;
};
MetricsChunk read_metrics(const std::filesystem::path& path, uint64_t offset);

// One run directory: {"path", "status" (running, finished, stopped), "steps", "max_steps",
// "best_val_loss", "last_val_loss", "config"}. Running: unfinished and metrics.jsonl written in
// the last `running_seconds`.
nlohmann::json run_summary(const std::filesystem::path& root, const std::filesystem::path& dir,
                           double running_seconds = 120);

}  // namespace moe
