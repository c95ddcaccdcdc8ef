// Generator: streams tokens from a Model with a key/value cache.
//
// Each new token costs one position while the context is shorter than block_size. When the
// cache is full, the context is cut to its last `context_keep` tokens, which are re-encoded
// once (position embeddings are absolute, so cached keys cannot simply shift). With
// context_keep = block_size every token sees the full window, exactly like recomputing the
// last block_size tokens from scratch (and costs as much once the window is full); the
// default block_size / 2 makes each token cost about two positions on average.
//
// With model.position = "rope" the cache rolls instead (Model::decode): every token costs one
// position and sees the last block_size, whose keys were cached, rotated, at their absolute
// positions; context_keep does not apply (setting it is an error).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/generate/sampling.hpp"
#include "moe/model/model.hpp"

namespace moe {

struct GenerateOptions {
  SamplingOptions sampling;
  uint64_t seed = 1337;
  int64_t context_keep = 0;  // 0: block_size / 2 (learned positions only)
  DecodeProfile* profile = nullptr;  // where the time goes, when set (moe generate --profile)
};

class Generator {
 public:
  Generator(Model& model, const GenerateOptions& opt);
  // Feeds the prompt (its last block_size ids; an empty prompt starts from id 0), then calls
  // on_token for each of max_new sampled ids.
  void generate(const std::vector<int32_t>& prompt, int64_t max_new,
                const std::function<void(int32_t)>& on_token);

 private:
  Model& model_;
  GenerateOptions opt_;
  Rng rng_;
};

}  // namespace moe
