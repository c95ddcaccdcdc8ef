// Choosing the next token from logits: temperature, top-k, top-p (nucleus), seeded.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/tensor/rng.hpp"

namespace moe {

struct SamplingOptions {
  float temperature = 1.0f;  // 0: greedy (argmax)
  int64_t top_k = 0;         // 0: no top-k filter
  float top_p = 1.0f;        // in (0, 1]; 1: no nucleus filter
};

// Throws std::invalid_argument naming the option when out of range.
void validate(const SamplingOptions& opt);

// One token id from logits[V]. Ties in ordering go to the lower id; one uniform draw from
// rng per call (none when greedy). `scratch` avoids reallocating per token.
int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, Rng& rng,
                     std::vector<std::pair<float, int32_t>>& scratch);

}  // namespace moe
