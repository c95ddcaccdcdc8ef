// Training over several processes (mpirun -np N moe train): what the trainer does between
// the backward pass and the optimizer so that every rank ends each step with the same model.
//
// Data parallelism: each rank computes the gradients of its share of the batch; they are
// summed over ranks and divided by the number of ranks, so the update is that of one process
// with the whole batch. The sums start during the backward pass, a bucket per transformer
// block as soon as its gradients are final (MPI_Iallreduce; MOE_OVERLAP_ALLREDUCE=0 sums
// everything after the backward pass instead). Expert parallelism: each routed expert
// belongs to one rank (Model::set_parallel), which alone computes it, holds its gradient and
// updates it; everything else is data parallel. Each rank still allocates every expert; the
// owner's values are sent to all ranks before an evaluation or a checkpoint.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/model/model.hpp"
#include "moe/optim/adamw.hpp"

namespace moe {

class ParallelTraining final : public GradientsReady {
 public:
  // Reads the rank and the number of ranks from dist::; calls model.set_parallel. Works on
  // the model's parameters (and their gradients) from then on: the model must outlive it.
  ParallelTraining(Model& model, bool expert_parallel);

  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  bool expert_parallel() const { return expert_parallel_; }

  // For ForwardOptions::grads_ready in training forwards: null with one process or when
  // the overlap is off.
  GradientsReady* overlap() { return ranks_ > 1 && overlap_ ? this : nullptr; }
  void from(int first_param) override;  // starts the sums of those gradients

  // After backward: the gradients of the global batch's mean loss, the same on every rank
  // (for experts it owns, on their owner; other experts' gradients are zero and stay so).
  void reduce_gradients();
  // The global gradient norm (before clipping); clips when max_norm > 0.
  double clip_grad_norm(double max_norm) const;
  // The ranges this rank's optimizer updates: null (everything) without expert parallelism.
  const std::vector<FloatRange>* update_ranges() const { return expert_parallel_ ? &updated_ : nullptr; }
  // Every rank receives each expert's parameters (and, with adamw, its moments) from its owner.
  void share_experts(AdamW* adamw) const;
  // Σ over ranks, in place (for the loss and the stop flag).
  void sum(double* x, int64_t n) const;
  // Seconds spent in reduce_gradients (waiting for the sums) so far.
  double reduce_seconds() const { return reduce_seconds_; }

 private:
  struct Range {
    FloatRange floats;
    int owner;  // -1: replicated on every rank
  };
  void start_sums(int64_t begin, int64_t end);  // of the replicated gradients in [begin, end)
  std::vector<Range> ranges_;
  ParamStore* params_;
  int64_t unsummed_end_ = 0;  // gradients [0, unsummed_end_) have no sum started this step
  bool overlap_ = true;
  std::vector<FloatRange> updated_;  // replicated ranges and the ones this rank owns
  int rank_ = 0, ranks_ = 1;
  bool expert_parallel_ = false;
  double reduce_seconds_ = 0;
};

}  // namespace moe
