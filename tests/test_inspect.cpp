// moe inspect's counts (src/inspect) and the dashboard's file helpers (src/serve).
#include <omp.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "moe/inspect/inspect.hpp"
#include "moe/io/config.hpp"
#include "moe/train/evaluate.hpp"
#ifdef MOE_HAVE_SERVE
#include "moe/serve/server.hpp"
#endif

using namespace moe;

namespace {

Config inspect_config() {
  nlohmann::json j = {{"data", {{"path", std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt"}}},
                      {"model", {{"block_size", 8}, {"n_embed", 16}, {"n_head", 2}, {"n_layer", 3}}},
                      {"router", {{"num_experts", 4}, {"top_k", 2}, {"noisy", true}, {"noise_at_eval", true}}},
                      {"training", {{"batch_size", 4}, {"seed", 7}}}};
  return config_from_json(j, "inspect_config");
}

}  // namespace

TEST_CASE("inspect counts every routed slot of the split, with eval's loss, for any thread count", "[inspect]") {
  // Also with dense blocks first (model.dense_first): the report lists the MoE blocks under
  // their block numbers, eval's router figures are null for the dense ones.
  const int64_t dense_first = GENERATE(0, 1, 3);
  INFO("model.dense_first " << dense_first);
  Config cfg = inspect_config();
  cfg.model.dense_first = dense_first;
  validate(cfg);
  Dataset data = Dataset::load(cfg.data.path, cfg.data.train_fraction, cfg.model.block_size);
  Model model(cfg, data.tokenizer().size());
  Rng init(3, 1);
  model.init(init);
  Graph g;
  const SplitEvaluation ev = evaluate_split(model, data.val(), 4, g);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const nlohmann::json one = inspect_split(model, data.tokenizer(), data.val(), InspectOptions{});
  omp_set_num_threads(threads);
  const nlohmann::json r = inspect_split(model, data.tokenizer(), data.val(), InspectOptions{});
  CHECK(one.dump() == r.dump());
  CHECK(r["loss"].get<double>() == ev.loss);  // the observer changes nothing
  CHECK(r["tokens"].get<int64_t>() == ev.tokens);
  const auto moe_layers = size_t(3 - dense_first);
  REQUIRE(r["layers"].size() == moe_layers);
  REQUIRE(r["transitions"].size() == (moe_layers > 0 ? moe_layers - 1 : 0));
  const nlohmann::json health = ev.routing.health();
  for (int64_t l = 0; l < 3; ++l) CHECK(health[size_t(l)].is_null() == (l < dense_first));
  for (size_t i = 0; i < moe_layers; ++i) CHECK(r["layers"][i]["layer"].get<int64_t>() == dense_first + int64_t(i));
  for (size_t i = 0; i + 1 < moe_layers; ++i) {
    CHECK(r["transitions"][i]["from"].get<int64_t>() == dense_first + int64_t(i));
    CHECK(r["transitions"][i]["to"].get<int64_t>() == dense_first + int64_t(i) + 1);
  }
  for (const auto& layer : r["layers"]) {
    double share = 0;
    for (const auto& e : layer["experts"]) {
      share += e["slot_share"].get<double>();
      const double gate = e["mean_gate"].get<double>();
      CHECK(gate >= 0);
      CHECK(gate <= 1);
      double positions = 0;
      for (const auto& p : e["position_share"]) positions += p.get<double>();
      if (e["slot_share"].get<double>() > 0) CHECK(positions == Approx(1.0));
    }
    CHECK(share == Approx(1.0));
    // The slot counts match eval's router statistics.
    const size_t l = size_t(layer["layer"].get<int64_t>());
    for (size_t e = 0; e < 4; ++e)
      CHECK(layer["experts"][e]["slot_share"].get<double>() ==
            Approx(double(ev.routing.tokens_per_expert[l][e]) / double(ev.tokens * 2)));
  }
  // Top-2 with softmax over the two kept logits: the gates of a token add up to 1, so the
  // slot-weighted mean gates of a layer average to 1/2.
  for (const auto& layer : r["layers"]) {
    double weighted = 0;
    for (const auto& e : layer["experts"]) weighted += e["slot_share"].get<double>() * e["mean_gate"].get<double>();
    CHECK(weighted == Approx(0.5));
  }
  for (const auto& t : r["transitions"]) {
    int64_t total = 0;
    for (const auto& n : t["joint"]) total += n.get<int64_t>();
    CHECK(total == ev.tokens);
    CHECK(t["mutual_information_bits"].get<double>() >= -1e-12);
    CHECK(t["prediction_accuracy"].get<double>() >= t["baseline_accuracy"].get<double>() - 1e-12);
  }
  // Corpus class shares: lowercase, uppercase, space and newline are disjoint parts.
  const auto& cls = r["corpus"]["classes"];
  CHECK(cls[0].get<double>() + cls[1].get<double>() + cls[3].get<double>() + cls[4].get<double>() <= 1.0 + 1e-12);
  CHECK(cls[0].get<double>() > 0.5);
}

#ifdef MOE_HAVE_SERVE
TEST_CASE("serve: paths stay inside the runs directory", "[serve]") {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / "moe_serve_paths";
  fs::remove_all(root);
  fs::create_directories(root / "runs" / "a");
  std::ofstream(root / "outside.txt") << "secret";
  std::ofstream(root / "runs" / "a" / "metrics.jsonl") << "{}\n";
  fs::create_symlink(root / "outside.txt", root / "runs" / "link");
  const fs::path runs = root / "runs";
  CHECK(resolve_inside(runs, "a/metrics.jsonl") == fs::canonical(runs / "a" / "metrics.jsonl"));
  const auto status = [&](const std::string& rel) {
    try {
      resolve_inside(runs, rel);
      return 0;
    } catch (const HttpError& e) {
      return e.status;
    }
  };
  CHECK(status("../outside.txt") == 400);
  CHECK(status("a/../../outside.txt") == 400);
  CHECK(status((root / "outside.txt").string()) == 400);
  CHECK(status("link") == 403);
  CHECK(status("nope") == 404);
  CHECK(status("") == 400);
  fs::remove_all(root);
}

TEST_CASE("serve: metrics are read by complete lines only", "[serve]") {
  namespace fs = std::filesystem;
  const fs::path file = fs::temp_directory_path() / "moe_serve_metrics.jsonl";
  std::ofstream(file) << "{\"step\": 1}\n{\"step\": 2}\n{\"st";
  MetricsChunk a = read_metrics(file, 0);
  REQUIRE(a.lines.size() == 2);
  CHECK(a.lines[1]["step"] == 2);
  std::ofstream(file, std::ios::app) << "ep\": 3}\n";
  MetricsChunk b = read_metrics(file, a.next_offset);
  REQUIRE(b.lines.size() == 1);
  CHECK(b.lines[0]["step"] == 3);
  CHECK(read_metrics(file, b.next_offset).lines.empty());
  MetricsChunk c = read_metrics(file, b.next_offset + 100);  // the file was started again
  CHECK(c.reset);
  CHECK(c.lines.size() == 3);
  fs::remove(file);
}
#endif
