// Expert feed-forward networks: fc2(act(fc1 x)) for relu and gelu, fc2(silu(fc1 x) ⊙ fc3 x)
// for SwiGLU (Mixtral's form, without biases). The routed experts of a layer also run as one
// group, on separate threads, over rows sorted by expert.
#pragma once

#include <string>
#include <vector>

#include "moe/io/config.hpp"
#include "moe/kernels/activations.hpp"
#include "moe/nn/linear.hpp"

namespace moe {

// fc1's activation for an expert kind: relu, gelu, or silu (SwiGLU's gate).
Activation expert_activation(ExpertFfn kind);

struct Expert {
  Linear fc1;  // C -> F
  Linear fc2;  // F -> C
  Linear fc3;  // C -> F, SwiGLU's linear branch (weight -1 otherwise)

  static Expert make(ParamBuilder& pb, const std::string& prefix, int64_t C, int64_t F, ExpertFfn kind);
  // x (n, C) -> (n, C), with dropout p over the output (drawn from rng when training).
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& x, ExpertFfn kind, float p, bool training,
                 Rng& rng) const;
  // The same in evaluation on the n rows of x [n, C] into y; hidden, hidden3: [n, F] buffers.
  void decode(const ParamStore& ps, ExpertFfn kind, const float* x, int64_t n, float* hidden, float* hidden3,
              float* y) const;
};

// Rows offsets[e]..offsets[e+1] of xs [S, C] through expert e, for every expert at once, into
// the same rows of the result [S, C] (before dropout). The same numbers as each expert's
// forward on its rows: gemm gives a row the same bits whatever the grouping.
Tensor grouped_experts(Graph& g, const ParamStore& ps, const std::vector<Expert>& experts, ExpertFfn kind,
                       const Tensor& xs, const int32_t* offsets);

}  // namespace moe
