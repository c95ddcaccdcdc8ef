// safetensors: round trip, byte-exact layout, validation of damaged files, atomic writes,
// and the numpy loader script on a file written here.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "moe/io/safetensors.hpp"

using namespace moe;
using Catch::Contains;
using moe_test::read_file;
using moe_test::error_of;
using moe_test::TempDir;
using moe_test::write_file;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(v >> (8 * i)));
  return s;
}

// A safetensors file as another tool might write it: header text as given (padded), then data.
std::string st_bytes(std::string header, const std::string& data) {
  header.append((8 - header.size() % 8) % 8, ' ');
  return le64(header.size()) + header + data;
}

std::string load_error(const std::string& path) { return error_of([&] { load_safetensors(path); }); }

std::string save_error(const std::string& path, const std::vector<TensorEntry>& t) {
  return error_of([&] { save_safetensors(path, t, {}); });
}

}  // namespace

TEST_CASE("safetensors: several tensors and metadata round-trip", "[io][safetensors]") {
  TempDir d("st_rt");
  const std::string path = d / "a.safetensors";
  const float w[6] = {1, 2, 3, 4, 5, -6.5f};
  const int32_t ids[3] = {7, -1, 9};
  const int64_t big[2] = {int64_t(1) << 40, -3};
  const uint8_t bytes[5] = {0, 1, 2, 254, 255};
  const float scalar = 3.25f;
  save_safetensors(path,
                   {{"w", DType::F32, {2, 3}, w, sizeof w},
                    {"ids", DType::I32, {3}, ids, sizeof ids},
                    {"big", DType::I64, {2, 1}, big, sizeof big},
                    {"bytes", DType::U8, {5}, bytes, sizeof bytes},
                    {"scalar", DType::F32, {}, &scalar, sizeof scalar},
                    {"empty", DType::F32, {0, 4}, nullptr, 0}},
                   {{"config", R"({"model": {"n_layer": 2}})"}, {"step", "42"}});
  CHECK_FALSE(fs::exists(path + ".tmp"));
  const SafeTensorsFile f = load_safetensors(path);
  CHECK(f.path() == path);
  CHECK(f.names() == std::vector<std::string>{"big", "bytes", "empty", "ids", "scalar", "w"});
  CHECK(f.metadata().at("config") == R"({"model": {"n_layer": 2}})");
  CHECK(f.metadata().at("step") == "42");
  CHECK(f.metadata().count("checksum_fnv1a64") == 1);
  CHECK(f.info("w").dtype == DType::F32);
  CHECK(f.info("w").shape == std::vector<int64_t>{2, 3});
  CHECK(f.info("big").dtype == DType::I64);
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.info("empty").end == f.info("empty").begin);

  float w2[6];
  f.copy_f32("w", {2, 3}, w2);
  CHECK(std::memcmp(w, w2, sizeof w) == 0);
  int32_t ids2[3];
  f.copy_i32("ids", ids2, 3);
  CHECK(std::memcmp(ids, ids2, sizeof ids) == 0);
  CHECK(std::memcmp(f.bytes("big"), big, sizeof big) == 0);
  CHECK(std::memcmp(f.bytes("bytes"), bytes, sizeof bytes) == 0);
  float s2 = 0;
  f.copy_f32("scalar", Shape{}, &s2);
  CHECK(s2 == 3.25f);

  CHECK_THROWS_WITH(f.copy_f32("w", {3, 2}, w2), Contains(path) && Contains("shape [2, 3]") && Contains("expects [3, 2]"));
  CHECK_THROWS_WITH(f.copy_f32("w", {6}, w2), Contains("shape [2, 3]"));
  CHECK_THROWS_WITH(f.copy_f32("ids", {3}, w2), Contains("tensor ids is I32, expected F32"));
  CHECK_THROWS_WITH(f.copy_i32("ids", ids2, 4), Contains("not I32 with 4 elements"));
  CHECK_THROWS_WITH(f.info("nope"), Contains(path) && Contains("no tensor 'nope'"));

  // Writer-side mistakes are caught before anything is written.
  CHECK_THAT(save_error(d / "x", {{"w", DType::F32, {2, 2}, w, sizeof w}}), Contains("shape gives 16 bytes of F32 but 24"));
  CHECK_THAT(save_error(d / "x", {{"w", DType::F32, {6}, w, sizeof w}, {"w", DType::F32, {6}, w, sizeof w}}),
             Contains("tensor w twice"));
  CHECK_THAT(save_error(d / "x", {{"__metadata__", DType::F32, {6}, w, sizeof w}}), Contains("reserved"));
  CHECK_FALSE(fs::exists(d / "x"));
}

