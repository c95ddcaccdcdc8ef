// Dataset split, makeMoE-style random batches with exact resume, and evaluation windows.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>

#include "io_test_util.hpp"
#include "moe/data/dataset.hpp"

using namespace moe;
using Catch::Contains;
using moe_test::error_of;
using moe_test::TempDir;
using moe_test::write_file;

namespace {

std::string alphabet_text(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += char('a' + i % 26);
  return s;
}

std::string load_error(const std::string& path, int64_t T) {
  return error_of([&] { Dataset::load(path, 0.9, T); });
}

}  // namespace

TEST_CASE("Dataset: vocabulary from the text, first 90% of ids train, rest validation", "[io][data]") {
  TempDir d("data_split");
  const std::string text = "héllo wörld — ✓ 日本\n" + alphabet_text(183);  // 19 + 183 = 202 code points
  write_file(d / "t.txt", text);
  const Dataset ds = Dataset::load(d / "t.txt", 0.9, 8);
  CHECK(ds.train().size() == 181);  // int(0.9 * 202) = 181, like makeMoE's n = int(0.9 * len(data))
  CHECK(ds.val().size() == 21);
  CHECK(ds.tokenizer().vocab() == Tokenizer::from_text(text).vocab());
  std::vector<int32_t> all = ds.train().to_vector();
  const std::vector<int32_t> val = ds.val().to_vector();
  all.insert(all.end(), val.begin(), val.end());
  CHECK(ds.tokenizer().decode(all) == text);

  // Encoding with a given vocabulary (a checkpoint's): characters outside it are an error.
  const Tokenizer ascii = Tokenizer::from_text(alphabet_text(26));
  write_file(d / "abc.txt", alphabet_text(100));
  CHECK(Dataset::load(d / "abc.txt", 0.5, 8, &ascii).train().size() == 50);
  CHECK_THROWS_WITH(Dataset::load(d / "t.txt", 0.9, 8, &ascii), Contains(d / "t.txt") && Contains("'é' (U+00E9)"));
}

TEST_CASE("Dataset: ids of a vocabulary over 256 characters, and of one of 256, come back whole", "[io][data]") {
  TempDir d("data_wide");
  for (const int chars : {256, 300}) {
    INFO(chars << " characters");
    std::string text;
    for (int i = 0; i < 2 * chars; ++i) {  // U+0100 .. : two bytes each in UTF-8
      const unsigned cp = 0x100u + unsigned(i % chars);
      text += char(0xC0 | (cp >> 6));
      text += char(0x80 | (cp & 0x3F));
    }
    write_file(d / "wide.txt", text);
    const Dataset ds = Dataset::load(d / "wide.txt", 0.5, 8);
    REQUIRE(ds.tokenizer().size() == chars);
    std::vector<int32_t> all = ds.train().to_vector();
    const std::vector<int32_t> val = ds.val().to_vector();
    all.insert(all.end(), val.begin(), val.end());
    CHECK(ds.tokenizer().decode(all) == text);
    CHECK(*std::max_element(all.begin(), all.end()) == chars - 1);
    int32_t x[8], y[8];
    WindowBatcher(ds.val(), 1, 8).batch(0, x, y);
    CHECK(std::equal(x, x + 8, val.begin()));
    CHECK(std::equal(y, y + 8, val.begin() + 1));
  }
}

TEST_CASE("Dataset: the reference corpus gives makeMoE's vocabulary and split", "[io][data]") {
  std::string path;
  for (const char* p : {MOE_SOURCE_DIR "/data/tinyshakespeare.txt", MOE_SOURCE_DIR "/../shared/data/tinyshakespeare.txt"})
    if (std::filesystem::exists(p)) path = p;
  if (path.empty()) {
    WARN("tinyshakespeare.txt not found (data/get_data.sh); skipped");
    return;
  }
  const Dataset ds = Dataset::load(path, 0.9, 32);
  CHECK(ds.tokenizer().size() == 65);
  CHECK(ds.train().size() == 1003854);  // int(0.9 * 1115394)
  CHECK(ds.val().size() == 111540);
}

TEST_CASE("Dataset: missing, empty, too short and invalid files give clear errors", "[io][data]") {
  TempDir d("data_err");
  CHECK_THAT(load_error(d / "nope.txt", 8), Contains(d / "nope.txt") && Contains("cannot be opened"));
  CHECK_THAT(load_error(d.path.string(), 8), Contains("is a directory"));
  write_file(d / "empty.txt", "");
  CHECK_THAT(load_error(d / "empty.txt", 8), Contains(d / "empty.txt") && Contains("is empty"));
  write_file(d / "short.txt", "abcdefghij");
  CHECK_THAT(load_error(d / "short.txt", 8),  // train 9 ids is just enough, validation 1 is not
             Contains(d / "short.txt") && Contains("the validation split has 1 characters, fewer than block_size + 1 = 9"));
  CHECK_THAT(load_error(d / "short.txt", 20), Contains("the train split has 9 characters, fewer than block_size + 1 = 21"));
  write_file(d / "val_short.txt", alphabet_text(50));  // train 45 is enough, validation 5 is not
  CHECK_THAT(load_error(d / "val_short.txt", 8),
             Contains("the validation split has 5 characters, fewer than block_size + 1 = 9") && Contains("model.block_size"));
  write_file(d / "bad.txt", alphabet_text(40) + "\xFF" + alphabet_text(40));
  CHECK_THAT(load_error(d / "bad.txt", 8), Contains(d / "bad.txt") && Contains("invalid UTF-8 at byte offset 40"));
}

