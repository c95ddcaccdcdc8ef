// Loss estimates: the trainer's periodic estimate over random batches (fixed per call, so
// successive estimates see the same batches), and `moe eval`'s deterministic pass over a
// whole split in consecutive windows.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/data/dataset.hpp"
#include "moe/io/config.hpp"
#include "moe/model/model.hpp"

namespace moe {

struct EvalEstimate {
  double train_loss = 0;
  double val_loss = 0;
};

// Mean loss over cfg.logging.eval_iters random batches of each split, no dropout, no grad.
// Split between processes: part p of `parts` runs batches p, p + parts, ... and returns their
// losses' sum / eval_iters, so the parts' results add up to the whole estimate. Batch i is
// the same (its rows and its router noise) whichever part runs it.
// `group` batches go through one forward (0: eval_group(cfg)); each batch's loss has the same
// bits whatever the group: gemm computes a row alike whatever the number of rows, every other
// op works per row or per sequence, and each batch draws its own router noise.
// The threads run their forwards in g, *spare (when given) and graphs made for the call.
EvalEstimate estimate_loss(Model& model, const Dataset& data, const Config& cfg, Graph& g, int part = 0,
                           int parts = 1, int64_t group = 0, Graph* spare = nullptr);
// Batches per forward for estimate_loss: a few thousand rows, which keep the GEMMs busier than
// makeMoE's 16 x 32 do; 1 when a capacity applies at evaluation (it couples a batch's tokens)
// or with training.recompute (which asks for little memory).
int64_t eval_group(const Config& cfg);

struct SplitEvaluation {
  double loss = 0;             // mean cross-entropy per predicted token (nats)
  double perplexity = 0;       // exp(loss)
  double bits_per_char = 0;    // loss / ln 2
  int64_t tokens = 0;          // predicted tokens
  RoutingStats routing;        // tokens per expert per layer
};

// One batch of evaluate_split as its routers saw it (moe inspect).
struct RoutedBatch {
  int64_t first_window = 0;  // row b holds ids [(first_window + b)·T, (first_window + b)·T + T)
  int64_t B = 0, T = 0;
  const int32_t* x = nullptr;                                 // [B*T] inputs
  const std::vector<std::vector<int32_t>>* chosen = nullptr;  // per layer [B*T*K] expert ids
  const std::vector<std::vector<float>>* weights = nullptr;   // per layer [B*T*K] their gate weights
};
using RoutedBatchObserver = std::function<void(const RoutedBatch&)>;

// Every window [i*T, i*T + T] of ids (inputs, targets shifted by one), batch_size at a time.
// When given, observe sees every batch's routing, in batch order, whatever the thread count.
// batch_routing: router.gating "expert_choice" routes each batch by the batch rule of training
// (not causal: a token's route depends on the batch) instead of the causal thresholds.
SplitEvaluation evaluate_split(Model& model, TokenSpan ids, int64_t batch_size, Graph& g,
                               const RoutedBatchObserver& observe = nullptr, bool batch_routing = false);

}  // namespace moe
