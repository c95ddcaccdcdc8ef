#include "moe/serve/server.hpp"

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>

#include "moe/data/dataset.hpp"
#include "moe/generate/generator.hpp"
#include "moe/inspect/inspect.hpp"
#include "moe/train/checkpoint.hpp"

#ifndef MOE_WEB_DIR
#define MOE_WEB_DIR "src/serve/web"
#endif

namespace fs = std::filesystem;

namespace moe {

fs::path resolve_inside(const fs::path& root, const std::string& rel) {
  if (rel.empty()) throw HttpError(400, "missing path");
  const fs::path p(rel);
  if (p.is_absolute() || rel.front() == '/' || rel.front() == '\\')
    throw HttpError(400, "path '" + rel + "' must be relative to the runs directory");
  for (const auto& part : p)
    if (part == "..") throw HttpError(400, "path '" + rel + "' must not contain '..'");
  std::error_code ec;
  const fs::path base = fs::canonical(root, ec);
  if (ec) throw HttpError(404, "runs directory " + root.string() + " is missing");
  const fs::path full = fs::canonical(base / p, ec);
  if (ec) throw HttpError(404, "no such file or directory: " + rel);
  // Symlinks resolved: the target must still be under the runs directory.
  const auto [b, f] = std::mismatch(base.begin(), base.end(), full.begin(), full.end());
  if (b != base.end()) throw HttpError(403, "path '" + rel + "' leads outside the runs directory");
  return full;
}

MetricsChunk read_metrics(const fs::path& path, uint64_t offset) {
  MetricsChunk out;
  std::ifstream f(path, std::ios::binary);
  if (!f) return out;  // not written yet
  f.seekg(0, std::ios::end);
  const auto size = uint64_t(f.tellg());
  if (offset > size) {
    offset = 0;
    out.reset = true;
  }
  f.seekg(std::streamoff(offset));
  std::string text(size_t(size - offset), '\0');
  f.read(text.data(), std::streamsize(text.size()));
  text.resize(size_t(f.gcount()));
  const size_t end = text.rfind('\n');
  if (end == std::string::npos) {
    out.next_offset = offset;  // no complete line yet
    return out;
  }
  size_t start = 0;
  while (start <= end) {
    const size_t nl = text.find('\n', start);
    const std::string_view line(text.data() + start, nl - start);
    if (!line.empty()) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded()) out.lines.push_back(std::move(j));
    }
    start = nl + 1;
  }
  out.next_offset = offset + end + 1;
  return out;
}

namespace {

nlohmann::json read_json_file(const fs::path& path) {
  std::ifstream f(path);
  if (!f) return nullptr;
  auto j = nlohmann::json::parse(f, nullptr, false);
  return j.is_discarded() ? nlohmann::json(nullptr) : j;
}

std::string relative_to(const fs::path& root, const fs::path& p) {
  return fs::relative(p, fs::canonical(root)).generic_string();
}

}  // namespace

nlohmann::json run_summary(const fs::path& root, const fs::path& dir, double running_seconds) {
  const nlohmann::json config = read_json_file(dir / "config.json");
  const MetricsChunk m = read_metrics(dir / "metrics.jsonl", 0);
  int64_t steps = 0;
  double best = NAN, last = NAN;
  for (const auto& line : m.lines) {
    if (line.contains("loss")) steps = std::max<int64_t>(steps, line.value("step", int64_t(0)));
    if (line.contains("val_loss") && line["val_loss"].is_number()) {
      last = line["val_loss"].get<double>();
      if (!(best <= last)) best = last;
    }
  }
  const int64_t max_steps =
      config.is_object() && config.contains("training") ? config["training"].value("max_steps", int64_t(0)) : 0;
  std::string status = "stopped";
  if (max_steps > 0 && steps >= max_steps) {
    status = "finished";
  } else {
    std::error_code ec;
    const auto written = fs::last_write_time(dir / "metrics.jsonl", ec);
    if (!ec && std::chrono::duration<double>(fs::file_time_type::clock::now() - written).count() < running_seconds)
      status = "running";
  }
  nlohmann::json j{{"path", relative_to(root, dir)}, {"status", status}, {"steps", steps}, {"max_steps", max_steps},
                   {"config", config}};
  j["best_val_loss"] = std::isnan(best) ? nlohmann::json(nullptr) : nlohmann::json(best);
  j["last_val_loss"] = std::isnan(last) ? nlohmann::json(nullptr) : nlohmann::json(last);
  return j;
}

