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

class Dataset {
 public:
  // Reads and encodes `path`. With `vocab` null the vocabulary comes from the text; else the
  // text is encoded with it (characters outside it are an error). Throws naming the path
  // when the file is missing, empty, not UTF-8, or a split is shorter than block_size + 1.
  static Dataset load(const std::string& path, double train_fraction, int64_t block_size,
                      const Tokenizer* vocab = nullptr);

  const Tokenizer& tokenizer() const { return tok_; }
  const std::vector<int32_t>& train() const { return train_; }
  const std::vector<int32_t>& val() const { return val_; }

 private:
  Tokenizer tok_;
  std::vector<int32_t> train_, val_;
};

// Keeps a pointer to `ids`: the vector must outlive the sampler.
class BatchSampler {
 public:
  BatchSampler(const std::vector<int32_t>& ids, int64_t B, int64_t T, Rng rng);
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
  const std::vector<int32_t>* ids_;
  int64_t B_, T_;
  Rng rng_;
  int64_t shard_index_ = 0, shard_count_ = 1;
};

// The split cut into consecutive, non-overlapping windows: window w is ids[w*T : w*T + T]
// as inputs and ids[w*T + 1 : w*T + T + 1] as targets, so every id but the first is predicted
// once (a tail shorter than T + 1 is left out). Batch i holds windows [i*B, i*B + B); the last
// batch may hold fewer. Keeps a pointer to `ids`: the vector must outlive the batcher.
class WindowBatcher {
 public:
  WindowBatcher(const std::vector<int32_t>& ids, int64_t B, int64_t T);
  int64_t windows() const { return windows_; }
  int64_t batches() const { return (windows_ + B_ - 1) / B_; }
  int64_t tokens() const { return windows_ * T_; }  // predicted tokens over all batches
  // Writes batch i into x, y (room for B*T ids each) and returns its number of windows.
  int64_t batch(int64_t i, int32_t* x, int32_t* y) const;

 private:
  const std::vector<int32_t>* ids_;
  int64_t B_, T_, windows_;
};

}  // namespace moe
