// Dataset: a UTF-8 text file, its character vocabulary, and the train/validation split of
// its ids (the first train_fraction of the ids train, the rest validation, like makeMoE).
// BatchSampler: makeMoE's random batches (B windows of T + 1 ids at uniform offsets).
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

class BatchSampler {
 public:
  BatchSampler(const std::vector<int32_t>& ids, int64_t B, int64_t T, Rng rng);
  // x, y: B*T ids each; y is x shifted by one.
  void next(int32_t* x, int32_t* y);
  const RngState& state() const { return rng_.state(); }
  void set_state(const RngState& s) { rng_.set_state(s); }

 private:
  const std::vector<int32_t>* ids_;
  int64_t B_, T_;
  Rng rng_;
};

}  // namespace moe
