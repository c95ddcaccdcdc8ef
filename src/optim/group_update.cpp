#include "moe/optim/group_update.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "moe/tensor/profile.hpp"

namespace moe {

GroupUpdate::GroupUpdate(AdamW& adamw, ParamStore& params)
    : adamw_(adamw),
      params_(params),
      partial_(size_t((params.numel() + kSquaresChunk - 1) / kSquaresChunk)),
      carry_(size_t(kSquaresChunk)) {}

void GroupUpdate::begin(float lr, bool norm) {
  adamw_.begin_step(lr);
  end_ = params_.numel();
  norm_ = norm;
}

void GroupUpdate::from(int first_param) { complete(params_.info(first_param).offset); }

void GroupUpdate::complete(int64_t b) {
  PartScope part(Part::Optimizer);
  const int64_t e = end_;
  if (b >= e) return;
  float* g = params_.grad();  // g[i - b]: the gradient of float i
  if (norm_) {
    // Chunks from the one holding b up: all but perhaps the lowest are complete now.
    const int64_t K = kSquaresChunk, n = params_.numel(), c_lo = b / K, c_hi = (e - 1) / K;
    const int64_t first_full = c_lo * K == b ? c_lo : c_lo + 1;
    double* partial = partial_.data();
    const float* carry = carry_.data();
#pragma omp parallel for schedule(static)
    for (int64_t c = first_full; c <= c_hi; ++c) {
      const int64_t cs = c * K, ce = std::min(cs + K, n);
      double s = add_squares(0.0, g + (cs - b), std::min(ce, e) - cs);
      if (ce > e) s = add_squares(s, carry + (e - cs), ce - e);  // from the groups done before
      partial[c] = s;
    }
    if (first_full > c_lo) {  // the chunk holding b continues below it: keep this group's part
      const int64_t cs = c_lo * K, hi = std::min(cs + K, e);
      std::copy(g, g + (hi - b), carry_.begin() + (b - cs));
    }
  }
  adamw_.update(params_, {b, e}, g, true);
  end_ = b;
}

double GroupUpdate::finish() {
  complete(0);
  if (!norm_) return std::numeric_limits<double>::quiet_NaN();
  double total = 0;
  for (double s : partial_) total += s;
  return std::sqrt(total);
}

}  // namespace moe
