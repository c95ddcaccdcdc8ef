#include "moe/data/dataset.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace moe {

Dataset Dataset::load(const std::string& path, double train_fraction, int64_t block_size, const Tokenizer* vocab) {
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
    d.train_.assign(ids.begin(), ids.begin() + long(n));
    d.val_.assign(ids.begin() + long(n), ids.end());
  } catch (const std::exception& e) {
    throw std::runtime_error("data file " + path + ": " + e.what());
  }
  for (const auto* split : {&d.train_, &d.val_})
    if (int64_t(split->size()) < block_size + 1)
      throw std::runtime_error("data file " + path + ": the " + (split == &d.train_ ? "train" : "validation") +
                               " split has " + std::to_string(split->size()) + " characters, fewer than block_size + 1 = " +
                               std::to_string(block_size + 1) + " (" + std::to_string(cps.size()) +
                               " characters in all; use more text or a smaller model.block_size)");
  return d;
}

BatchSampler::BatchSampler(const std::vector<int32_t>& ids, int64_t B, int64_t T, Rng rng)
    : ids_(&ids), B_(B), T_(T), rng_(rng) {
  if (int64_t(ids.size()) < T + 1)
    throw std::runtime_error("BatchSampler: " + std::to_string(ids.size()) + " ids, need at least T + 1 = " +
                             std::to_string(T + 1));
}

void BatchSampler::next(int32_t* x, int32_t* y) {
  const uint64_t range = uint64_t(ids_->size()) - uint64_t(T_);  // offsets in [0, len - T)
  for (int64_t b = 0; b < B_; ++b) {
    const size_t s = size_t(rng_.below(range));
    for (int64_t t = 0; t < T_; ++t) {
      x[b * T_ + t] = (*ids_)[s + size_t(t)];
      y[b * T_ + t] = (*ids_)[s + size_t(t) + 1];
    }
  }
}

}  // namespace moe
