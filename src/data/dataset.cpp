#include "moe/data/dataset.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace moe {

Dataset Dataset::load(const std::string& path, double train_fraction, int64_t block_size, const Tokenizer* vocab) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw std::runtime_error("data file " + path + " is a directory; set data.path to a UTF-8 text file");
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw std::runtime_error("data file " + path + " cannot be opened (for tiny Shakespeare run data/get_data.sh)");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  if (text.empty()) throw std::runtime_error("data file " + path + " is empty");
  Dataset d;
  std::vector<uint32_t> cps;
  try {
    cps = utf8_decode(text);
  } catch (const std::exception& e) {
    throw std::runtime_error("data file " + path + ": " + e.what());
  }
  try {
    d.tok_ = vocab ? *vocab : Tokenizer::from_vocab([&] {
      std::vector<uint32_t> v = cps;
      std::sort(v.begin(), v.end());
      v.erase(std::unique(v.begin(), v.end()), v.end());
      return v;
    }());
    std::vector<int32_t> ids = d.tok_.encode_code_points(cps);
    const size_t n = size_t(train_fraction * double(ids.size()));
    d.narrow_ = d.tok_.size() <= 256;
    if (d.narrow_) {
      d.train8_.assign(ids.begin(), ids.begin() + long(n));  // every id < 256
      d.val8_.assign(ids.begin() + long(n), ids.end());
    } else {
      d.train_.assign(ids.begin(), ids.begin() + long(n));
      d.val_.assign(ids.begin() + long(n), ids.end());
    }
  } catch (const std::exception& e) {
    throw std::runtime_error("data file " + path + ": " + e.what());
  }
  for (const bool train : {true, false})
    if (const size_t size = (train ? d.train() : d.val()).size(); int64_t(size) < block_size + 1)
      throw std::runtime_error("data file " + path + ": the " + (train ? "train" : "validation") +
                               " split has " + std::to_string(size) + " characters, fewer than block_size + 1 = " +
                               std::to_string(block_size + 1) + " (" + std::to_string(cps.size()) +
                               " characters in all; use more text or a smaller model.block_size)");
  return d;
}

void TokenSpan::copy(size_t begin, size_t n, int32_t* out) const {
  if (narrow_)
    std::copy(narrow_ + begin, narrow_ + begin + n, out);
  else
    std::copy(wide_ + begin, wide_ + begin + n, out);
}

std::vector<int32_t> TokenSpan::to_vector() const {
  std::vector<int32_t> out(n_);
  copy(0, n_, out.data());
  return out;
}

BatchSampler::BatchSampler(TokenSpan ids, int64_t B, int64_t T, Rng rng) : ids_(ids), B_(B), T_(T), rng_(rng) {
  if (B < 1 || T < 1)
    throw std::runtime_error("BatchSampler: batch size " + std::to_string(B) + " and block size " + std::to_string(T) +
                             " must both be positive");
  if (int64_t(ids.size()) < T + 1)
    throw std::runtime_error("BatchSampler: " + std::to_string(ids.size()) + " ids, need at least T + 1 = " +
                             std::to_string(T + 1));
}

void BatchSampler::set_shard(int64_t index, int64_t count) {
  if (count < 1 || index < 0 || index >= count)
    throw std::runtime_error("BatchSampler: shard " + std::to_string(index) + " of " + std::to_string(count));
  shard_index_ = index, shard_count_ = count;
}

void BatchSampler::skip() {
  RngState s = rng_.state();
  s.counter += uint64_t(shard_count_ * B_);
  rng_.set_state(s);
}

void BatchSampler::next(int32_t* x, int32_t* y) {
  const uint64_t range = uint64_t(ids_.size()) - uint64_t(T_);  // offsets in [0, len - T)
  // Row g of the shared batch (shard_count_ * B rows) starts at counter base + g.
  RngState base = rng_.state();
  for (int64_t b = 0; b < B_; ++b) {
    RngState row = base;
    row.counter += uint64_t(shard_index_ * B_ + b);
    Rng r(row);
    const size_t s = size_t(r.below(range));
    ids_.copy(s, size_t(T_), x + b * T_);
    ids_.copy(s + 1, size_t(T_), y + b * T_);
  }
  base.counter += uint64_t(shard_count_ * B_);
  rng_.set_state(base);
}

WindowBatcher::WindowBatcher(TokenSpan ids, int64_t B, int64_t T) : ids_(ids), B_(B), T_(T), windows_(0) {
  if (B < 1 || T < 1)
    throw std::runtime_error("WindowBatcher: batch size " + std::to_string(B) + " and block size " +
                             std::to_string(T) + " must both be positive");
  windows_ = ids.empty() ? 0 : (int64_t(ids.size()) - 1) / T;
  if (windows_ < 1)
    throw std::runtime_error("WindowBatcher: the split has " + std::to_string(ids.size()) +
                             " tokens, fewer than block_size + 1 = " + std::to_string(T + 1));
}

int64_t WindowBatcher::batch(int64_t i, int32_t* x, int32_t* y) const {
  if (i < 0 || i >= batches())
    throw std::runtime_error("WindowBatcher: batch " + std::to_string(i) + " outside [0, " +
                             std::to_string(batches()) + ")");
  const int64_t w0 = i * B_, n = std::min(B_, windows_ - w0);
  for (int64_t b = 0; b < n; ++b) {
    const auto w = size_t((w0 + b) * T_);
    ids_.copy(w, size_t(T_), x + b * T_);
    ids_.copy(w + 1, size_t(T_), y + b * T_);
  }
  return n;
}

}  // namespace moe
