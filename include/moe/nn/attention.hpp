// Causal multi-head self-attention: a fused qkv projection (no bias; rows [q; k; v], head h at
// rows h*D..(h+1)*D of each), softmax(q·kᵀ·scale) with dropout on the weights, the weighted
// sum of v, and the output projection.
#pragma once

#include <string>

#include "moe/nn/linear.hpp"
#include "moe/nn/remake.hpp"

namespace moe {

struct Attention {
  Linear qkv;   // C -> 3C
  Linear proj;  // C -> C
  int64_t C = 0, H = 0, D = 0;
  float scale = 0;

  static Attention make(ParamBuilder& pb, const std::string& prefix, int64_t C, int64_t H, float scale);
  // h (B, T, C) -> the output projection (B, T, C), before the residual's dropout. Dropout p on
  // the weights; what the block makes again comes from mem.
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& h, float p, bool training, Rng& rng, Remake& mem) const;
  // The n rows of w.normed at positions cache.len.. into w.sub, their keys and values into layer
  // `layer` of the cache.
  void decode(const ParamStore& ps, KVCache& cache, int64_t layer, int64_t n) const;
};

}  // namespace moe
