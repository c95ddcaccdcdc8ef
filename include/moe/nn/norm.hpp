// The model's norm over the channels, one of (model.norm):
//   LayerNorm: (x - mean) / sqrt(var + eps) · w + b
//   RMSNorm:   x / sqrt(mean(x²) + eps) · w  (no bias)
#pragma once

#include <string>

#include "moe/io/config.hpp"
#include "moe/nn/linear.hpp"

namespace moe {

struct Norm {
  static constexpr float kEps = 1e-5f;
  NormKind kind = NormKind::kLayerNorm;
  int weight = -1, bias = -1;  // [C]; bias -1 for RMSNorm
  int64_t C = 0;

  static Norm make(ParamBuilder& pb, const std::string& name, int64_t C, NormKind kind);
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& x, Regen* regen = nullptr) const;
  // The n rows of x [n, C] into w.normed (w.mean and w.rstd hold the row statistics).
  void decode(const ParamStore& ps, KVCache::Work& w, const float* x, int64_t n) const;
};

}  // namespace moe