namespace {

// Loaded checkpoints, newest use last; each with a lock (a model decodes one sample at a time)
// and its inspect report once computed.
class ModelCache {
 public:
  struct Entry {
    InferenceModel loaded;
    std::mutex mu;
    nlohmann::json inspect;
  };
  explicit ModelCache(size_t capacity) : capacity_(capacity) {}
  std::shared_ptr<Entry> get(const fs::path& path) {
    std::error_code ec;
    const std::string key = path.string() + "@" + std::to_string(fs::last_write_time(path, ec).time_since_epoch().count());
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->first == key) {
          entries_.splice(entries_.end(), entries_, it);
          return it->second;
        }
    }
    auto e = std::make_shared<Entry>();
    try {
      e->loaded = load_for_inference(path.string());
    } catch (const std::exception& ex) {
      throw HttpError(422, std::string("cannot load checkpoint: ") + ex.what());
    }
    std::lock_guard<std::mutex> lock(mu_);
    entries_.emplace_back(key, e);
    while (entries_.size() > capacity_) entries_.pop_front();
    return e;
  }

 private:
  size_t capacity_;
  std::mutex mu_;
  std::list<std::pair<std::string, std::shared_ptr<Entry>>> entries_;
};

struct Server {
  ServeOptions opt;
  fs::path root, web;
  ModelCache models;
  std::atomic<int> samplers{0};

  explicit Server(const ServeOptions& o)
      : opt(o), root(o.runs_dir), web(o.web_dir.empty() ? MOE_WEB_DIR : o.web_dir), models(size_t(o.max_cached_models)) {}

  static std::string param(const httplib::Request& req, const char* name) {
    if (!req.has_param(name)) throw HttpError(400, std::string("missing query parameter '") + name + "'");
    return req.get_param_value(name);
  }

  fs::path checkpoint(const std::string& rel) {
    const fs::path p = resolve_inside(root, rel);
    if (p.extension() != ".safetensors" || !fs::is_regular_file(p))
      throw HttpError(404, "'" + rel + "' is not a checkpoint (.safetensors file)");
    return p;
  }

  // Every run (a directory with metrics.jsonl or config.json), sweep (results.json) and
  // checkpoint under the runs directory; symlinks are not followed.
  nlohmann::json list() {
    nlohmann::json runs = nlohmann::json::array(), sweeps = nlohmann::json::array(), ckpts = nlohmann::json::array();
    std::error_code ec;
    if (!fs::is_directory(root, ec)) throw HttpError(404, "runs directory " + root.string() + " is missing");
    std::vector<fs::path> dirs{fs::canonical(root)}, files;
    for (fs::recursive_directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
      if (it.depth() > 4) it.disable_recursion_pending();
      if (it->is_symlink(ec)) continue;
      if (it->is_directory(ec)) dirs.push_back(fs::canonical(it->path()));
      else if (it->path().extension() == ".safetensors") files.push_back(fs::canonical(it->path()));
    }
    std::sort(dirs.begin(), dirs.end());
    std::sort(files.begin(), files.end());
    for (const auto& d : dirs) {
      if (fs::exists(d / "metrics.jsonl") || fs::exists(d / "config.json")) runs.push_back(run_summary(root, d));
      if (fs::exists(d / "results.json")) {
        const nlohmann::json r = read_json_file(d / "results.json");
        if (!r.is_object() || !r.contains("trials")) continue;
        nlohmann::json best = nullptr;
        for (const auto& t : r["trials"])
          if (t.value("best_val_loss", nlohmann::json()).is_number() &&
              (best.is_null() || t["best_val_loss"].get<double>() < best.get<double>()))
            best = t["best_val_loss"];
        sweeps.push_back({{"path", relative_to(root, d)},
                          {"trials", r["trials"].size()},
                          {"method", r.value("spec", nlohmann::json::object()).value("method", "")},
                          {"params", r.value("spec", nlohmann::json::object()).value("params", nlohmann::json::object())},
                          {"best_val_loss", best}});
      }
    }
    for (const auto& f : files) ckpts.push_back(relative_to(root, f));
    return {{"root", root.string()}, {"runs", runs}, {"sweeps", sweeps}, {"checkpoints", ckpts}};
  }

