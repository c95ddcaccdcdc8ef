// Dataset: a UTF-8 text file, its character vocabulary, and the train/validation split of
// its ids (the first train_fraction of the ids train, the rest validation, like makeMoE).
// BatchSampler: makeMoE's random batches (B windows of T + 1 ids at uniform offsets).
// WindowBatcher: deterministic evaluation batches over a whole split.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/data/tokenizer.hpp"
#include "moe/tensor/rng.hpp"

namespace moe {

// A split's ids, as a view of the bytes a vocabulary of at most 256 characters is kept in
// (tiny Shakespeare has 65: a quarter of the memory of int32 ids) or of int32 ids. The storage
// must outlive the view.
class TokenSpan {
 public:
  TokenSpan(const std::vector<int32_t>& ids) : wide_(ids.data()), n_(ids.size()) {}  // NOLINT: implicit
  TokenSpan(const std::vector<uint8_t>& ids) : narrow_(ids.data()), n_(ids.size()) {}  // NOLINT: implicit
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  int32_t operator[](size_t i) const { return narrow_ ? int32_t(narrow_[i]) : wide_[i]; }
  // out[j] = (*this)[begin + j] for j < n.
  void copy(size_t begin, size_t n, int32_t* out) const;
  std::vector<int32_t> to_vector() const;

 private:
  const uint8_t* narrow_ = nullptr;
  const int32_t* wide_ = nullptr;
  size_t n_ = 0;
};

class Dataset {
 public:
  // Reads and encodes `path`. With `vocab` null the vocabulary comes from the text; else the
  // text is encoded with it (characters outside it are an error). Throws naming the path
  // when the file is missing, empty, not UTF-8, or a split is shorter than block_size + 1.
  static Dataset load(const std::string& path, double train_fraction, int64_t block_size,
                      const Tokenizer* vocab = nullptr);

  const Tokenizer& tokenizer() const { return tok_; }
  TokenSpan train() const { return narrow_ ? TokenSpan(train8_) : TokenSpan(train_); }
  TokenSpan val() const { return narrow_ ? TokenSpan(val8_) : TokenSpan(val_); }

 private:
  Tokenizer tok_;
  bool narrow_ = false;  // the ids in bytes
  std::vector<int32_t> train_, val_;
  std::vector<uint8_t> train8_, val8_;
};

// Keeps the view `ids`: its storage must outlive the sampler.
class BatchSampler {
 public:
  BatchSampler(TokenSpan ids, int64_t B, int64_t T, Rng rng);
  // x, y: B*T ids each; y is x shifted by one. Row b uses the generator's counter + b (one
  // number per row), then the counter moves past the batch.
  void next(int32_t* x, int32_t* y);
  // Data parallelism: this process takes rows [index·B, index·B + B) of a batch of count·B
  // rows, so `count` processes together draw exactly one process's batch of count·B.
  void set_shard(int64_t index, int64_t count);
  // Moves past one batch without drawing it (another process draws it).
  void skip();
  const RngState& state() const { return rng_.state(); }
  void set_state(const RngState& s) { rng_.set_state(s); }

 private:
  TokenSpan ids_;
  int64_t B_, T_;
  Rng rng_;
  int64_t shard_index_ = 0, shard_count_ = 1;
};

// The split cut into consecutive, non-overlapping windows: window w is ids[w*T : w*T + T]
// as inputs and ids[w*T + 1 : w*T + T + 1] as targets, so every id but the first is predicted
// once (a tail shorter than T + 1 is left out). Batch i holds windows [i*B, i*B + B); the last
// batch may hold fewer. Keeps the view `ids`: its storage must outlive the batcher.
class WindowBatcher {
 public:
  WindowBatcher(TokenSpan ids, int64_t B, int64_t T);
  int64_t windows() const { return windows_; }
  int64_t batches() const { return (windows_ + B_ - 1) / B_; }
  int64_t tokens() const { return windows_ * T_; }  // predicted tokens over all batches
  // Writes batch i into x, y (room for B*T ids each) and returns its number of windows.
  int64_t batch(int64_t i, int32_t* x, int32_t* y) const;

 private:
  TokenSpan ids_;
  int64_t B_, T_, windows_;
};

}  // namespace moe
