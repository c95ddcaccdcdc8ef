#include "moe/generate/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace moe {

void validate(const SamplingOptions& opt) {
  if (!(opt.temperature >= 0.f) || !std::isfinite(opt.temperature))
    throw std::invalid_argument("--temperature must be >= 0 (0 is greedy), got " + std::to_string(opt.temperature));
  if (opt.top_k < 0) throw std::invalid_argument("--top-k must be >= 0 (0 is off), got " + std::to_string(opt.top_k));
  if (!(opt.top_p > 0.f && opt.top_p <= 1.f))
    throw std::invalid_argument("--top-p must be in (0, 1], got " + std::to_string(opt.top_p));
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, Rng& rng,
                     std::vector<std::pair<float, int32_t>>& scratch) {
  if (opt.temperature == 0.f) {
    int32_t best = 0;
    for (int32_t i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  scratch.resize(size_t(V));
  for (int32_t i = 0; i < V; ++i) scratch[size_t(i)] = {logits[i] / opt.temperature, i};
  // Descending by logit, ties to the lower id.
  std::sort(scratch.begin(), scratch.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  size_t keep = scratch.size();
  if (opt.top_k > 0) keep = std::min(keep, size_t(opt.top_k));
  const float mx = scratch[0].first;
  double z = 0;
  for (size_t i = 0; i < keep; ++i) z += std::exp(double(scratch[i].first - mx));
  if (opt.top_p < 1.f) {
    // Smallest prefix whose probability reaches top_p.
    double cum = 0;
    size_t n = 0;
    while (n < keep) {
      cum += std::exp(double(scratch[n].first - mx)) / z;
      ++n;
      if (cum >= opt.top_p) break;
    }
    keep = n;
    z = 0;
    for (size_t i = 0; i < keep; ++i) z += std::exp(double(scratch[i].first - mx));
  }
  const double u = double(rng.uniform()) * z;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += std::exp(double(scratch[i].first - mx));
    if (u < cum) return scratch[i].second;
  }
  return scratch[keep - 1].second;
}

}  // namespace moe
