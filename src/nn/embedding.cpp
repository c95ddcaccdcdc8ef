#include "moe/nn/embedding.hpp"

#include <algorithm>

#include "moe/ops/ops.hpp"

namespace moe {

Embeddings Embeddings::make(ParamBuilder& pb, int64_t V, int64_t C, int64_t T_max, bool learned_positions) {
  Embeddings e;
  e.V = V, e.C = C, e.T_max = T_max;
  e.tok = pb.add("tok_emb.weight", {V, C}, false, {ParamRole::kEmbedding});
  if (learned_positions) e.pos = pb.add("pos_emb.weight", {T_max, C}, false, {ParamRole::kEmbedding});
  return e;
}

Tensor Embeddings::forward(Graph& g, const ParamStore& ps, const int32_t* idx, int64_t B, int64_t T) const {
  if (pos < 0) return embedding(g, idx, ps.get(tok), {B, T, C});
  int32_t* positions = g.arena().alloc_ints(B * T);
  for (int64_t i = 0; i < B * T; ++i) positions[i] = int32_t(i % T);
  return add(g, embedding(g, idx, ps.get(tok), {B, T, C}), embedding(g, positions, ps.get(pos), {B, T, C}));
}

void Embeddings::decode(const ParamStore& ps, const int32_t* tokens, int64_t n, int64_t first, float* x) const {
  const float* te_all = ps.get(tok).data;
  const float* pe_all = pos >= 0 ? ps.get(pos).data : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(tokens[i] >= 0 && tokens[i] < V, "Model::decode",
              "id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
    const float* te = te_all + int64_t(tokens[i]) * C;
    if (!pe_all) {
      std::copy(te, te + C, x + i * C);
      continue;
    }
    const float* pe = pe_all + (first + i) * C;
    for (int64_t c = 0; c < C; ++c) x[i * C + c] = te[c] + pe[c];
  }
}

}  // namespace moe
