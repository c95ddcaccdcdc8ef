#include "moe/train/parallel.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>

#include "moe/dist/comm.hpp"

namespace moe {

namespace {
// Gradients are summed in buckets of this many floats (16 MB), so no single message is huge.
constexpr int64_t kBucketFloats = int64_t(1) << 22;
}  // namespace

ParallelTraining::ParallelTraining(Model& model, bool expert_parallel)
    : params_(&model.params()), rank_(dist::rank()), ranks_(dist::size()), expert_parallel_(expert_parallel && dist::size() > 1) {
  const char* overlap = std::getenv("MOE_OVERLAP_ALLREDUCE");
  overlap_ = !(overlap && std::string(overlap) == "0");
  unsummed_end_ = params_->numel();
  model.set_parallel(rank_, ranks_, expert_parallel_);
  // Consecutive parameters with the same owner form one range; a range runs to the next
  // parameter's offset, so the alignment padding goes with it.
  const ParamStore& ps = model.params();
  const std::vector<int> expert = model.param_expert();
  for (int id = 0; id < ps.count(); ++id) {
    const int owner = expert[size_t(id)] < 0 || !expert_parallel_ ? -1 : model.expert_owner(expert[size_t(id)]);
    const int64_t begin = ps.info(id).offset;
    const int64_t end = id + 1 < ps.count() ? ps.info(id + 1).offset : ps.numel();
    if (!ranges_.empty() && ranges_.back().owner == owner)
      ranges_.back().floats.end = end;
    else
      ranges_.push_back({{begin, end}, owner});
  }
  for (const Range& r : ranges_)
    if (r.owner < 0 || r.owner == rank_) updated_.push_back(r.floats);
}

void ParallelTraining::start_sums(int64_t begin, int64_t end) {
  float* g = params_->grad();
  for (const Range& r : ranges_) {
    if (r.owner >= 0) continue;
    const int64_t lo = std::max(begin, r.floats.begin), hi = std::min(end, r.floats.end);
    for (int64_t i = lo; i < hi; i += kBucketFloats) dist::iallreduce_sum(g + i, std::min(kBucketFloats, hi - i));
  }
}

void ParallelTraining::from(int first_param) {
  const int64_t begin = params_->info(first_param).offset;
  if (begin >= unsummed_end_) return;
  start_sums(begin, unsummed_end_);
  unsummed_end_ = begin;
  dist::progress();  // MPI moves data only inside MPI calls
}

void ParallelTraining::reduce_gradients() {
  if (ranks_ == 1) return;
  const auto t0 = std::chrono::steady_clock::now();
  start_sums(0, unsummed_end_);
  unsummed_end_ = params_->numel();
  dist::wait_all();
  float* g = params_->grad();
  const float inv = 1.f / float(ranks_);
  for (const Range& r : ranges_) {
    if (r.owner < 0 || r.owner == rank_) {
#pragma omp parallel for schedule(static)
      for (int64_t i = r.floats.begin; i < r.floats.end; ++i) g[i] *= inv;
    }
  }
  reduce_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double ParallelTraining::clip_grad_norm(double max_norm) const {
  if (!expert_parallel_) return moe::clip_grad_norm(*params_, max_norm);
  // Replicated gradients are equal on every rank; each expert's lives on its owner only.
  double replicated = 0, owned = 0;
  for (const Range& r : ranges_) {
    const double s = sum_of_squares(params_->grad() + r.floats.begin, r.floats.end - r.floats.begin);
    if (r.owner < 0) replicated += s;
    else if (r.owner == rank_) owned += s;
  }
  dist::allreduce_sum(&owned, 1);
  const double norm = std::sqrt(replicated + owned);
  clip_to_norm(*params_, norm, max_norm);
  return norm;
}

void ParallelTraining::share_experts(AdamW* adamw) const {
  if (!expert_parallel_) return;
  for (const Range& r : ranges_) {
    if (r.owner < 0) continue;
    const int64_t n = r.floats.end - r.floats.begin;
    dist::broadcast(params_->data() + r.floats.begin, n, r.owner);
    if (adamw) {
      dist::broadcast(adamw->m().data() + r.floats.begin, n, r.owner);
      dist::broadcast(adamw->v().data() + r.floats.begin, n, r.owner);
    }
  }
}

void ParallelTraining::sum(double* x, int64_t n) const { dist::allreduce_sum(x, n); }

}  // namespace moe