  nlohmann::json run(const httplib::Request& req) {
    const fs::path dir = resolve_inside(root, param(req, "path"));
    if (!fs::exists(dir / "metrics.jsonl") && !fs::exists(dir / "config.json"))
      throw HttpError(404, "'" + param(req, "path") + "' is not a run directory (no metrics.jsonl or config.json)");
    uint64_t offset = 0;
    if (req.has_param("offset")) {
      try {
        offset = std::stoull(req.get_param_value("offset"));
      } catch (const std::exception&) {
        throw HttpError(400, "offset must be a byte offset, got '" + req.get_param_value("offset") + "'");
      }
    }
    const MetricsChunk m = read_metrics(dir / "metrics.jsonl", offset);
    nlohmann::json j = run_summary(root, dir);
    j["lines"] = m.lines;
    j["offset"] = m.next_offset;
    j["reset"] = m.reset;
    return j;
  }

  nlohmann::json sweep(const httplib::Request& req) {
    const fs::path dir = resolve_inside(root, param(req, "path"));
    nlohmann::json r = read_json_file(dir / "results.json");
    if (!r.is_object()) throw HttpError(404, "'" + param(req, "path") + "' has no readable results.json");
    r["path"] = relative_to(root, dir);
    return r;
  }

  nlohmann::json inspect(const httplib::Request& req) {
    auto e = models.get(checkpoint(param(req, "checkpoint")));
    std::lock_guard<std::mutex> lock(e->mu);
    if (e->inspect.is_null()) {
      const Config& cfg = e->loaded.header.config;
      const std::string data_path = opt.data.empty() ? cfg.data.path : opt.data;
      std::unique_ptr<Dataset> data;
      try {
        data = std::make_unique<Dataset>(
            Dataset::load(data_path, cfg.data.train_fraction, cfg.model.block_size, &e->loaded.tokenizer));
      } catch (const std::exception& ex) {
        throw HttpError(422, std::string("cannot read the checkpoint's text (start moe serve with --data FILE): ") +
                                 ex.what());
      }
      e->inspect = inspect_split(*e->loaded.model, e->loaded.tokenizer, data->val(), InspectOptions{});
      e->inspect["data"] = data_path;
    }
    return e->inspect;
  }

  // POST /api/sample {"checkpoint", "prompt", "temperature", "top_k", "seed", "max_new_tokens"}:
  // the generated text, streamed as it comes.
  void sample(const httplib::Request& req, httplib::Response& res) {
    const auto body = nlohmann::json::parse(req.body, nullptr, false);
    if (body.is_discarded() || !body.is_object()) throw HttpError(400, "the request body must be a JSON object");
    GenerateOptions g;
    int64_t max_new = 0;
    std::string prompt;
    try {
      prompt = body.value("prompt", std::string());
      g.sampling.temperature = body.value("temperature", 1.0f);
      g.sampling.top_k = body.value("top_k", int64_t(0));
      g.seed = body.value("seed", uint64_t(1337));
      max_new = body.value("max_new_tokens", int64_t(200));
    } catch (const std::exception& ex) {
      throw HttpError(400, std::string("bad field type: ") + ex.what());
    }
    if (max_new < 1 || max_new > opt.max_new_tokens)
      throw HttpError(400, "max_new_tokens must be in [1, " + std::to_string(opt.max_new_tokens) + "], got " +
                               std::to_string(max_new));
    if (!(g.sampling.temperature >= 0 && g.sampling.temperature <= 10))
      throw HttpError(400, "temperature must be in [0, 10]");
    if (g.sampling.top_k < 0) throw HttpError(400, "top_k must be >= 0");
    if (prompt.size() > 100000) throw HttpError(400, "the prompt is longer than 100000 bytes");
    if (!body.contains("checkpoint") || !body["checkpoint"].is_string())
      throw HttpError(400, "missing field 'checkpoint' (a .safetensors path under the runs directory)");
    auto e = models.get(checkpoint(body["checkpoint"].get<std::string>()));
    std::vector<int32_t> ids;
    try {
      ids = e->loaded.tokenizer.encode(prompt);
    } catch (const std::exception& ex) {
      throw HttpError(400, std::string("prompt: ") + ex.what());
    }
    if (samplers.fetch_add(1) >= opt.max_samplers) {
      --samplers;
      throw HttpError(429, "already sampling " + std::to_string(opt.max_samplers) + " texts; try again shortly");
    }
    res.set_chunked_content_provider(
        "text/plain; charset=utf-8",
        [this, e, ids, g, max_new](size_t, httplib::DataSink& sink) {
          std::lock_guard<std::mutex> lock(e->mu);
          Generator gen(*e->loaded.model, g);
          bool open = true;
          gen.generate(ids, max_new, [&](int32_t id) {
            if (!open) return;
            const std::string s = e->loaded.tokenizer.decode({id});
            open = sink.write(s.data(), s.size());
          });
          sink.done();
          return true;
        },
        [this](bool) { --samplers; });
  }