TEST_CASE("BatchSampler: shifted windows at uniform offsets, reproducible, exactly resumable", "[io][data]") {
  std::vector<int32_t> ids(300);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);  // id = position: a window reveals its offset
  const int64_t B = 4, T = 8;
  BatchSampler s1(ids, B, T, Rng(5, 2)), s2(ids, B, T, Rng(5, 2)), other(ids, B, T, Rng(6, 2));
  std::vector<int32_t> x(B * T), y(B * T), x2(B * T), y2(B * T);

  std::set<int32_t> starts;
  int64_t bad_windows = 0;
  for (int step = 0; step < 2000; ++step) {
    s1.next(x.data(), y.data());
    for (int64_t b = 0; b < B; ++b) {
      const int32_t s = x[size_t(b * T)];
      starts.insert(s);
      bool ok = s >= 0 && s < int32_t(ids.size()) - T;  // start in [0, len - T), as torch.randint(len - T)
      for (int64_t t = 0; t < T; ++t)
        ok = ok && x[size_t(b * T + t)] == s + t       // a contiguous window of the ids
             && y[size_t(b * T + t)] == s + t + 1;  // targets: the same window shifted by one
      bad_windows += !ok;
    }
  }
  CHECK(bad_windows == 0);
  CHECK(*starts.begin() == 0);
  CHECK(*starts.rbegin() == int32_t(ids.size()) - T - 1);  // every start reachable, the last one too
  CHECK(starts.size() == ids.size() - T);

  // Same seed, same batches; another seed, other batches.
  BatchSampler a(ids, B, T, Rng(5, 2));
  a.next(x.data(), y.data());
  s2.next(x2.data(), y2.data());
  CHECK(x == x2);
  CHECK(y == y2);
  other.next(x2.data(), y2.data());
  CHECK(x != x2);

  // A saved sampler state reproduces the next batches exactly (checkpoint resume).
  const RngState saved = a.state();
  std::vector<int32_t> next1(B * T), next2(B * T), tmp(B * T);
  a.next(next1.data(), tmp.data());
  a.next(next2.data(), tmp.data());
  BatchSampler resumed(ids, B, T, Rng(999));
  resumed.set_state(saved);
  resumed.next(x2.data(), y2.data());
  CHECK(x2 == next1);
  resumed.next(x2.data(), y2.data());
  CHECK(x2 == next2);
  BatchSampler from_state(ids, B, T, Rng(saved));
  from_state.next(x2.data(), y2.data());
  CHECK(x2 == next1);

  CHECK_THROWS_WITH(BatchSampler(std::vector<int32_t>(8), B, T, Rng(1)), Contains("need at least T + 1 = 9"));
  CHECK_THROWS_WITH(BatchSampler(ids, 0, T, Rng(1)), Contains("must both be positive"));
}

TEST_CASE("WindowBatcher: consecutive windows over a whole split, last batch partial", "[io][data]") {
  std::vector<int32_t> ids(43);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
  const int64_t B = 3, T = 4;
  const WindowBatcher w(ids, B, T);
  CHECK(w.windows() == 10);  // (43 - 1) / 4: ids 41 and 42 are a tail too short for a window
  CHECK(w.batches() == 4);   // 3 + 3 + 3 + 1
  CHECK(w.tokens() == 40);
  std::vector<int32_t> x(B * T, -1), y(B * T, -1);
  int64_t window = 0;
  for (int64_t i = 0; i < w.batches(); ++i) {
    const int64_t n = w.batch(i, x.data(), y.data());
    CHECK(n == (i < 3 ? 3 : 1));
    for (int64_t b = 0; b < n; ++b, ++window)
      for (int64_t t = 0; t < T; ++t) {
        CHECK(x[size_t(b * T + t)] == window * T + t);
        CHECK(y[size_t(b * T + t)] == window * T + t + 1);
      }
  }
  CHECK(window == 10);
  // Exactly T + 1 ids: one window. Fewer: an error.
  CHECK(WindowBatcher(std::vector<int32_t>(5), 2, 4).windows() == 1);
  CHECK_THROWS_WITH(WindowBatcher(std::vector<int32_t>(4), 2, 4), Contains("fewer than block_size + 1 = 5"));
  CHECK_THROWS_WITH(w.batch(4, x.data(), y.data()), Contains("batch 4 outside [0, 4)"));
}