TEST_CASE("safetensors: byte-exact layout of a tiny file", "[io][safetensors]") {
  TempDir d("st_layout");
  const std::string path = d / "tiny.safetensors";
  const float a[2] = {1.0f, -2.0f};  // 00 00 80 3f, 00 00 00 c0
  const int32_t b[1] = {258};        // 02 01 00 00
  save_safetensors(path, {{"a", DType::F32, {2}, a, sizeof a}, {"b", DType::I32, {1, 1}, b, sizeof b}}, {{"k", "v"}});

  const std::string data("\x00\x00\x80\x3f\x00\x00\x00\xc0\x02\x01\x00\x00", 12);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx",
                (unsigned long long)fnv1a64(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  const std::string json_text = std::string(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)") +
                                R"("b":{"dtype":"I32","shape":[1,1],"data_offsets":[8,12]},)" +
                                R"("__metadata__":{"k":"v","checksum_fnv1a64":")" + hex + R"("}})";
  const std::string expected = st_bytes(json_text, data);
  const std::string actual = read_file(path);
  CHECK(actual.size() == expected.size());
  CHECK(actual.size() % 8 == 4);  // 8 + padded header (a multiple of 8) + 12 data bytes
  CHECK(actual == expected);
  // FNV-1a-64 reference value: the empty input hashes to the offset basis.
  CHECK(fnv1a64(nullptr, 0) == 0xcbf29ce484222325ull);
  CHECK(fnv1a64(reinterpret_cast<const uint8_t*>("a"), 1) == 0xaf63dc4c8601ec8cull);
}

TEST_CASE("safetensors: damaged files give errors naming the path and the problem", "[io][safetensors]") {
  TempDir d("st_bad");
  const std::string good = d / "good.safetensors";
  const float w[4] = {1, 2, 3, 4};
  save_safetensors(good, {{"w", DType::F32, {4}, w, sizeof w}}, {});
  const std::string bytes = read_file(good);
  int n = 0;
  auto damaged = [&](const std::string& content) {
    const std::string p = d / ("bad" + std::to_string(n++));
    write_file(p, content);
    return p;
  };

  std::string p = damaged("abc");
  CHECK_THAT(load_error(p), Contains(p) && Contains("too short (3 bytes)"));
  p = damaged(bytes.substr(0, bytes.size() - 5));
  CHECK_THAT(load_error(p), Contains(p) && Contains("outside the file's 11-byte data section (truncated?)"));
  p = damaged(bytes.substr(0, 20));
  CHECK_THAT(load_error(p), Contains(p) && Contains("exceeds the file (20 bytes)"));
  p = damaged(le64(uint64_t(1) << 62) + "{}");
  CHECK_THAT(load_error(p), Contains("header length 4611686018427387904 exceeds the file"));
  CHECK_THAT(load_error(d / "missing"), Contains(d / "missing") && Contains("cannot open"));
  CHECK_THAT(load_error(d.path.string()), Contains(d.path.string()) && Contains("is a directory"));

  std::string flipped = bytes;
  flipped[flipped.size() - 2] ^= 0x40;  // one bit of the data
  p = damaged(flipped);
  CHECK_THAT(load_error(p), Contains(p) && Contains("checksum mismatch") && Contains("corrupted"));

  const std::string data16(16, '\0');
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)", data16));
  CHECK_THAT(load_error(p), Contains(p) && Contains("header is not valid JSON"));
  p = damaged(st_bytes(R"([1, 2])", data16));
  CHECK_THAT(load_error(p), Contains("header is not a JSON object"));
  p = damaged(st_bytes(R"({"w":{"dtype":"BF16","shape":[8],"data_offsets":[0,16]}})", data16));
  CHECK_THAT(load_error(p), Contains("tensor w has unsupported dtype BF16"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,32]}})", data16));
  CHECK_THAT(load_error(p), Contains("tensor w has data offsets [0, 32) outside"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,4]}})", data16));
  CHECK_THAT(load_error(p), Contains("tensor w has malformed data_offsets [8,4]"));
  // Found by tests/fuzz/fuzz_checkpoint.cpp: a float offset went through an out-of-range (undefined) cast.
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,85e52]}})", data16));
  CHECK_THAT(load_error(p), Contains(p) && Contains("tensor w: data_offsets must be an array of non-negative integers, got [0,8.5e+53]"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[-16,0]}})", data16));
  CHECK_THAT(load_error(p), Contains("data_offsets must be an array of non-negative integers"));
  p = damaged(st_bytes(R"({"w":)" + std::string(60000, '[') + std::string(60000, ']') + "}", data16));
  CHECK_THAT(load_error(p), Contains("tensor w: header entry must be an object, got an array nested over 64 levels deep"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}})", data16));
  CHECK_THAT(load_error(p), Contains("tensor w: shape must be an array of integers, got [4.0]"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data16));
  CHECK_THAT(load_error(p), Contains("tensor w: shape [3] of F32 needs 12 bytes, data_offsets give 16"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","shape":[4611686018427387904, 4],"data_offsets":[0,16]}})", data16));
  CHECK_THAT(load_error(p), Contains("is larger than the file"));
  p = damaged(st_bytes(R"({"u":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                       R"("v":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data16));
  CHECK_THAT(load_error(p), Contains("tensors u and v overlap"));
  p = damaged(st_bytes(R"({"w":{"dtype":"F32","data_offsets":[0,16]}})", data16));
  CHECK_THAT(load_error(p), Contains("malformed header") && Contains("shape"));
  p = damaged(st_bytes(R"({"__metadata__":{"step":3}})", ""));
  CHECK_THAT(load_error(p), Contains("metadata step must be a string"));

  // A file from another writer, with no checksum, loads (the check is skipped).
  p = damaged(st_bytes(R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})",
                       std::string(reinterpret_cast<const char*>(w), sizeof w)));
  const SafeTensorsFile other = load_safetensors(p);
  float w2[4];
  other.copy_f32("w", {2, 2}, w2);
  CHECK(w2[3] == 4.f);
  CHECK(other.metadata().at("format") == "pt");
  // Checkpoints written before the FNV basis fix (basis 1469598103934665603) still load.
  const std::string wdata(reinterpret_cast<const char*>(w), sizeof w);
  char legacy[17];
  std::snprintf(legacy, sizeof legacy, "%016llx",
                (unsigned long long)fnv1a64_update(1469598103934665603ull, reinterpret_cast<const uint8_t*>(wdata.data()), 16));
  p = damaged(st_bytes(std::string(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)") +
                           R"("__metadata__":{"checksum_fnv1a64":")" + legacy + R"("}})", wdata));
  CHECK_NOTHROW(load_safetensors(p));
  std::string legacy_flipped = read_file(p);
  legacy_flipped.back() ^= 1;
  CHECK_THAT(load_error(damaged(legacy_flipped)), Contains("checksum mismatch"));

  const std::string fixture = MOE_SOURCE_DIR "/tests/fixtures/twin_tiny.safetensors";  // written by torch_twin.py
  if (fs::exists(fixture)) CHECK(load_safetensors(fixture).names().size() > 10);
}

