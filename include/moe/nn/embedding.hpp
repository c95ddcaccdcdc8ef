// Token and learned absolute position embeddings, added: x = tok_emb[id] + pos_emb[t]; or the
// token embeddings alone (model.position = "rope": positions enter in the attention).
#pragma once

#include "moe/nn/linear.hpp"

namespace moe {

struct Embeddings {
  int tok = -1, pos = -1;  // [V, C], [T_max, C] (-1: no position table)
  int64_t V = 0, C = 0, T_max = 0;

  static Embeddings make(ParamBuilder& pb, int64_t V, int64_t C, int64_t T_max, bool learned_positions);
  Tensor forward(Graph& g, const ParamStore& ps, const int32_t* idx, int64_t B, int64_t T) const;  // (B, T, C)
  // x [n, C] for tokens at positions first, first + 1, ...; throws on an id outside the vocabulary.
  void decode(const ParamStore& ps, const int32_t* tokens, int64_t n, int64_t first, float* x) const;
};

}  // namespace moe