  void static_file(httplib::Response& res, const fs::path& file, const char* type) {
    std::ifstream f(file, std::ios::binary);
    if (!f) throw HttpError(404, "missing front-end file " + file.string() + " (run: bash scripts/setup.sh --serve)");
    std::ostringstream ss;
    ss << f.rdbuf();
    res.set_content(ss.str(), type);
  }
};

// Runs a handler; HttpError and any other exception become a JSON {"error": message}.
template <class F>
httplib::Server::Handler guarded(F f) {
  return [f](const httplib::Request& req, httplib::Response& res) {
    try {
      f(req, res);
    } catch (const HttpError& e) {
      res.status = e.status;
      res.set_content(nlohmann::json{{"error", e.what()}}.dump(), "application/json");
    } catch (const std::exception& e) {
      res.status = 500;
      res.set_content(nlohmann::json{{"error", e.what()}}.dump(), "application/json");
    }
  };
}

template <class F>
httplib::Server::Handler json_handler(F f) {
  return guarded([f](const httplib::Request& req, httplib::Response& res) {
    res.set_content(f(req).dump(), "application/json");
  });
}

}  // namespace

void serve(const ServeOptions& opt) {
  Server s(opt);
  httplib::Server http;
  http.Get("/api/runs", json_handler([&](const httplib::Request&) { return s.list(); }));
  http.Get("/api/run", json_handler([&](const httplib::Request& r) { return s.run(r); }));
  http.Get("/api/sweep", json_handler([&](const httplib::Request& r) { return s.sweep(r); }));
  http.Get("/api/inspect", json_handler([&](const httplib::Request& r) { return s.inspect(r); }));
  http.Post("/api/sample", guarded([&](const httplib::Request& r, httplib::Response& res) { s.sample(r, res); }));
  // The front end: a fixed list of files, nothing else from disk.
  const std::map<std::string, std::pair<fs::path, const char*>> files{
      {"/", {s.web / "index.html", "text/html; charset=utf-8"}},
      {"/app.js", {s.web / "app.js", "text/javascript"}},
      {"/style.css", {s.web / "style.css", "text/css"}},
      {"/vendor/uPlot.iife.min.js", {s.web / "node_modules/uplot/dist/uPlot.iife.min.js", "text/javascript"}},
      {"/vendor/uPlot.min.css", {s.web / "node_modules/uplot/dist/uPlot.min.css", "text/css"}}};
  for (const auto& [url, file] : files) {
    const auto f = file;
    http.Get(url, guarded([&s, f](const httplib::Request&, httplib::Response& res) { s.static_file(res, f.first, f.second); }));
  }
  http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (res.body.empty())
      res.set_content(nlohmann::json{{"error", "no such page: " + req.path}}.dump(), "application/json");
  });
  int port = opt.port;
  if (port == 0) {
    port = http.bind_to_any_port(opt.host);
    if (port < 0) throw std::runtime_error("cannot listen on " + opt.host);
  } else if (!http.bind_to_port(opt.host, port)) {
    throw std::runtime_error("cannot listen on " + opt.host + ":" + std::to_string(port) + " (in use? try --port 0)");
  }
  std::printf("moe serve: %s at http://%s:%d/\n", fs::absolute(opt.runs_dir).string().c_str(), opt.host.c_str(), port);
  std::fflush(stdout);
  if (!http.listen_after_bind()) throw std::runtime_error("the server stopped unexpectedly");
}

}  // namespace moe
