// Bad input and interruptions, through the moe binary: every verb exits non-zero with one
// clear message, and training never loses a finished checkpoint (signals, kill -9 during
// saves, failed writes, divergence).
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_util.hpp"
#include "io_test_util.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/model/model.hpp"
#include "moe/train/checkpoint.hpp"

using namespace moe;
using namespace moe_test;

namespace {

const std::string kData = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/small.txt";

std::string tiny_config_json(const std::string& data, const std::string& extra_training = "") {
  return R"({"data": {"path": ")" + data + R"("},
    "model": {"block_size": 8, "n_embed": 16, "n_head": 2, "n_layer": 1},
    "router": {"num_experts": 4, "top_k": 2},
    "training": {"batch_size": 4, "max_steps": 12)" +
         extra_training + R"(},
    "logging": {"log_interval": 4, "eval_interval": 6, "eval_iters": 2, "checkpoint_interval": 6}})";
}

// "" when the checkpoint loads completely (header, config, every tensor and moment), else the error.
std::string load_error(const std::string& path) {
  try {
    CheckpointHeader h = read_checkpoint_header(path);
    Model m(h.config, int64_t(h.vocab.size()));
    load_checkpoint_tensors(path, m, nullptr);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// A copy of a checkpoint with its metadata changed by `edit` (the tensor bytes and checksum kept).
void rewrite_metadata(const std::string& from, const std::string& to,
                      const std::function<void(std::map<std::string, std::string>&)>& edit) {
  SafeTensorsFile f = load_safetensors(from);
  std::vector<TensorEntry> entries;
  for (const std::string& name : f.names()) {
    const SafeTensorsFile::Info& info = f.info(name);
    entries.push_back({name, info.dtype, info.shape, f.bytes(name), info.end - info.begin});
  }
  std::map<std::string, std::string> meta = f.metadata();
  edit(meta);
  save_safetensors(to, entries, meta);
}

// One clear message: a non-zero exit, one "moe: error:" line naming the problem (a list of
// differences may follow it), no crash.
void check_clean_error(const std::string& args, const std::vector<std::string>& must_contain) {
  const Run r = run_moe(args);
  INFO("moe " << args << "\n" << r.out);
  CHECK(r.code != 0);
  CHECK(r.code < 128);  // not killed by a signal (abort, segfault)
  CHECK(r.out.rfind("moe: error: ", 0) == 0);
  CHECK(r.out.find("moe: error", 12) == std::string::npos);  // one error, not a cascade
  CHECK(r.out.find("terminate") == std::string::npos);
  CHECK(r.out.find("Run with --help") == std::string::npos);
  for (const std::string& s : must_contain) CHECK_THAT(r.out, Catch::Contains(s));
}

}  // namespace

TEST_CASE("bad configs and data files: one clear error from train and bench", "[cli][errors]") {
  TempDir d("cli_cfg");
  write_file(d / "empty.json", "");
  write_file(d / "syntax.json", "{\n  \"model\": {\"n_embed\": 16,}\n}");
  write_file(d / "unknown.json", R"({"model": {"n_embd": 16}})");
  write_file(d / "type.json", R"({"training": {"max_steps": "many"}})");
  write_file(d / "range.json", R"({"router": {"num_experts": 4, "top_k": 5}})");
  write_file(d / "empty.txt", "");
  write_file(d / "short.txt", "abc");
  write_file(d / "latin1.txt", "To be, or not to be: that is the question. Caf\xe9 and more words here.");
  write_file(d / "no_data.json", tiny_config_json(d / "none.txt"));
  write_file(d / "empty_data.json", tiny_config_json(d / "empty.txt"));
  write_file(d / "short_data.json", tiny_config_json(d / "short.txt"));
  write_file(d / "latin1_data.json", tiny_config_json(d / "latin1.txt"));

  struct Case {
    std::string file;
    std::vector<std::string> expect;
  };
  const std::vector<Case> config_cases = {
      {"missing.json", {"missing.json", "cannot open"}},
      {"", {"is a directory"}},
      {"empty.json", {"empty.json", "empty"}},
      {"syntax.json", {"syntax.json", "line 2, column"}},
      {"unknown.json", {"unknown key 'model.n_embd'", "did you mean 'model.n_embed'"}},
      {"type.json", {"training.max_steps", "must be an integer"}},
      {"range.json", {"router.top_k"}},
  };
  for (const Case& c : config_cases)
    for (const char* verb : {"train", "bench"}) {
      const std::string path = c.file.empty() ? d.path.string() : d / c.file;
      check_clean_error(std::string(verb) + " --config " + path, c.expect);
    }
  const std::vector<Case> data_cases = {
      {"no_data.json", {"none.txt", "cannot be opened"}},
      {"empty_data.json", {"empty.txt", "empty"}},
      {"short_data.json", {"short.txt", "block_size + 1"}},
      {"latin1_data.json", {"latin1.txt", "invalid UTF-8 at byte offset 46"}},
  };
  for (const Case& c : data_cases)
    check_clean_error("train --config " + (d / c.file) + " --out " + (d / "run"), c.expect);
}

TEST_CASE("bad checkpoints, prompts and flags: one clear error from generate and eval", "[cli][errors]") {
  TempDir d("cli_ckpt");
  write_file(d / "c.json", tiny_config_json(kData));
  REQUIRE(run_moe("train --config " + (d / "c.json") + " --out " + (d / "run")).code == 0);
  const std::string good = d / "run/last.safetensors";
  const std::string bytes = read_file(good);

  write_file(d / "truncated.safetensors", bytes.substr(0, bytes.size() / 2));
  write_file(d / "garbage.safetensors", "this is not a checkpoint at all, just some text");
  write_file(d / "empty.safetensors", "");
  std::string flipped = bytes;
  flipped[flipped.size() - 40] ^= 0x5a;
  write_file(d / "flipped.safetensors", flipped);
  rewrite_metadata(good, d / "version.safetensors", [](auto& m) { m["format"] = "moe-checkpoint-v0"; });
  rewrite_metadata(good, d / "noformat.safetensors", [](auto& m) { m.erase("format"); });
  rewrite_metadata(good, d / "shape.safetensors", [](auto& m) {
    nlohmann::json c = nlohmann::json::parse(m["config"]);
    c["model"]["n_embed"] = 32;
    m["config"] = c.dump();
  });

  struct Case {
    std::string args;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"--checkpoint " + (d / "missing.safetensors"), {"missing.safetensors", "cannot open"}},
      {"--checkpoint " + (d / "truncated.safetensors"), {"truncated.safetensors", "truncated"}},
      {"--checkpoint " + (d / "garbage.safetensors"), {"garbage.safetensors", "not a safetensors file"}},
      {"--checkpoint " + (d / "empty.safetensors"), {"empty.safetensors", "too short"}},
      {"--checkpoint " + (d / "flipped.safetensors"), {"flipped.safetensors", "checksum mismatch"}},
      {"--checkpoint " + (d / "version.safetensors"), {"format 'moe-checkpoint-v0'", "moe-checkpoint-v1"}},
      {"--checkpoint " + (d / "noformat.safetensors"), {"no 'format'", "not a moe checkpoint"}},
      {"--checkpoint " + (d / "shape.safetensors"), {"shape.safetensors", "shape"}},
  };
  for (const Case& c : cases)
    for (const char* verb : {"generate", "eval"})
      check_clean_error(std::string(verb) + " " + c.args, c.expect);

  const std::vector<Case> flag_cases = {
      {"generate --checkpoint " + good + " --prompt 'Zebra\xc3\xa9'", {"prompt", "U+00E9"}},
      {"generate --checkpoint " + good + " --prompt-file " + (d / "none.txt"), {"none.txt", "No such file"}},
      {"generate --checkpoint " + good + " --max-new-tokens -5", {"--max-new-tokens must be >= 0, got -5"}},
      {"generate --checkpoint " + good + " --temperature -0.5", {"--temperature must be >= 0", "got -0.5"}},
      {"generate --checkpoint " + good + " --top-k -2", {"--top-k must be >= 0"}},
      {"generate --checkpoint " + good + " --top-p 0", {"--top-p must be in (0, 1], got 0"}},
      {"generate --checkpoint " + good + " --top-p 1.5", {"--top-p must be in (0, 1], got 1.5"}},
      {"generate --checkpoint " + good + " --context-keep 100", {"--context-keep must be at most", "8"}},
      {"eval --checkpoint " + good + " --batch-size 0", {"--batch-size must be >= 1, got 0"}},
      {"eval --checkpoint " + good + " --data " + (d / "none.txt"), {"none.txt", "cannot be opened"}},
      {"bench --config " + (d / "c.json") + " --steps 0", {"--steps must be >= 1, got 0"}},
      {"bench --config " + (d / "c.json") + " --steps many", {"--steps", "many", "moe bench --help"}},
      {"generate --checkpoint " + good + " --top-p", {"--top-p", "moe generate --help"}},
      {"eval --checkpoint " + good + " --split test", {"--split", "test", "moe eval --help"}},
      {"train --config " + (d / "c.json") + " --learning-rate 3", {"--learning-rate", "moe train --help"}},
      {"eval", {"--checkpoint is required", "moe eval --help"}},
      {"", {"A subcommand is required", "moe --help"}},
  };
  for (const Case& c : flag_cases)
    check_clean_error(c.args, c.expect);
}

