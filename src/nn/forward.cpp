#include "moe/nn/forward.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>

namespace moe {

void RoutingStats::reset(int64_t layers, int64_t experts) { reset(std::vector<int64_t>(size_t(layers), experts)); }

void RoutingStats::reset(const std::vector<int64_t>& experts) {
  const size_t L = experts.size();
  tokens_per_expert.resize(L);
  for (size_t l = 0; l < L; ++l) tokens_per_expert[l].assign(size_t(experts[l]), 0);
  assigned.assign(L, 0);
  dropped.assign(L, 0);
  tokens.assign(L, 0);
  forwards.assign(L, 0);
  entropy_sum.assign(L, 0);
  z_sum.assign(L, 0);
  aux_sum.assign(L, 0);
  per_token_sum.assign(L, 0);
  per_token_sq.assign(L, 0);
  per_token_min.assign(L, INT64_MAX);
  per_token_max.assign(L, 0);
}

void RoutingStats::add(const RoutingStats& other) {
  for (size_t l = 0; l < other.tokens.size(); ++l) {
    for (size_t e = 0; e < other.tokens_per_expert[l].size(); ++e)
      tokens_per_expert[l][e] += other.tokens_per_expert[l][e];
    assigned[l] += other.assigned[l];
    dropped[l] += other.dropped[l];
    tokens[l] += other.tokens[l];
    forwards[l] += other.forwards[l];
    entropy_sum[l] += other.entropy_sum[l];
    z_sum[l] += other.z_sum[l];
    aux_sum[l] += other.aux_sum[l];
    per_token_sum[l] += other.per_token_sum[l];
    per_token_sq[l] += other.per_token_sq[l];
    per_token_min[l] = std::min(per_token_min[l], other.per_token_min[l]);
    per_token_max[l] = std::max(per_token_max[l], other.per_token_max[l]);
  }
  variable = variable || other.variable;
}

nlohmann::json RoutingStats::health() const {
  nlohmann::json layers = nlohmann::json::array();
  for (size_t l = 0; l < tokens_per_expert.size(); ++l) {
    const auto& counts = tokens_per_expert[l];
    if (counts.empty()) {  // a dense block
      layers.push_back(nullptr);
      continue;
    }
    int64_t total = 0, most = 0;
    for (int64_t c : counts) total += c, most = std::max(most, c);
    nlohmann::json load = nlohmann::json::array();
    for (int64_t c : counts) load.push_back(total ? double(c) / double(total) : 0.0);
    const double mean_load = double(total) / double(counts.size());
    const auto per = [](double sum, int64_t n) { return n ? sum / double(n) : 0.0; };
    layers.push_back({{"load", load},
                      {"dropped_frac", per(double(dropped[l]), assigned[l])},
                      {"router_entropy", per(entropy_sum[l], tokens[l])},
                      {"aux_loss", per(double(counts.size()) * aux_sum[l], forwards[l])},
                      {"z_loss", per(z_sum[l], tokens[l])},
                      {"max_violation", total ? double(most) / mean_load - 1 : 0.0}});
    if (variable && tokens[l] > 0) {
      const double mean = per_token_sum[l] / double(tokens[l]);
      const double var = std::max(0.0, per_token_sq[l] / double(tokens[l]) - mean * mean);
      layers.back()["experts_per_token"] = {
          {"mean", mean}, {"std", std::sqrt(var)}, {"min", per_token_min[l]}, {"max", per_token_max[l]}};
    }
  }
  return layers;
}

nlohmann::json RoutingStats::counts() const {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& c : tokens_per_expert) layers.push_back(c.empty() ? nlohmann::json(nullptr) : nlohmann::json(c));
  return layers;
}

const char* DecodeProfile::part_name(int p) {
  static const char* const names[kParts] = {"embeddings", "norms+residual", "attention", "router",
                                            "experts",    "thread wait",    "head"};
  return p >= 0 && p < kParts ? names[p] : "?";
}

double DecodeProfile::total(int kind, int part) const {
  double s = 0;
  for (int64_t l = 0; l <= layers; ++l) s += at(kind, l, part);
  return s;
}

void DecodeProfile::begin(int64_t n_layers, int64_t n) {
  if (layers != n_layers || seconds.empty()) {
    layers = n_layers;
    seconds.assign(size_t(2 * (layers + 1) * kParts), 0.0);
  }
  kind_ = n > 1 ? 1 : 0;
  calls[kind_] += 1;
  positions[kind_] += n;
  layer_ = layers;
  last_ = now();
}

void DecodeProfile::lap(Part p, double wait) {
  const double t = now();
  at(kind_, layer_, p) += t - last_ - wait;
  at(kind_, layer_, kThreadWait) += wait;
  last_ = t;
}

double DecodeProfile::now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace moe