TEST_CASE("safetensors: a failed write throws and leaves the previous file intact", "[io][safetensors]") {
  TempDir d("st_atomic");
  const float old_w[4] = {1, 2, 3, 4}, new_w[4] = {9, 9, 9, 9};
  const std::vector<TensorEntry> next = {{"w", DType::F32, {4}, new_w, sizeof new_w}};
  auto still_old = [&](const std::string& path) {
    float w[4] = {0};
    load_safetensors(path).copy_f32("w", {4}, w);
    return w[0] == 1.f && w[3] == 4.f;
  };

  // Target directory missing.
  const std::string missing = d / "no/such/dir/x.safetensors";
  CHECK_THAT(save_error(missing, next), Contains(missing) && Contains("No such file or directory"));
  CHECK_FALSE(fs::exists(d / "no"));

  // The temporary cannot be created (here: a directory is in its way; works even as root).
  const std::string path = d / "ckpt.safetensors";
  save_safetensors(path, {{"w", DType::F32, {4}, old_w, sizeof old_w}}, {});
  fs::create_directory(path + ".tmp");
  CHECK_THAT(save_error(path, next), Contains(path) && Contains("Is a directory") && Contains("previous file"));
  CHECK(still_old(path));
  fs::remove(path + ".tmp");

  // The rename fails (the target is a non-empty directory): the temporary is removed.
  const std::string dir_target = d / "taken";
  fs::create_directories(fs::path(dir_target) / "inside");
  CHECK_THAT(save_error(dir_target, next), Contains(dir_target) && Contains("writing failed at rename"));
  CHECK_FALSE(fs::exists(dir_target + ".tmp"));
  CHECK(fs::is_directory(dir_target));

  // A read-only target directory (not testable as root, who may write anyway).
  fs::create_directories(d / "ro");
  const std::string ro_path = d / "ro/x.safetensors";
  save_safetensors(ro_path, {{"w", DType::F32, {4}, old_w, sizeof old_w}}, {});
  fs::permissions(d / "ro", fs::perms::owner_read | fs::perms::owner_exec);
  if (::access((d / "ro").c_str(), W_OK) != 0)
    CHECK_THAT(save_error(ro_path, next), Contains(ro_path) && Contains("Permission denied"));
  else
    WARN("running as root: the read-only directory case is not observable");
  fs::permissions(d / "ro", fs::perms::owner_all);
  CHECK(still_old(ro_path));
  CHECK_FALSE(fs::exists(ro_path + ".tmp"));

  // And a successful write replaces the file.
  save_safetensors(path, next, {});
  CHECK_FALSE(still_old(path));
  CHECK_FALSE(fs::exists(path + ".tmp"));
}

