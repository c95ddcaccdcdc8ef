// The block-level memory policy: which outputs a block keeps and which it makes again.
//
// In a gradient scope (Graph::begin_grad_scope), an op given one of Remake's Regens puts its
// output in the scope's scratch memory, which every block reuses, and the Regen recomputes it,
// bit for bit, at the start of the block's backward pass (see Regen in moe/ops/ops.hpp).
// Model::block asks for one per output it does not keep, in forward order, and records them
// all after their last reader; outside a scope (no gradients, recomputation), or with
// Graph::remake off (training.keep_activations), next() gives nullptr and every output is an
// ordinary one, kept.
#pragma once

#include "moe/ops/ops.hpp"

namespace moe {

class Remake {
 public:
  explicit Remake(Graph& g) : g_(g), on_(g.in_scope() && g.remake()) {}
  Remake(const Remake&) = delete;
  Remake& operator=(const Remake&) = delete;
  // The Regen for the next output made again, or nullptr when nothing is.
  Regen* next() {
    if (!on_) return nullptr;
    MOE_CHECK(n_ < kMax, "Remake", "more than " + std::to_string(kMax) + " outputs made again in one block");
    return &list_[n_++];
  }
  // Records them last to first (a tape runs backwards: they then run in forward order), after
  // every reader of theirs.
  void record() {
    for (int i = n_ - 1; i >= 0; --i) g_.record(list_[i]);
    n_ = 0;
  }

 private:
  static constexpr int kMax = 8;
  Graph& g_;
  bool on_;
  Regen list_[kMax];
  int n_ = 0;
};

}  // namespace moe
