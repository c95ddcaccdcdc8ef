// The sparse MoE feed-forward layer: the router makes a plan, an executor runs the routed
// experts on it, and the weighted outputs are added up per token, with the shared experts'.
//
// Executors (src/nn/moe.cpp), all running the same expert code on the same plan:
// - grouped: one process, every expert at once on separate threads;
// - per expert, data parallel: each process its own rows, dropout drawn where one process with
//   the whole batch would draw it;
// - all to all, expert parallel: rows travel to the rank that owns their expert and back.
#pragma once

#include <string>
#include <vector>

#include "moe/nn/experts.hpp"
#include "moe/nn/router.hpp"

namespace moe {

// What a layer reads and writes of the model's state, and how the processes share the work.
struct MoEContext {
  const float* bias = nullptr;  // [E] the balancing bias, or null when off
  int64_t* last_load = nullptr;  // [E] written by training forwards: slots per expert, global batch
  int rank = 0, ranks = 1;
  bool expert_parallel = false;
  Rng* unused_rng = nullptr;  // handed to dropout when it is off: never drawn
  const float* thresholds = nullptr;  // [E] expert_choice: the causal thresholds
  float* last_kth = nullptr;  // [E] expert_choice, written by training forwards: each expert's C-th
                              // score, the mean over the processes' batches
  int64_t* last_tokens = nullptr;  // written by training forwards: tokens of the global batch
  int expert_owner(int64_t e, int64_t E) const { return expert_parallel ? int(e / (E / ranks)) : 0; }
};

class MoELayer {
 public:
  Router router;
  std::vector<Expert> experts;  // routed
  std::vector<Expert> shared;   // model.shared_experts, applied to every token

  static MoELayer make(ParamBuilder& pb, const std::string& prefix, const Config& cfg);
  // x (B, T, C) -> (B, T, C). Balancing losses go to losses when given; statistics to opt.stats.
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& x, int64_t layer, const MoEContext& ctx,
                 const ForwardOptions& opt, RouterLosses* losses) const;
  // The same in evaluation for the n rows of w.normed, into w.sub.
  void decode(const ParamStore& ps, KVCache::Work& w, int64_t n, const MoEContext& ctx,
              const ForwardOptions& opt) const;

 private:
  ExpertFfn kind_ = ExpertFfn::kRelu;
  float dropout_ = 0;
  double aux_coef_ = 0, z_coef_ = 0;
  bool l1_ = false;  // relu gating: ReMoE's L1 penalty on the gates
  int64_t C_ = 0, E_ = 0, F_ = 0;
};

}  // namespace moe