TEST_CASE("a run directory is never silently mixed: --resume checks the config, a fresh run needs --overwrite",
          "[cli][errors][reliability]") {
  TempDir d("cli_rundir");
  write_file(d / "a.json", tiny_config_json(kData));
  write_file(d / "b.json", tiny_config_json(kData, R"(, "seed": 99, "batch_size": 2)"));
  REQUIRE(run_moe("train --config " + (d / "a.json") + " --out " + (d / "run")).code == 0);
  const std::string before = read_file(d / "run/last.safetensors");

  check_clean_error("train --config " + (d / "b.json") + " --out " + (d / "run") + " --resume " +
                        (d / "run/last.safetensors"),
                    {"different config", "training.seed: checkpoint 1337, config 99"});
  check_clean_error("train --config " + (d / "a.json") + " --out " + (d / "run"),
                    {"already holds checkpoints", "--resume", "--overwrite"});
  CHECK(read_file(d / "run/last.safetensors") == before);  // refused runs touched nothing

  Run r = run_moe("train --config " + (d / "b.json") + " --out " + (d / "run") + " --overwrite");
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK(read_checkpoint_header(d / "run/last.safetensors").config.training.seed == 99);
}

TEST_CASE("SIGINT saves a checkpoint and exits 130, and the run resumes from it", "[cli][reliability]") {
  TempDir d("cli_sigint");
  write_file(d / "c.json", tiny_config_json(kData, R"(, "max_steps": 1000000)"));
  // The shell starts training, interrupts it after a second and reports its exit code.
  Run r = run_moe("train --config " + (d / "c.json") + " --out " + (d / "run") +
                      " > /dev/null 2>&1 & pid=$!; sleep 1; kill -INT $pid; wait $pid; echo exit=$?",
                  "");
  INFO(r.out);
  CHECK_THAT(r.out, Catch::Contains("exit=130"));
  REQUIRE(load_error(d / "run/last.safetensors") == "");
  const int64_t step = read_checkpoint_header(d / "run/last.safetensors").state.step;
  CHECK(step > 0);
  CHECK(step < 1000000);
  write_file(d / "more.json", tiny_config_json(kData, R"(, "max_steps": )" + std::to_string(step + 3)));
  Run more = run_moe("train --config " + (d / "more.json") + " --out " + (d / "run") + " --resume " +
                     (d / "run/last.safetensors"));
  INFO(more.out);
  REQUIRE(more.code == 0);
  CHECK_THAT(more.out, Catch::Contains("resumed from") && Catch::Contains("at step " + std::to_string(step)));
  CHECK(read_checkpoint_header(d / "run/last.safetensors").state.step == step + 3);
}

