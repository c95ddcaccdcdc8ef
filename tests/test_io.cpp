// Config validation, tokenizer, dataset batches and the safetensors reader/writer.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/data/dataset.hpp"
#include "moe/data/tokenizer.hpp"
#include "moe/io/config.hpp"
#include "moe/io/safetensors.hpp"

using namespace moe;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("moe_test_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write_text(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

std::string config_error(const json& j) {
  try {
    config_from_json(j, "test.json");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("Config defaults are the makeMoE values and round-trip through JSON", "[io][config]") {
  Config c;
  CHECK(c.training.batch_size == 16);
  CHECK(c.model.block_size == 32);
  CHECK(c.model.n_embed == 128);
  CHECK(c.model.n_layer == 8);
  CHECK(c.router.num_experts == 8);
  CHECK(c.router.top_k == 2);
  CHECK(c.optimizer.lr == 1e-3);
  CHECK(c.optimizer.weight_decay == 0.01);
  CHECK(c.expert_hidden_size() == 512);
  CHECK(c.attention_scale() == Approx(0.25f));  // head_size 16
  c.model.attn_scale = "embed";
  CHECK(c.attention_scale() == Approx(1 / std::sqrt(128.0)));
  c.model.n_layer = 3;
  c.logging.out_dir = "x";
  CHECK(config_to_json(config_from_json(config_to_json(c), "rt")) == config_to_json(c));
  CHECK(config_to_json(config_from_json(json::object(), "empty")) == config_to_json(Config{}));
}

TEST_CASE("Config errors name the field, the value and what is allowed", "[io][config]") {
  CHECK_THAT(config_error({{"model", {{"n_embd", 64}}}}),
             Catch::Contains("unknown key 'model.n_embd'") && Catch::Contains("did you mean 'model.n_embed'"));
  CHECK_THAT(config_error({{"modle", json::object()}}), Catch::Contains("unknown section 'modle'") && Catch::Contains("'model'"));
  CHECK_THAT(config_error({{"model", {{"n_embed", "big"}}}}), Catch::Contains("model.n_embed = \"big\": must be an integer"));
  CHECK_THAT(config_error({{"model", {{"n_embed", 100}, {"n_head", 8}}}}),
             Catch::Contains("model.n_embed = 100 must be divisible by model.n_head = 8"));
  CHECK_THAT(config_error({{"router", {{"top_k", 9}}}}), Catch::Contains("router.top_k = 9 must be at most router.num_experts = 8"));
  CHECK_THAT(config_error({{"model", {{"block_size", 0}}}}), Catch::Contains("model.block_size = 0: must be a positive integer"));
  CHECK_THAT(config_error({{"model", {{"dropout", 1.5}}}}), Catch::Contains("model.dropout = 1.5: must be in [0, 1)"));
  CHECK_THAT(config_error({{"optimizer", {{"schedule", "linear"}}}}),
             Catch::Contains("optimizer.schedule = \"linear\"") && Catch::Contains("\"cosine\""));
  CHECK_THAT(config_error({{"optimizer", {{"lr", -1}}}}), Catch::Contains("optimizer.lr = -1"));
  CHECK_THAT(config_error({{"router", {{"noisy", 1}}}}), Catch::Contains("router.noisy = 1: must be a boolean"));

  fs::path d = temp_dir("config");
  write_text(d / "bad.json", "{\n  \"model\": {\n    \"n_embed\": 64,,\n  }\n}\n");
  CHECK_THROWS_WITH(load_config((d / "bad.json").string()), Catch::Contains("invalid JSON at line 3"));
  write_text(d / "empty.json", "  \n");
  CHECK_THROWS_WITH(load_config((d / "empty.json").string()), Catch::Contains("empty"));
  CHECK_THROWS_WITH(load_config((d / "missing.json").string()), Catch::Contains("cannot open"));
  write_text(d / "good.json", R"({"model": {"n_layer": 2}})");
  CHECK(load_config((d / "good.json").string()).model.n_layer == 2);
  fs::remove_all(d);
}

TEST_CASE("Tokenizer round-trips UTF-8 text and names missing characters", "[io][tokenizer]") {
  const std::string text = "héllo wörld — ✓ 日本 🙂\n";
  Tokenizer t = Tokenizer::from_text(text);
  CHECK(std::is_sorted(t.vocab().begin(), t.vocab().end()));
  CHECK(t.decode(t.encode(text)) == text);
  CHECK(t.encode("h")[0] == int32_t(std::find(t.vocab().begin(), t.vocab().end(), uint32_t('h')) - t.vocab().begin()));
  CHECK_THROWS_WITH(t.encode("hé!Z"), Catch::Contains("'!' (U+0021)") && Catch::Contains("'Z' (U+005A)"));
  CHECK(Tokenizer::from_vocab(t.vocab()).encode(text) == t.encode(text));
  CHECK_THROWS_WITH(utf8_decode(std::string("ab\xC3", 3)), Catch::Contains("byte offset 2") && Catch::Contains("truncated"));
  CHECK_THROWS_WITH(utf8_decode("a\xC0\xAF"), Catch::Contains("byte offset 1"));   // overlong '/'
  CHECK_THROWS_WITH(utf8_decode("\xED\xA0\x80"), Catch::Contains("surrogate"));
  CHECK_THROWS_WITH(utf8_decode("x\xFF"), Catch::Contains("byte offset 1"));
}

TEST_CASE("Dataset splits 90/10 and batches are shifted windows, reproducible by seed", "[io][data]") {
  fs::path d = temp_dir("data");
  std::string text;
  for (int i = 0; i < 200; ++i) text += char('a' + i % 26);
  write_text(d / "t.txt", text);
  Dataset ds = Dataset::load((d / "t.txt").string(), 0.9, 8);
  CHECK(ds.train().size() == 180);
  CHECK(ds.val().size() == 20);
  BatchSampler s1(ds.train(), 4, 8, Rng(5, 2)), s2(ds.train(), 4, 8, Rng(5, 2));
  std::vector<int32_t> x(32), y(32), x2(32), y2(32);
  s1.next(x.data(), y.data());
  for (int b = 0; b < 4; ++b)
    for (int t = 0; t < 7; ++t) CHECK(y[size_t(b * 8 + t)] == x[size_t(b * 8 + t + 1)]);
  s2.next(x2.data(), y2.data());
  CHECK(x == x2);
  RngState saved = s1.state();
  s1.next(x.data(), y.data());
  s2.set_state(saved);
  s2.next(x2.data(), y2.data());
  CHECK(x == x2);
  write_text(d / "short.txt", "abcdefghij");
  CHECK_THROWS_WITH(Dataset::load((d / "short.txt").string(), 0.9, 8), Catch::Contains("fewer than block_size + 1"));
  write_text(d / "empty.txt", "");
  CHECK_THROWS_WITH(Dataset::load((d / "empty.txt").string(), 0.9, 8), Catch::Contains("is empty"));
  CHECK_THROWS_WITH(Dataset::load((d / "nope.txt").string(), 0.9, 8), Catch::Contains("cannot be opened"));
  fs::remove_all(d);
}

TEST_CASE("safetensors: round trip, exact layout, corruption and atomic writes", "[io][safetensors]") {
  fs::path d = temp_dir("st");
  const std::string path = (d / "a.safetensors").string();
  const float w[6] = {1, 2, 3, 4, 5, 6};
  const int32_t ids[3] = {7, -1, 9};
  save_safetensors(path, {{"w", DType::F32, {2, 3}, w, sizeof w}, {"ids", DType::I32, {3}, ids, sizeof ids}}, {{"k", "v"}});
  SafeTensorsFile f = load_safetensors(path);
  CHECK(f.metadata().at("k") == "v");
  float w2[6];
  f.copy_f32("w", {2, 3}, w2);
  CHECK(std::equal(w, w + 6, w2));
  int32_t ids2[3];
  f.copy_i32("ids", ids2, 3);
  CHECK(ids2[1] == -1);
  CHECK_THROWS_WITH(f.copy_f32("w", {3, 2}, w2), Catch::Contains("shape [2, 3]") && Catch::Contains("expects [3, 2]"));
  CHECK_THROWS_WITH(f.copy_f32("nope", {1}, w2), Catch::Contains("no tensor 'nope'"));

  // Layout: u64 little-endian header length (a multiple of 8), JSON, then the data.
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[size_t(i)])) << (8 * i);
  CHECK(n % 8 == 0);
  CHECK(bytes.size() == 8 + n + sizeof w + sizeof ids);
  auto header = json::parse(bytes.substr(8, n));
  CHECK(header["w"]["data_offsets"] == json({0, 24}));
  CHECK(header["ids"]["dtype"] == "I32");

  auto corrupt = [&](const std::string& name, const std::string& content) {
    write_text(d / name, content);
    return (d / name).string();
  };
  CHECK_THROWS_WITH(load_safetensors(corrupt("trunc", bytes.substr(0, bytes.size() - 5))), Catch::Contains("outside the file"));
  std::string flipped = bytes;
  flipped[flipped.size() - 2] ^= 0x40;
  CHECK_THROWS_WITH(load_safetensors(corrupt("flip", flipped)), Catch::Contains("checksum mismatch"));
  CHECK_THROWS_WITH(load_safetensors(corrupt("short", "abc")), Catch::Contains("too short"));
  std::string badjson = bytes;
  badjson[8] = '[';
  badjson[9] = '[';
  CHECK_THROWS_WITH(load_safetensors(corrupt("badjson", badjson)), Catch::Contains("header"));
  CHECK_THROWS_WITH(load_safetensors(corrupt("huge", std::string("\xff\xff\xff\xff\0\0\0\0xx", 10))), Catch::Contains("exceeds the file"));

  // A failed write leaves the previous file in place.
  const std::string missing_dir = (d / "no" / "such" / "dir" / "x.safetensors").string();
  CHECK_THROWS_WITH(save_safetensors(missing_dir, {{"w", DType::F32, {6}, w, sizeof w}}, {}), Catch::Contains("writing failed") || Catch::Contains("cannot write"));
  fs::create_directories(d / "ro");
  const std::string ro_path = (d / "ro" / "x.safetensors").string();
  save_safetensors(ro_path, {{"w", DType::F32, {6}, w, sizeof w}}, {});
  fs::permissions(d / "ro", fs::perms::owner_read | fs::perms::owner_exec);
  const float other[6] = {0};
  if (::access((d / "ro").c_str(), W_OK) != 0)  // root may write anyway; only then is there nothing to test
    CHECK_THROWS(save_safetensors(ro_path, {{"w", DType::F32, {6}, other, sizeof other}}, {}));
  fs::permissions(d / "ro", fs::perms::owner_all);
  load_safetensors(ro_path).copy_f32("w", {6}, w2);
  CHECK(w2[5] == 6.f);
  CHECK_FALSE(fs::exists(ro_path + ".tmp"));
  fs::remove_all(d);
}
