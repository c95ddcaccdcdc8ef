// LayerNorm over the channels: (x - mean) / sqrt(var + eps) · w + b.
#pragma once

#include <string>

#include "moe/nn/linear.hpp"

namespace moe {

struct LayerNorm {
  static constexpr float kEps = 1e-5f;
  int weight = -1, bias = -1;  // [C]
  int64_t C = 0;

  static LayerNorm make(ParamBuilder& pb, const std::string& name, int64_t C);
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& x, Regen* regen = nullptr) const;
  // The n rows of x [n, C] into w.normed (w.mean and w.rstd hold the row statistics).
  void decode(const ParamStore& ps, KVCache::Work& w, const float* x, int64_t n) const;
};

}  // namespace moe