TEST_CASE("kill -9 at any moment leaves every checkpoint loadable", "[cli][reliability]") {
  TempDir d("cli_kill");
  // A checkpoint every step. MOE_TEST_KILL_AFTER_WRITES=N makes the process SIGKILL itself
  // after its N-th tensor write: inside a save, at a different point each time. A checkpoint
  // here is 3 x 60 tensors (weights, two moments); a fresh run saves best.safetensors after the
  // step-0 evaluation, then step_1 (which last.safetensors links to) from write 361 on.
  // Two timed kills land wherever they land.
  write_file(d / "c.json", R"({"data": {"path": ")" + kData + R"("},
    "model": {"block_size": 16, "n_embed": 32, "n_head": 4, "n_layer": 2},
    "router": {"num_experts": 4, "top_k": 2},
    "training": {"batch_size": 4, "max_steps": 1000000},
    "logging": {"log_interval": 1000, "eval_interval": 1000, "eval_iters": 1, "checkpoint_interval": 1}})");
  const std::string last = d / "run/last.safetensors";
  std::vector<std::string> kills;
  for (int n : {1, 90, 179, 181, 270, 359, 361, 400, 450, 540, 600, 700, 800, 1000, 1300})
    kills.push_back("MOE_TEST_KILL_AFTER_WRITES=" + std::to_string(n) + " ");
  for (const char* t : {"0.4", "0.7"}) kills.push_back(std::string("timeout -s KILL ") + t + " ");
  int64_t prev_step = 0;
  int resumed = 0;
  for (const std::string& kill : kills) {
    // Every attempt after the first checkpoint resumes from whatever the previous kill left.
    const bool have = fs::exists(last);
    const std::string how = have ? " --resume " + last : " --overwrite";
    Run r = run_shell(kill + MOE_BINARY + " train --config " + (d / "c.json") + " --out " + (d / "run") + how +
                      " >/dev/null 2>&1; echo exit=$?");
    INFO(kill << ": " << r.out);
    CHECK_THAT(r.out, Catch::Contains("exit=137"));
    for (const auto& e : fs::directory_iterator(d.path / "run"))
      if (e.path().extension() == ".safetensors") {
        INFO(e.path().string());
        CHECK(load_error(e.path().string()) == "");
      }
    if (fs::exists(last)) {
      const int64_t step = read_checkpoint_header(last).state.step;
      CHECK(step >= prev_step);  // progress is never lost
      resumed += have;
      prev_step = step;
    }
  }
  CHECK(resumed >= 9);  // the attempts after N = 361
  CHECK(prev_step >= 5);
}