TEST_CASE("safetensors: scripts/load_checkpoint.py reads a file written here (numpy only)", "[io][safetensors]") {
  if (std::system("/usr/bin/python3 -c 'import numpy' >/dev/null 2>&1") != 0) {
    WARN("/usr/bin/python3 with numpy not available; skipped");
    return;
  }
  TempDir d("st_py");
  const std::string path = d / "c.safetensors", out = d / "out.txt";
  const float w[6] = {1, 2, 3, 4, 5, 6};
  const int32_t ids[3] = {7, -1, 9};
  save_safetensors(path, {{"tok.weight", DType::F32, {2, 3}, w, sizeof w}, {"ids", DType::I32, {3}, ids, sizeof ids}},
                   {{"step", "42"}});
  const std::string script = MOE_SOURCE_DIR "/scripts/load_checkpoint.py";
  REQUIRE(std::system(("/usr/bin/python3 " + script + " --verify " + path + " > " + out + " 2>&1").c_str()) == 0);
  const std::string listing = read_file(out);
  CHECK_THAT(listing, Contains("tok.weight") && Contains("float32") && Contains("[2, 3]"));
  CHECK_THAT(listing, Contains("ids") && Contains("int32") && Contains("[3]"));
  CHECK_THAT(listing, Contains("metadata step: 42") && Contains("metadata checksum_fnv1a64"));

  const std::string check = "/usr/bin/python3 -c \"import sys; sys.path.insert(0, '" MOE_SOURCE_DIR "/scripts'); "
                            "from load_checkpoint import load; t, m = load('" + path + "', verify=True); "
                            "assert t['tok.weight'].tolist() == [[1, 2, 3], [4, 5, 6]], t; "
                            "assert t['ids'].tolist() == [7, -1, 9]; assert m['step'] == '42'\" > " + out + " 2>&1";
  CHECK(std::system(check.c_str()) == 0);
  INFO(read_file(out));

  // A corrupted byte: the script's --verify catches it too.
  std::string bytes = read_file(path);
  bytes[bytes.size() - 1] ^= 1;
  write_file(path, bytes);
  CHECK(std::system(("/usr/bin/python3 " + script + " --verify " + path + " > " + out + " 2>&1").c_str()) != 0);
  CHECK_THAT(read_file(out), Contains("checksum mismatch"));
}

TEST_CASE("safetensors: read_f32 from the header alone reads only what is asked, and still checks the checksum",
          "[io][safetensors]") {
  TempDir d("st_stream");
  const std::string path = d / "a.safetensors";
  std::vector<float> a(300), skipped(300000), b(5);  // "skipped": more than one 1 MiB read buffer
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i) * 0.5f;
  for (size_t i = 0; i < skipped.size(); ++i) skipped[i] = -float(i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = 7.f + float(i);
  save_safetensors(path,
                   {{"a", DType::F32, {300}, a.data(), a.size() * 4},
                    {"skipped", DType::F32, {300000}, skipped.data(), skipped.size() * 4},
                    {"b", DType::F32, {5}, b.data(), b.size() * 4}},
                   {{"step", "3"}});
  const SafeTensorsFile h = read_safetensors_header(path);
  CHECK_FALSE(h.in_memory());
  CHECK(h.metadata().at("step") == "3");
  CHECK(h.info("skipped").shape == std::vector<int64_t>{300000});
  std::vector<float> a2(300), b2(5);
  h.read_f32({{"b", {5}, b2.data()}, {"a", {300}, a2.data()}});  // any order
  CHECK(a2 == a);
  CHECK(b2 == b);
  float w[4];
  CHECK_THROWS_WITH(h.copy_f32("b", {5}, w), Contains("only the header was read"));
  CHECK_THROWS_WITH(h.read_f32({{"b", {4}, w}}), Contains("shape [5]") && Contains("expects [4]"));
  // A flipped bit in a tensor not asked for is still found.
  std::string bytes = read_file(path);
  bytes[bytes.size() - 5 * 4 - 1000] ^= 0x10;  // inside "skipped"
  write_file(path, bytes);
  const SafeTensorsFile damaged = read_safetensors_header(path);
  CHECK_THROWS_WITH(damaged.read_f32({{"a", {300}, a2.data()}}), Contains(path) && Contains("checksum mismatch"));
  // A truncated file: its header promises more data than there is.
  write_file(path, bytes.substr(0, bytes.size() - 8));
  CHECK_THROWS_WITH(read_safetensors_header(path), Contains("outside the file"));
}