TEST_CASE("a failed checkpoint write is reported and the previous checkpoint stays", "[cli][reliability]") {
  TempDir d("cli_full");
  write_file(d / "c.json", tiny_config_json(kData));
  write_file(d / "c24.json", tiny_config_json(kData, R"(, "max_steps": 24)"));
  REQUIRE(run_moe("train --config " + (d / "c.json") + " --out " + (d / "run")).code == 0);
  const std::string last = d / "run/last.safetensors";
  const std::string before = read_file(last);
  // A file-size limit below the checkpoint's size: writes fail as on a full disk (EFBIG).
  // SIGXFSZ is ignored, so the write returns an error instead of killing the process.
  const size_t limit_blocks = before.size() / 2 / 512;
  Run r = run_moe("train --config " + (d / "c24.json") + " --out " + (d / "run") + " --resume " + last,
                  "trap '' XFSZ; ulimit -f " + std::to_string(limit_blocks) + ";");
  INFO(r.out);
  CHECK(r.code == 1);
  CHECK_THAT(r.out, Catch::Contains("moe: error: ") && Catch::Contains(".safetensors") &&
                        Catch::Contains("File too large"));
  CHECK(read_file(last) == before);
  CHECK(load_error(last) == "");
  for (const auto& e : fs::directory_iterator(d.path / "run")) CHECK(e.path().extension() != ".tmp");
}

TEST_CASE("a diverging run stops naming the step and keeps the last good checkpoint", "[cli][reliability]") {
  TempDir d("cli_nan");
  write_file(d / "c.json", tiny_config_json(kData, R"(, "max_steps": 30}, "optimizer": {"lr": 1e30)"));
  Run r = run_moe("train --config " + (d / "c.json") + " --out " + (d / "run"));
  INFO(r.out);
  CHECK(r.code == 1);
  CHECK_THAT(r.out, Catch::Contains("training diverged") && Catch::Contains("at step 1;"));
  CHECK(load_error(d / "run/best.safetensors") == "");
}
